"""The pool of pre-started sandboxes, on a real worker with the bubblewrap backend."""

from __future__ import annotations

import asyncio
import io
import json
import os
import zipfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tests.workers import support
from workers import cgroups
from workers.agent import Worker
from workers.prestart import POOL_MEMORY_MB, link_tree
from workers.protocol import InstanceSpec, InvocationStatus, InvokeRequest

T = TypeVar("T")

ENVIRONMENT_HANDLER = """
import os

print("module loaded")


def handler(event, context):
    return {"function_name": context.function_name, "environ": dict(os.environ)}
"""


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def make_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100755 << 16
            archive.writestr(info, content)
    return buffer.getvalue()


PACKAGES = {
    "environment": make_zip({"app.py": ENVIRONMENT_HANDLER}),
    "import-error": make_zip({"app.py": "import not_a_module\n"}),
    "shell": make_zip(
        {
            "bootstrap": "#!/bin/sh\n"
            'api="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation"\n'
            'curl -sS -D /tmp/h "$api/next" > /dev/null\n'
            "id=$(grep -i '^lambda-runtime-aws-request-id:' /tmp/h | tr -d '\\r' | cut -d' ' -f2)\n"
            'curl -sS -d "\\"$AWS_LAMBDA_FUNCTION_NAME\\"" "$api/$id/response"\n'
            "sleep 60\n"
        }
    ),
}


async def code_source(sha256: str, path: Path) -> None:
    path.write_bytes(PACKAGES[sha256])


def spec(
    code: str = "environment",
    *,
    runtime: str = "python3.11",
    memory_mb: int = 128,
    environment: dict[str, str] | None = None,
) -> InstanceSpec:
    return InstanceSpec(
        tenant_id="tenant",
        function_id=f"fn-{code}",
        function_name=code,
        revision=1,
        runtime=runtime,
        handler="app.handler",
        memory_mb=memory_mb,
        timeout_s=5,
        code_sha256=code,
        environment=environment or {},
    )


def running_worker(tmp_path: Path, *, memory_mb: int = 2048, pool_size: int = 2):  # type: ignore[no-untyped-def]
    return support.running_worker(tmp_path, code_source, memory_mb=memory_mb, pool_size=pool_size)


def pool_full(worker: Worker) -> Callable[[], bool]:
    pool = worker.prestart
    assert pool is not None
    return lambda: all(pool.ready_count(r) == pool.size for r in pool.runtimes)


def pooled_ids(worker: Worker) -> set[str]:
    assert worker.prestart is not None
    return {p.instance_id for entries in worker.prestart._pooled.values() for p in entries}


def leftovers(worker: Worker, instance_id: str) -> list[str]:
    """What of an instance is still on the host: cgroups, directories."""
    left = [str(p) for p in cgroups.InstanceCgroup(instance_id).paths.values() if p.exists()]
    for path in (worker.instances_dir / instance_id, worker.config.sandbox_dir / "tasks"):
        if path.name == "tasks":
            path = path / instance_id
        if path.exists():
            left.append(str(path))
    return left


async def invoke(worker: Worker, instance_id: str) -> dict[str, Any]:
    request = InvokeRequest("req-1", b"{}", 5, "arn:test", "Root=1-0-0")
    result = await worker.invoke(instance_id, request)
    assert result.status is InvocationStatus.SUCCESS, result.body
    return json.loads(result.body)


def test_the_pool_fills_every_runtime_without_taking_schedulable_memory(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))

            assert worker.prestart is not None
            pooled = worker.prestart.size * len(worker.prestart.runtimes)
            assert worker.prestart.reserved_mb == pooled * POOL_MEMORY_MB
            assert worker.free_mb == 2048
            assert worker.instances() == []

    run(scenario())


def test_a_function_takes_over_a_pooled_sandbox_with_its_own_memory_and_environment(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))
            pooled = pooled_ids(worker)

            start = await worker.start_instance(spec(memory_mb=512, environment={"COLOR": "blue"}))

            assert start.prestarted and start.init_error_type is None
            assert start.instance_id in pooled
            assert start.init_logs == "module loaded\n"
            memory = cgroups.InstanceCgroup(start.instance_id).paths["memory"]
            assert (memory / "memory.limit_in_bytes").read_text().strip() == str(512 * 1024**2)
            cpu = cgroups.InstanceCgroup(start.instance_id).paths["cpu"]
            assert (cpu / "cpu.shares").read_text().strip() == str(1024 * 512 // 1769)
            assert worker.free_mb == 2048 - 512

            result = await invoke(worker, start.instance_id)
            assert result["function_name"] == "environment"
            assert result["environ"]["COLOR"] == "blue"
            assert result["environ"]["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "512"
            assert "LAMBENT_PRESTARTED" not in result["environ"]

            await worker.stop_instance(start.instance_id)
            await support.wait_until(lambda: not leftovers(worker, start.instance_id))
            assert worker.free_mb == 2048
            # Used once only: it does not go back to the pool.
            await support.wait_until(pool_full(worker))
            assert start.instance_id not in pooled_ids(worker)

    run(scenario())


def test_a_provisioned_instance_from_the_pool_knows_it_is_provisioned(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))

            start = await worker.start_instance(spec(), provisioned=True)

            assert start.prestarted
            environ = (await invoke(worker, start.instance_id))["environ"]
            assert environ["AWS_LAMBDA_INITIALIZATION_TYPE"] == "provisioned-concurrency"

    run(scenario())


def test_a_start_takes_a_sandbox_that_is_still_starting(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, pool_size=1) as worker:
            pool = worker.prestart
            assert pool is not None
            await support.wait_until(pool_full(worker))
            first = await worker.start_instance(spec())
            # The pool refills behind the first start; catch the new sandbox while it starts.
            while not pool.count("python3.11"):
                await asyncio.sleep(0)
            assert pool.ready_count("python3.11") == 0

            second = await worker.start_instance(spec())

            assert first.prestarted and second.prestarted
            assert second.init_error_type is None
            assert second.instance_id != first.instance_id
            assert (await invoke(worker, second.instance_id))["function_name"] == "environment"

    run(scenario())


def test_a_provided_function_takes_over_a_pooled_sandbox(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))

            start = await worker.start_instance(spec("shell", runtime="provided"))

            assert start.prestarted and start.init_error_type is None
            request = InvokeRequest("req-1", b"{}", 5, "arn:test", "Root=1-0-0")
            result = await worker.invoke(start.instance_id, request)
            assert json.loads(result.body) == "shell"

    run(scenario())


def test_an_init_failure_in_a_pooled_sandbox_is_the_functions_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))

            start = await worker.start_instance(spec("import-error"))

            assert start.prestarted
            assert start.init_error_type == "Runtime.ImportModuleError"
            assert b"not_a_module" in (start.init_error_body or b"")
            assert worker.environments == {}
            assert worker.free_mb == 2048
            await support.wait_until(lambda: not leftovers(worker, start.instance_id))

    run(scenario())


def test_a_pooled_sandbox_that_dies_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))
            assert worker.prestart is not None
            victim = worker.prestart._pooled["python3.11"][0]

            cgroups.InstanceCgroup(victim.instance_id).kill_all()

            await support.wait_until(lambda: victim.instance_id not in pooled_ids(worker))
            await support.wait_until(pool_full(worker))
            await support.wait_until(lambda: not leftovers(worker, victim.instance_id))

    run(scenario())


def test_a_start_short_of_memory_stops_pooled_sandboxes(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Room for two pooled sandboxes: the first two runtimes get one each.
        async with running_worker(tmp_path, memory_mb=256) as worker:
            pool = worker.prestart
            assert pool is not None
            await support.wait_until(
                lambda: pool.ready_count("python3.11") + pool.ready_count("nodejs20.x") == 2
            )

            start = await worker.start_instance(spec(memory_mb=256))

            assert start.prestarted and start.init_error_type is None
            assert pool.reserved_mb == 0
            assert pool.count("nodejs20.x") == 0
            await worker.stop_instance(start.instance_id)
            await support.wait_until(lambda: pool.reserved_mb == 256)

    run(scenario())


def test_a_fresh_start_short_of_memory_stops_pooled_sandboxes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, memory_mb=256) as worker:
            pool = worker.prestart
            assert pool is not None
            await support.wait_until(
                lambda: pool.reserved_mb == 256 and pool.ready_count("nodejs20.x")
            )
            # The interpreter reads this at startup, so a pooled one cannot honour it.
            function = spec(memory_mb=256, environment={"PYTHONDONTWRITEBYTECODE": "1"})

            start = await worker.start_instance(function)

            assert not start.prestarted and start.init_error_type is None
            assert pool.reserved_mb == 0
            result = await invoke(worker, start.instance_id)
            assert result["environ"]["PYTHONDONTWRITEBYTECODE"] == "1"

    run(scenario())


def test_close_stops_pooled_sandboxes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path) as worker:
            await support.wait_until(pool_full(worker))
            assert worker.prestart is not None
            pooled = [p for entries in worker.prestart._pooled.values() for p in entries]
            pids = [p.sandbox.process.pid for p in pooled]  # type: ignore[union-attr]
            await worker.close()

            for pid in pids:
                assert not Path(f"/proc/{pid}").exists()
            for p in pooled:
                assert leftovers(worker, p.instance_id) == []
            assert list(worker.instances_dir.iterdir()) == []
            assert list((worker.config.sandbox_dir / "tasks").iterdir()) == []

    run(scenario())


def test_link_tree_links_files_and_recreates_directories_and_symlinks(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "pkg" / "sub").mkdir(parents=True)
    (source / "pkg" / "sub" / "data.txt").write_text("data")
    (source / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(source / "run.sh", 0o755)
    os.chmod(source / "pkg", 0o750)
    (source / "link").symlink_to("pkg/sub/data.txt")
    dest = tmp_path / "dest"
    dest.mkdir()

    link_tree(source, dest)

    assert (dest / "pkg" / "sub" / "data.txt").read_text() == "data"
    assert os.path.samefile(dest / "run.sh", source / "run.sh")
    assert (dest / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "pkg").stat().st_mode & 0o777 == 0o750
    assert (dest / "link").is_symlink()
    assert os.readlink(dest / "link") == "pkg/sub/data.txt"
