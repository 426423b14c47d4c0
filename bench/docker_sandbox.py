"""The Docker sandbox against the process sandbox and a plain `docker run`, in one run.

    .venv/bin/python bench/docker_sandbox.py            # about two minutes on a 2-core machine
    .venv/bin/python bench/docker_sandbox.py --quick    # about a minute, noisier

Needs root, the Docker engine and the images of `lambent images build`. For each backend it
runs a worker in this process (no HTTP in between, so the figures are the execution side's
alone) and measures, for the no-op handler of bench/handlers/noop.py on python3.11 at 128 MB:

* cold start, fresh: a new sandbox started for the function, up to the answer of its first
  invocation (start_instance, then invoke);
* cold start, pre-started: the same, taking over a sandbox of the pre-started pool (the pool is
  let refill before each sample, as between the cold starts of a quiet platform);
* warm: one more invocation of an instance that has already served one.

The baseline is `docker run --rm --network none lambent/runtime-python3.11 python3 -c pass`
through the docker command: what starting the same image costs without Lambent. It prints
medians, p99s and ratios, and writes every sample's summary to bench/results/docker.json.

(Not bench/docker.py: run as a script, bench/ comes first on the path, and a file of that name
would stand in for the Docker SDK.)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

# Run as a script, Python puts bench/ on the path; the benchmark imports the repository's
# packages from its root.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.logging import configure_logging  # noqa: E402
from bench.report import Table  # noqa: E402
from bench.stats import Summary, summarize  # noqa: E402
from workers.agent import Worker, WorkerConfig, resolve_sandbox_dir  # noqa: E402
from workers.images import runtime_image  # noqa: E402
from workers.protocol import InstanceSpec, InvokeRequest  # noqa: E402
from workers.sandbox.bubblewrap import BubblewrapBackend  # noqa: E402
from workers.sandbox.docker import DockerBackend  # noqa: E402

RESULTS = REPO / "bench" / "results" / "docker.json"
HANDLER = (REPO / "bench" / "handlers" / "noop.py").read_text()
DOCKER_RUN = [
    "docker", "run", "--rm", "--network", "none", runtime_image("python3.11"),
    "python3", "-c", "pass",
]  # fmt: skip
# The pool is let refill before each pre-started sample, for at most this long.
REFILL_TIMEOUT_S = 30


def package() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("noop.py", HANDLER)
    return buffer.getvalue()


PACKAGE = package()


async def code_source(sha256: str, path: Path) -> None:
    path.write_bytes(PACKAGE)


def spec() -> InstanceSpec:
    return InstanceSpec(
        tenant_id="bench",
        function_id=f"noop-{uuid.uuid4().hex[:8]}",
        function_name="noop",
        revision=1,
        runtime="python3.11",
        handler="noop.handler",
        memory_mb=128,
        timeout_s=10,
        code_sha256="noop",
    )


def request() -> InvokeRequest:
    return InvokeRequest(
        request_id=uuid.uuid4().hex,
        payload=b'{"bench": true}',
        timeout_s=10,
        function_arn="arn:bench",
        trace_id="bench",
    )


def make_worker(backend_name: str, sandbox_dir: Path, pool_size: int) -> Worker:
    worker_id = f"bench-{uuid.uuid4().hex[:8]}"
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    if backend_name == "docker":
        backend: DockerBackend | BubblewrapBackend = DockerBackend(
            state_dir=sandbox_dir,
            sandbox_uid=61000,
            sandbox_gid=61000,
            worker_id=worker_id,
            runtimes=("python3.11", "nodejs20.x", "provided"),
        )
    else:
        backend = BubblewrapBackend(state_dir=sandbox_dir, sandbox_uid=61000, sandbox_gid=61000)
    config = WorkerConfig(
        sandbox_dir=sandbox_dir,
        memory_mb=4096,
        python_executable=Path("/usr/bin/python3"),
        tmp_mb=64,
        pids_max=1024,
        log_max_bytes=256 * 1024,
        init_timeout_s=10,
        prestart_pool_size=pool_size,
    )
    return Worker(config, backend, code_source, worker_id=worker_id)


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def cold_starts(worker: Worker, count: int, *, prestarted: bool) -> tuple[list[float], int]:
    """Seconds from start_instance to the first answer; and how many took a pooled sandbox."""
    samples: list[float] = []
    pooled = 0
    for attempt in range(count + 1):  # the first one only warms the code cache
        if prestarted:
            await wait_for_pool(worker)
        else:
            await asyncio.sleep(0.1)  # let the previous instance's removal settle
        started = time.perf_counter()
        start = await worker.start_instance(spec())
        await worker.invoke(start.instance_id, request())
        elapsed = time.perf_counter() - started
        if start.init_error_type is not None:
            raise RuntimeError(f"the function failed to start: {start.init_error_body!r}")
        await worker.stop_instance(start.instance_id)
        if attempt > 0:
            samples.append(elapsed)
            pooled += start.prestarted
    return samples, pooled


async def wait_for_pool(worker: Worker) -> None:
    assert worker.prestart is not None
    deadline = time.monotonic() + REFILL_TIMEOUT_S
    # Every runtime's: a pooled sandbox still starting would compete with the sample for CPU.
    while any(worker.prestart.ready_count(r) < 1 for r in worker.prestart.runtimes):
        if time.monotonic() > deadline:
            raise RuntimeError("the pre-started pool did not refill")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the refill's own start-up should not overlap the sample


async def warm_invocations(worker: Worker, count: int) -> list[float]:
    start = await worker.start_instance(spec())
    await worker.invoke(start.instance_id, request())
    samples = [
        await timed(lambda: worker.invoke(start.instance_id, request())) for _ in range(count)
    ]
    await worker.stop_instance(start.instance_id)
    return samples


async def measure_backend(backend_name: str, counts: dict[str, int]) -> dict[str, Summary]:
    results: dict[str, Summary] = {}
    with tempfile.TemporaryDirectory(prefix="lambent-bench-") as data:
        sandbox_dir = resolve_sandbox_dir(Path(data), None)
        try:
            fresh = make_worker(backend_name, sandbox_dir / "fresh", pool_size=0)
            await fresh.start()
            try:
                progress(f"{backend_name}: fresh cold starts")
                samples, _ = await cold_starts(fresh, counts["cold"], prestarted=False)
                results["cold start, fresh"] = summarize(samples)
                progress(f"{backend_name}: warm invocations")
                results["warm"] = summarize(await warm_invocations(fresh, counts["warm"]))
            finally:
                await fresh.close()

            pooled = make_worker(backend_name, sandbox_dir / "pooled", pool_size=1)
            await pooled.start()
            try:
                progress(f"{backend_name}: pre-started cold starts")
                samples, taken = await cold_starts(pooled, counts["cold"], prestarted=True)
                if taken != len(samples):
                    progress(f"  only {taken} of {len(samples)} took a pre-started sandbox")
                results["cold start, pre-started"] = summarize(samples)
            finally:
                await pooled.close()
        finally:
            shutil.rmtree(sandbox_dir, ignore_errors=True)
    return results


def measure_docker_run(count: int) -> Summary:
    progress("plain docker run")
    subprocess.run(DOCKER_RUN, check=True, capture_output=True)  # warm the page cache
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run(DOCKER_RUN, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return summarize(samples)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(value: float) -> str:
    return f"{value:.1f} ms"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, noisier")
    args = parser.parse_args()
    counts = {"cold": 10, "warm": 100} if args.quick else {"cold": 30, "warm": 300}
    configure_logging("console", "warning")

    docker_run = measure_docker_run(counts["cold"])
    backends = {name: asyncio.run(measure_backend(name, counts)) for name in ("process", "docker")}

    table = Table(
        "Docker sandbox vs process sandbox vs plain docker run (python3.11, 128 MB, no-op handler)",
        ["", "process p50", "process p99", "docker p50", "docker p99", "docker/process"],
    )
    for metric in ("cold start, fresh", "cold start, pre-started", "warm"):
        process, docker = backends["process"][metric], backends["docker"][metric]
        table.add(
            metric,
            ms(process.p50_ms),
            ms(process.p99_ms),
            ms(docker.p50_ms),
            ms(docker.p99_ms),
            ratio(docker.p50_ms, process.p50_ms),
        )
    table.add("plain docker run", "", "", ms(docker_run.p50_ms), ms(docker_run.p99_ms))
    prestarted = backends["docker"]["cold start, pre-started"]
    fresh = backends["docker"]["cold start, fresh"]
    table.notes += [
        f"pre-started Docker cold start / plain docker run (medians): "
        f"{ratio(prestarted.p50_ms, docker_run.p50_ms)} (the aim is under 0.20x)",
        f"fresh Docker cold start / plain docker run (medians): "
        f"{ratio(fresh.p50_ms, docker_run.p50_ms)}",
        f"samples: {counts['cold']} per cold start, {counts['warm']} warm",
    ]
    print(table.render())

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "docker_run": asdict(docker_run),
                **{
                    backend: {metric: asdict(summary) for metric, summary in results.items()}
                    for backend, results in backends.items()
                },
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
