"""A worker stops idle instances itself: past the backstop, and when a start needs their room.

On a real worker with the bubblewrap backend. No control plane takes part: these are the
instances whose API process is gone, or another API process's.
"""

from __future__ import annotations

import asyncio
import io
import time
import zipfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.workers import support
from workers.agent import Worker, idle_backstop_s
from workers.protocol import InstanceSpec, InvocationStatus, InvokeRequest, NoRoom

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def package() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def handler(event, context):\n    return 1\n")
    return buffer.getvalue()


async def code_source(sha256: str, path: Path) -> None:
    path.write_bytes(package())


def spec(name: str, memory_mb: int = 128) -> InstanceSpec:
    return InstanceSpec(
        tenant_id="tenant",
        function_id=f"fn-{name}",
        function_name=name,
        revision=1,
        runtime="python3.11",
        handler="app.handler",
        memory_mb=memory_mb,
        timeout_s=5,
        code_sha256="code",
    )


def running_worker(tmp_path: Path, **options: object):  # type: ignore[no-untyped-def]
    return support.running_worker(tmp_path, code_source, **options)  # type: ignore[arg-type]


async def started(worker: Worker, name: str, *, provisioned: bool = False) -> str:
    start = await worker.start_instance(spec(name), provisioned=provisioned)
    assert start.init_error_type is None, start.init_error_body
    return start.instance_id


async def invoke(worker: Worker, instance_id: str) -> None:
    request = InvokeRequest("req-1", b"{}", 5, "arn:test", "Root=1-0-0")
    result = await worker.invoke(instance_id, request)
    assert result.status is InvocationStatus.SUCCESS, result.body


def live(worker: Worker) -> set[str]:
    return {info.instance_id for info in worker.instances()}


def test_the_backstop_outlasts_the_control_planes_keep_alive_and_its_reaping() -> None:
    # The control plane reaps every tenth of the keep-alive, between 0.5 and 30 s.
    for keepalive_s in (0.5, 2, 60, 300, 3600):
        reap_interval_s = min(max(keepalive_s / 10, 0.5), 30)
        assert idle_backstop_s(keepalive_s) > keepalive_s + reap_interval_s
    assert idle_backstop_s(300) == 360


def test_an_instance_idle_past_the_backstop_is_stopped_by_its_worker(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, backstop_s=1.5) as worker:
            instance_id = await started(worker, "abandoned")
            await invoke(worker, instance_id)
            used_at = time.monotonic()

            await support.wait_until(lambda: instance_id not in live(worker))

            assert time.monotonic() - used_at >= 1.5
            assert worker.free_mb == 1024

    run(scenario())


def test_an_instance_in_use_is_not_stopped_by_the_backstop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, backstop_s=1.5) as worker:
            instance_id = await started(worker, "busy")
            for _ in range(6):
                await invoke(worker, instance_id)
                await asyncio.sleep(0.5)

            assert instance_id in live(worker)

    run(scenario())


def test_a_kept_instance_outlives_the_backstop_until_no_one_keeps_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, backstop_s=1.5) as worker:
            instance_id = await started(worker, "provisioned", provisioned=True)
            for _ in range(8):
                await asyncio.sleep(0.5)
                assert worker.keep_instances([instance_id, "no-such-instance"]) == [
                    "no-such-instance"
                ]

            assert instance_id in live(worker)
            assert worker.idle_mb == 0  # nor would it be stopped for room
            await support.wait_until(lambda: instance_id not in live(worker))
            assert worker.keep_instances([instance_id]) == [instance_id]

    run(scenario())


def test_a_start_without_room_stops_the_least_recently_used_idle_instance(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, memory_mb=384) as worker:
            older = await started(worker, "older")
            newer = await started(worker, "newer")
            kept = await started(worker, "kept", provisioned=True)
            await invoke(worker, newer)
            await invoke(worker, older)  # now "newer" is the least recently used
            assert worker.free_mb == 0
            assert worker.idle_mb == 256

            third = await started(worker, "third")

            assert newer not in live(worker)
            assert live(worker) == {older, kept, third}
            assert worker.free_mb == 0
            assert worker.idle_mb == 128  # "older"; "third" awaits its first invocation

    run(scenario())


def test_an_instance_awaiting_its_first_invocation_is_not_stopped_for_room(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, memory_mb=128) as worker:
            fresh = await started(worker, "fresh")

            with pytest.raises(NoRoom):
                await started(worker, "pushy")

            assert live(worker) == {fresh}
            await invoke(worker, fresh)

    run(scenario())


def test_pre_started_sandboxes_are_neither_aged_out_nor_counted_as_idle_instances(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with running_worker(tmp_path, backstop_s=1.0, pool_size=1) as worker:
            pool = worker.prestart
            assert pool is not None
            await support.wait_until(lambda: pool.ready_count("python3.11") == 1)
            pooled = {p.instance_id for p in pool._pooled["python3.11"]}

            await asyncio.sleep(2.5)

            assert {p.instance_id for p in pool._pooled["python3.11"]} == pooled
            assert pool.ready_count("python3.11") == 1
            assert worker.instances() == []
            assert worker.idle_mb == 0

    run(scenario())
