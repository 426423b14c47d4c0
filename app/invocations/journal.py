"""An append-only file of invocation records that are not yet committed to SQLite.

Each line is one invocation: its row and its usage row, as JSON lists of the values SQLite
stores. A line is appended with one write(2) before the caller is answered; the kernel has it
from then on, so it survives the process being killed, which is the same promise SQLite makes
with synchronous=NORMAL. Once everything appended is committed, the file is emptied.

Each API process has its own file and holds an exclusive flock on it while it lives. A process
starting up takes over the files nobody holds (their owners died) and commits what they hold:
a line may already be committed (the owner died between its commit and emptying the file), so
recovery inserts nothing twice, keyed by request id.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.logging import get_logger

log = get_logger(__name__)

SUFFIX = ".jsonl"
# Emptied once everything in it is committed and it is at least this large, so that a file
# that is emptied after every commit does not cost a system call each time.
EMPTY_AFTER_BYTES = 1024 * 1024

Entry = tuple[list[Any], list[Any] | None]  # invocation values, usage values (None: unmetered)


class Journal:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / f"{uuid.uuid4().hex}{SUFFIX}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._size = 0

    def append(self, entry: Entry) -> None:
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(line)

    def all_committed(self) -> None:
        """Everything appended so far is in the database."""
        if self._size >= EMPTY_AFTER_BYTES:
            os.ftruncate(self._fd, 0)
            self._size = 0

    def close(self, *, committed: bool) -> None:
        """Close the file; remove it only if everything in it was committed."""
        if committed:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self._fd)


def orphans(directory: Path) -> Iterator[tuple[Path, list[Entry]]]:
    """The files of dead processes, with their entries; the caller removes each once committed.

    A file is yielded while this process holds its lock, so no other process takes it too.
    """
    if not directory.is_dir():
        return
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # taken and removed by another process meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process's own
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            yield path, _entries(path, data)
        finally:
            os.close(fd)


def _entries(path: Path, data: bytes) -> list[Entry]:
    entries: list[Entry] = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            invocation, usage = json.loads(line)
        except ValueError:
            # Only the last line can be cut short, by a disk that filled up mid-write.
            log.warning("skipping an unreadable journal line", path=str(path), line=number)
            continue
        entries.append((invocation, usage))
    return entries
