"""Receiving an uploaded package on disk, hashed and size-checked, without holding it in memory."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.packages.errors import PackageTooLarge


@dataclass
class SpooledPackage:
    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


async def spool_stream(
    chunks: AsyncIterator[bytes], tmp_dir: Path, *, max_bytes: int
) -> SpooledPackage:
    """Write an upload to a temporary file in ``tmp_dir``; nothing is left behind on failure."""
    with _spooling(tmp_dir, max_bytes) as spool:
        # Plain blocking writes: a chunk lands in the page cache in microseconds, less than a
        # hop to a worker thread would cost.
        async for chunk in chunks:
            spool.write(chunk)
    return spool.package()


def spool_bytes(data: bytes, tmp_dir: Path, *, max_bytes: int) -> SpooledPackage:
    """Like ``spool_stream``, for a package that arrived whole (base64 in a JSON body)."""
    if len(data) > max_bytes:
        raise _too_large(max_bytes)

    with _spooling(tmp_dir, max_bytes) as spool:
        spool.write(data)
    return spool.package()


class _Spool:
    def __init__(self, file: IO[bytes], max_bytes: int) -> None:
        self.file = file
        self.max_bytes = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise _too_large(self.max_bytes)
        self.digest.update(chunk)
        self.file.write(chunk)

    def package(self) -> SpooledPackage:
        return SpooledPackage(
            path=Path(self.file.name), sha256=self.digest.hexdigest(), size=self.size
        )


@contextmanager
def _spooling(tmp_dir: Path, max_bytes: int) -> Iterator[_Spool]:
    # delete=False: on success the file outlives this block and belongs to the caller.
    with tempfile.NamedTemporaryFile(
        dir=tmp_dir, prefix="upload-", suffix=".zip", delete=False
    ) as file:
        try:
            yield _Spool(file, max_bytes)
        except BaseException:
            file.close()
            Path(file.name).unlink(missing_ok=True)
            raise


def _too_large(max_bytes: int) -> PackageTooLarge:
    return PackageTooLarge(
        f"The package is larger than the limit of {max_bytes} bytes.", limit_bytes=max_bytes
    )
