"""A real worker with the bubblewrap backend, run in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from workers.agent import CodeSource, Worker, WorkerConfig, resolve_sandbox_dir
from workers.sandbox.bubblewrap import BubblewrapBackend

WAIT_S = 20


@contextlib.asynccontextmanager
async def running_worker(
    tmp_path: Path,
    code_source: CodeSource,
    *,
    memory_mb: int = 1024,
    pool_size: int = 0,
    backstop_s: float | None = None,
) -> AsyncIterator[Worker]:
    # The sandbox uid must traverse the sandbox dir, which pytest's private tmp_path forbids.
    sandbox_dir = resolve_sandbox_dir(tmp_path, None)
    backend = BubblewrapBackend(state_dir=sandbox_dir, sandbox_uid=61000, sandbox_gid=61000)
    config = WorkerConfig(
        sandbox_dir=sandbox_dir,
        memory_mb=memory_mb,
        python_executable=Path("/usr/bin/python3"),
        tmp_mb=64,
        pids_max=256,
        log_max_bytes=64 * 1024,
        init_timeout_s=10,
        prestart_pool_size=pool_size,
        idle_backstop_s=backstop_s,
    )
    worker = Worker(config, backend, code_source)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.close()
        shutil.rmtree(sandbox_dir, ignore_errors=True)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
