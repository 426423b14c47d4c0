"""The Docker sandbox backend under a real worker, and the images it needs."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import LAMBENT, docker_client, require_docker
from workers.agent import SUPPORTED_RUNTIMES, Worker, WorkerConfig, resolve_sandbox_dir
from workers.protocol import InstanceSpec, InvocationStatus, InvokeRequest
from workers.sandbox.base import SandboxStartError
from workers.sandbox.docker import DockerBackend

T = TypeVar("T")

CHATTY = """
def handler(event, context):
    for n in range(event["lines"]):
        print(f"line {n:05d} " + "x" * 40)
    return event["lines"]
"""
PACKAGES = {"chatty": {"app.py": CHATTY}}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def make_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


async def code_source(sha256: str, path: Path) -> None:
    path.write_bytes(make_zip(PACKAGES[sha256]))


def spec(code: str) -> InstanceSpec:
    return InstanceSpec(
        tenant_id="tenant",
        function_id=f"fn-{code}",
        function_name=code,
        revision=1,
        runtime="python3.11",
        handler="app.handler",
        memory_mb=256,
        timeout_s=10,
        code_sha256=code,
    )


def request(payload: bytes = b"{}") -> InvokeRequest:
    return InvokeRequest(
        request_id=uuid.uuid4().hex, payload=payload, timeout_s=10, function_arn="arn", trace_id="t"
    )


@pytest.fixture
def sandbox_dir(tmp_path: Path) -> Any:
    require_docker()
    # The sandbox uid must traverse the sandbox dir, which pytest's private tmp_path forbids.
    path = resolve_sandbox_dir(tmp_path, None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def docker_worker(sandbox_dir: Path) -> AsyncIterator[Worker]:
    worker_id = f"test-{uuid.uuid4().hex[:8]}"
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    backend = DockerBackend(
        state_dir=sandbox_dir,
        sandbox_uid=61000,
        sandbox_gid=61000,
        worker_id=worker_id,
        runtimes=SUPPORTED_RUNTIMES,
    )
    config = WorkerConfig(
        sandbox_dir=sandbox_dir,
        memory_mb=2048,
        python_executable=Path("/usr/bin/python3"),
        tmp_mb=64,
        pids_max=256,
        log_max_bytes=1024 * 1024,
        init_timeout_s=10,
    )
    worker = Worker(config, backend, code_source, worker_id=worker_id)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.close()
        leftovers = docker_client().api.containers(
            all=True, filters={"label": f"lambent.worker={worker_id}"}
        )
        assert leftovers == []


def test_a_worker_without_its_images_says_how_to_build_them(sandbox_dir: Path) -> None:
    with pytest.raises(SandboxStartError) as refused:
        DockerBackend(
            state_dir=sandbox_dir,
            sandbox_uid=61000,
            sandbox_gid=61000,
            worker_id="no-images",
            runtimes=("python3.11", "cobol85"),
        )

    assert "lambent/runtime-cobol85" in str(refused.value)
    assert "lambent images build" in str(refused.value)


def test_everything_printed_before_the_reply_is_in_the_invocations_logs(
    sandbox_dir: Path,
) -> None:
    async def scenario() -> None:
        async with docker_worker(sandbox_dir) as worker:
            start = await worker.start_instance(spec("chatty"))
            for lines in (3000, 10):
                result = await worker.invoke(
                    start.instance_id, request(f'{{"lines": {lines}}}'.encode())
                )
                assert result.status is InvocationStatus.SUCCESS
                printed = [line for line in result.logs.splitlines() if line.startswith("line")]
                assert printed == [f"line {n:05d} " + "x" * 40 for n in range(lines)]

    run(scenario())


def test_a_container_killed_from_outside_ends_its_instance(sandbox_dir: Path) -> None:
    async def scenario() -> None:
        async with docker_worker(sandbox_dir) as worker:
            start = await worker.start_instance(spec("chatty"))
            environment = worker.environments[start.instance_id]

            docker_client().api.kill(f"lambent-{start.instance_id}")

            status = await asyncio.wait_for(environment.sandbox.wait(), timeout=10)
            assert status == 137 and not environment.sandbox.oom_killed()
            deadline = time.monotonic() + 10
            while start.instance_id in worker.environments and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert start.instance_id not in worker.environments

    run(scenario())


def test_images_build_skips_the_images_that_exist() -> None:
    require_docker()

    built = subprocess.run(
        [str(LAMBENT), "images", "build"], capture_output=True, text=True, timeout=120
    )

    assert built.returncode == 0, built.stderr
    assert "every image exists already" in built.stdout
    for runtime in SUPPORTED_RUNTIMES:
        assert f"lambent/runtime-{runtime}:latest exists; skipped" in built.stderr
