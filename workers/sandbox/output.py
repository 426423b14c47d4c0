"""A sandbox's stdout and stderr, read from a pipe on the worker's event loop."""

from __future__ import annotations

import asyncio
import os

from workers.sandbox.base import OutputHandler

READ_CHUNK = 64 * 1024


class OutputPipe:
    """Reads the read end of a pipe (or FIFO) as data arrives and hands it on, in order.

    Whatever arrives before a handler is set is kept for it. ``drain()`` reads what is already
    in the pipe at once, so that output written before a Runtime API reply is attributed to
    the invocation that reply ends: the runtime writes it before it replies, and the kernel
    keeps a pipe's bytes in order.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._handler: OutputHandler | None = None
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_readable)

    def set_handler(self, handler: OutputHandler) -> None:
        self._handler = handler
        for chunk in self._pending:
            handler(chunk)
        self._pending.clear()

    def _deliver(self, chunk: bytes) -> None:
        if self._handler is None:
            self._pending.append(chunk)
        else:
            self._handler(chunk)

    def _on_readable(self) -> None:
        try:
            chunk = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self._deliver(chunk)
        else:
            self.close()

    def drain(self) -> None:
        while self._fd >= 0:
            try:
                chunk = os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                return
            self._deliver(chunk)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
