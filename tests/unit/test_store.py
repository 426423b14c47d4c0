"""The local object store, on a real directory."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from app.packages.errors import BlobNotFound
from app.packages.store import LocalObjectStore

CONTENT = b"PK\x05\x06" + bytes(18)
SHA256 = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    root = tmp_path / "blobs"
    root.mkdir()
    return LocalObjectStore(root)


@pytest.fixture
def upload(tmp_path: Path) -> Path:
    path = tmp_path / "upload.zip"
    path.write_bytes(CONTENT)
    return path


def files_below(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_then_get_returns_the_same_bytes(
    store: LocalObjectStore, upload: Path, tmp_path: Path
) -> None:
    asyncio.run(store.put_file(SHA256, upload))
    asyncio.run(store.get_to_file(SHA256, tmp_path / "copy.zip"))

    assert (tmp_path / "copy.zip").read_bytes() == CONTENT


def test_blob_is_stored_below_its_first_two_hex_digits(
    store: LocalObjectStore, upload: Path
) -> None:
    asyncio.run(store.put_file(SHA256, upload))

    assert files_below(store.root) == [f"{SHA256[:2]}/{SHA256}"]


def test_exists_is_false_before_put_and_true_after(store: LocalObjectStore, upload: Path) -> None:
    assert asyncio.run(store.exists(SHA256)) is False

    asyncio.run(store.put_file(SHA256, upload))

    assert asyncio.run(store.exists(SHA256)) is True


def test_putting_the_same_blob_twice_keeps_one_copy(store: LocalObjectStore, upload: Path) -> None:
    asyncio.run(store.put_file(SHA256, upload))
    asyncio.run(store.put_file(SHA256, upload))

    assert files_below(store.root) == [f"{SHA256[:2]}/{SHA256}"]


def test_put_under_the_wrong_digest_is_refused_and_leaves_nothing(
    store: LocalObjectStore, upload: Path
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(ValueError, match=SHA256):
        asyncio.run(store.put_file(wrong, upload))

    assert files_below(store.root) == []
    assert asyncio.run(store.exists(wrong)) is False


def test_get_of_a_missing_blob_raises_blob_not_found(
    store: LocalObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(BlobNotFound, match=SHA256):
        asyncio.run(store.get_to_file(SHA256, tmp_path / "copy.zip"))

    assert not (tmp_path / "copy.zip").exists()


def test_get_of_a_damaged_blob_raises_blob_not_found_and_writes_nothing(
    store: LocalObjectStore, upload: Path, tmp_path: Path
) -> None:
    asyncio.run(store.put_file(SHA256, upload))
    (store.root / SHA256[:2] / SHA256).write_bytes(b"bit rot")
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(BlobNotFound, match="damaged"):
        asyncio.run(store.get_to_file(SHA256, out / "copy.zip"))

    assert list(out.iterdir()) == []


def test_delete_removes_the_blob(store: LocalObjectStore, upload: Path) -> None:
    asyncio.run(store.put_file(SHA256, upload))

    asyncio.run(store.delete(SHA256))

    assert asyncio.run(store.exists(SHA256)) is False
    assert files_below(store.root) == []


def test_deleting_a_missing_blob_is_not_an_error(store: LocalObjectStore) -> None:
    asyncio.run(store.delete(SHA256))

    assert asyncio.run(store.exists(SHA256)) is False


@pytest.mark.parametrize(
    "digest",
    [
        "../" + "a" * 61,
        SHA256.upper(),
        SHA256[:63],
        SHA256 + "0",
        SHA256 + "\n",
        "",
    ],
    ids=["traversal", "uppercase", "short", "long", "newline", "empty"],
)
def test_malformed_digest_is_refused_before_touching_the_disk(
    store: LocalObjectStore, upload: Path, digest: str
) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        asyncio.run(store.put_file(digest, upload))
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        asyncio.run(store.exists(digest))

    assert list(store.root.iterdir()) == []
