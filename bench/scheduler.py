"""The scheduler's own cost per decision, and the memory an idle Python instance holds.

    .venv/bin/python bench/scheduler.py

1. Decision cost: the control plane's Scheduler picks the instance for an invocation. Here it
   runs against an in-memory worker client that answers at once (the WorkerClient seam), so
   the figure is the scheduler's bookkeeping alone: admission against concurrency limits, the
   warm-pool lookup, the release. Measured with 10 and with 10,000 functions deployed, each
   with one idle instance, invoking functions in random order. Also the cost of placing a new
   instance (no idle one) with 10 and 10,000 functions' instances live.
2. Idle instance memory: a real worker with the bubblewrap backend starts 10 instances of a
   no-op python3.11 function; once idle, the resident memory (RSS) of every process in each
   instance's cgroup is summed, and the cgroup's own charge is read too.

Prints medians and p99s; writes bench/results/scheduler.json.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.scheduler.service import ConcurrencyLimits, Scheduler  # noqa: E402
from bench.report import Table  # noqa: E402
from bench.stats import summarize  # noqa: E402
from workers import cgroups  # noqa: E402
from workers.agent import InstanceInfo, Worker, WorkerConfig  # noqa: E402
from workers.client import InProcessWorkerClient  # noqa: E402
from workers.protocol import (  # noqa: E402
    InstanceSpec,
    InvocationStatus,
    InvokeRequest,
    InvokeResult,
    StartResult,
)
from workers.sandbox.bubblewrap import BubblewrapBackend  # noqa: E402

RESULTS = REPO / "bench" / "results" / "scheduler.json"
LIMITS = ConcurrencyLimits(tenant_limit=1_000_000)


class InstantWorker:
    """A worker client that starts and invokes instantly: the scheduler's cost stands alone."""

    worker_id = "instant"
    capacity_mb = 10**9
    healthy = True

    def __init__(self) -> None:
        self.used_mb = 0

    @property
    def free_mb(self) -> int:
        return self.capacity_mb - self.used_mb

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        self.used_mb += spec.memory_mb
        return StartResult(uuid.uuid4().hex, 1, "")

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult:
        return InvokeResult(
            request.request_id, InvocationStatus.SUCCESS, b"{}", None, 1, 1, "", True
        )

    async def stop_instance(self, instance_id: str) -> None:
        return None

    async def instances(self) -> list[InstanceInfo]:
        return []


def spec_for(index: int) -> InstanceSpec:
    return InstanceSpec(
        tenant_id=f"t{index % 100}",
        function_id=f"f{index}",
        function_name=f"fn{index}",
        revision=1,
        runtime="python3.11",
        handler="app.handler",
        memory_mb=128,
        timeout_s=3,
        code_sha256="0" * 64,
    )


def request() -> InvokeRequest:
    return InvokeRequest(uuid.uuid4().hex, b"{}", 3, "arn", "trace")


async def decision_cost(functions: int, samples: int) -> dict[str, object]:
    scheduler = Scheduler([InstantWorker()], keepalive_s=3600)
    specs = [spec_for(i) for i in range(functions)]
    for spec in specs:  # one warm instance each
        await scheduler.invoke(spec, request(), LIMITS)

    warm: list[float] = []
    for _ in range(samples):
        spec = random.choice(specs)
        started = time.perf_counter()
        scheduled = await scheduler.invoke(spec, request(), LIMITS)
        warm.append(time.perf_counter() - started)
        assert not scheduled.cold_start

    cold: list[float] = []
    for i in range(samples // 10):
        spec = spec_for(functions + i)
        started = time.perf_counter()
        await scheduler.invoke(spec, request(), LIMITS)
        cold.append(time.perf_counter() - started)
    return {"functions": functions, "warm": summarize(warm), "place": summarize(cold)}


def noop_package() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def handler(event, context):\n    return event\n")
    return buffer.getvalue()


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def idle_memory(count: int) -> dict[str, object]:
    package = noop_package()
    sandbox_dir = Path(tempfile.mkdtemp(prefix="lambent-bench-", dir="/tmp"))
    sandbox_dir.chmod(0o711)

    async def code_source(sha256: str, path: Path) -> None:
        path.write_bytes(package)

    backend = BubblewrapBackend(state_dir=sandbox_dir, sandbox_uid=61000, sandbox_gid=61000)
    config = WorkerConfig(
        sandbox_dir=sandbox_dir,
        memory_mb=count * 128 + 512,
        python_executable=Path("/usr/bin/python3"),
        tmp_mb=64,
        pids_max=1024,
        log_max_bytes=64 * 1024,
        init_timeout_s=10,
    )
    worker = Worker(config, backend, code_source)
    await worker.start()
    client = InProcessWorkerClient(worker)
    try:
        spec = InstanceSpec("t", "f", "noop", 1, "python3.11", "app.handler", 128, 3, "1" * 64)
        ids = []
        for _ in range(count):
            started = await client.start_instance(spec)
            await client.invoke(started.instance_id, request())
            ids.append(started.instance_id)
        await asyncio.sleep(1)
        rss_mb: list[float] = []
        charged_mb: list[float] = []
        for instance_id in ids:
            group = cgroups.InstanceCgroup(instance_id)
            rss_mb.append(sum(rss_kb(pid) for pid in group.pids()) / 1024)
            usage = (group.paths["memory"] / "memory.usage_in_bytes").read_text()
            charged_mb.append(int(usage) / (1024 * 1024))
        return {
            "instances": count,
            "rss_mb_median": statistics.median(rss_mb),
            "rss_mb_max": max(rss_mb),
            "cgroup_mb_median": statistics.median(charged_mb),
        }
    finally:
        await worker.close()
        shutil.rmtree(sandbox_dir, ignore_errors=True)


async def main() -> None:
    results = {
        "decision": [await decision_cost(n, 20_000) for n in (10, 10_000)],
        "idle_memory": await idle_memory(10),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=lambda o: o.__dict__))

    table = Table(
        "Scheduler cost per decision (in-memory worker client)",
        ["decision", "functions", "p50 µs", "p99 µs"],
    )
    for row in results["decision"]:
        for kind in ("warm", "place"):
            s = row[kind]
            table.add(kind, str(row["functions"]), f"{s.p50_ms * 1e3:.1f}", f"{s.p99_ms * 1e3:.1f}")
    print(table.render())
    memory = results["idle_memory"]
    print(
        f"\nidle python3.11 instance ({memory['instances']} measured): "
        f"RSS median {memory['rss_mb_median']:.1f} MB (max {memory['rss_mb_max']:.1f}), "
        f"cgroup charge median {memory['cgroup_mb_median']:.1f} MB"
    )


if __name__ == "__main__":
    asyncio.run(main())
