"""The object store: package blobs, addressed by the SHA-256 of their content.

``ObjectStore`` is the seam between the control plane and wherever blobs live. Because a
blob's name is its hash, writes are idempotent and a blob never changes once written.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from app.packages.errors import BlobNotFound

if TYPE_CHECKING:
    from app.settings import Settings

_CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ObjectStore(Protocol):
    async def put_file(self, sha256: str, path: Path) -> None:
        """Store the bytes of ``path`` under ``sha256``, which the caller has computed."""
        ...

    async def get_to_file(self, sha256: str, dest: Path) -> None:
        """Write the blob to ``dest``; raise ``BlobNotFound`` if the store does not hold it."""
        ...

    async def exists(self, sha256: str) -> bool: ...

    async def delete(self, sha256: str) -> None:
        """Remove the blob; removing one that is not there is not an error."""
        ...


async def open_object_store(settings: Settings) -> ObjectStore:
    """The store ``LAMBENT_OBJECT_STORE`` names, checked to be usable."""
    if settings.object_store == "s3":
        # Imported here: boto3 takes a moment to load, and the local store does not need it.
        from app.packages.s3 import S3ObjectStore

        s3 = S3ObjectStore.from_settings(settings)
        await s3.check()
        return s3

    return LocalObjectStore(settings.data_dir / "packages")


class LocalObjectStore:
    """Blobs as files below one directory, at ``<root>/<first two hex digits>/<sha256>``.

    Each write goes to a temporary file in ``root`` and is renamed into place, so a reader
    sees a whole blob or none. A process killed mid-write leaves a ``.put-*`` file in ``root``
    that nothing reads; it is safe to delete.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    async def put_file(self, sha256: str, path: Path) -> None:
        blob = self._blob_path(sha256)
        await asyncio.to_thread(self._put, sha256, blob, path)

    async def get_to_file(self, sha256: str, dest: Path) -> None:
        blob = self._blob_path(sha256)
        await asyncio.to_thread(self._get, sha256, blob, dest)

    async def exists(self, sha256: str) -> bool:
        blob = self._blob_path(sha256)
        return await asyncio.to_thread(blob.is_file)

    async def delete(self, sha256: str) -> None:
        blob = self._blob_path(sha256)
        await asyncio.to_thread(blob.unlink, missing_ok=True)

    def _blob_path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / check_digest(sha256)

    def _put(self, sha256: str, blob: Path, path: Path) -> None:
        if blob.is_file():
            return

        blob.parent.mkdir(parents=True, exist_ok=True)
        with path.open("rb") as src:
            # Checked while copying, because a blob stored under the wrong name would be
            # handed out for some other package later.
            copy_verified(src, blob, sha256, tmp_dir=self.root, prefix=".put-", fsync=True)

    def _get(self, sha256: str, blob: Path, dest: Path) -> None:
        try:
            src = blob.open("rb")
        except FileNotFoundError:
            raise missing_blob(sha256) from None

        with src:
            try:
                copy_verified(src, dest, sha256, tmp_dir=dest.parent, prefix=f".{dest.name}.tmp-")
            except DigestMismatch as exc:
                raise damaged_blob(sha256, exc) from exc


def check_digest(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits, else raise ``ValueError``."""
    # The digest becomes a path or an object key: anything else could point elsewhere.
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"{sha256!r} is not a SHA-256 digest in lowercase hex.")
    return sha256


def missing_blob(sha256: str) -> BlobNotFound:
    return BlobNotFound(f"Package {sha256} is missing from the object store.", sha256=sha256)


def damaged_blob(sha256: str, mismatch: DigestMismatch) -> BlobNotFound:
    return BlobNotFound(
        f"Package {sha256} is damaged in the object store: its content hashes to "
        f"{mismatch.actual}.",
        sha256=sha256,
    )


class DigestMismatch(ValueError):
    """The bytes do not hash to the digest they are stored under: a caller's bug on put."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"The content hashes to {actual}, not {expected}.")
        self.actual = actual


def copy_verified(
    src: BinaryIO, dest: Path, sha256: str, *, tmp_dir: Path, prefix: str, fsync: bool = False
) -> None:
    """Copy ``src`` to ``dest`` through a temporary file, renaming it only if the hash matches."""
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=prefix)
    try:
        digest = hashlib.sha256()
        with open(fd, "wb") as out:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise DigestMismatch(sha256, digest.hexdigest())
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
