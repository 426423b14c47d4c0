"""The S3 object store, against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from app.packages.errors import BlobNotFound
from app.packages.s3 import ObjectStoreUnavailable, S3ObjectStore
from app.settings import Settings
from tests.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, MotoS3
from tests.support import free_port

CONTENT = b"PK\x05\x06" + bytes(18)
SHA256 = hashlib.sha256(CONTENT).hexdigest()
LARGE_MB = 60


def s3_settings(moto_s3: MotoS3, bucket: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "object_store": "s3",
        "s3_bucket": bucket,
        "s3_endpoint_url": moto_s3.endpoint_url,
        "s3_region": REGION,
        "s3_access_key_id": ACCESS_KEY_ID,
        "s3_secret_access_key": SECRET_ACCESS_KEY,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    return moto_s3.new_bucket()


@pytest.fixture
def store(moto_s3: MotoS3, bucket: str, tmp_path: Path) -> S3ObjectStore:
    return S3ObjectStore.from_settings(s3_settings(moto_s3, bucket, tmp_path))


@pytest.fixture
def upload(tmp_path: Path) -> Path:
    path = tmp_path / "upload.zip"
    path.write_bytes(CONTENT)
    return path


def test_put_then_get_returns_the_same_bytes(
    store: S3ObjectStore, upload: Path, tmp_path: Path
) -> None:
    asyncio.run(store.put_file(SHA256, upload))
    asyncio.run(store.get_to_file(SHA256, tmp_path / "copy.zip"))

    assert (tmp_path / "copy.zip").read_bytes() == CONTENT


def test_blob_is_stored_under_the_prefix_and_its_digest(
    moto_s3: MotoS3, bucket: str, upload: Path, tmp_path: Path
) -> None:
    store = S3ObjectStore.from_settings(
        s3_settings(moto_s3, bucket, tmp_path, s3_prefix="/lambent/packages/")
    )

    asyncio.run(store.put_file(SHA256, upload))

    assert moto_s3.keys(bucket) == [f"lambent/packages/{SHA256}"]


def test_exists_is_false_before_put_and_true_after(store: S3ObjectStore, upload: Path) -> None:
    assert asyncio.run(store.exists(SHA256)) is False

    asyncio.run(store.put_file(SHA256, upload))

    assert asyncio.run(store.exists(SHA256)) is True


def test_putting_the_same_blob_twice_keeps_one_object(
    store: S3ObjectStore, moto_s3: MotoS3, bucket: str, upload: Path
) -> None:
    asyncio.run(store.put_file(SHA256, upload))
    first = moto_s3.client().head_object(Bucket=bucket, Key=store.key(SHA256))
    asyncio.run(store.put_file(SHA256, upload))

    assert moto_s3.keys(bucket) == [store.key(SHA256)]
    second = moto_s3.client().head_object(Bucket=bucket, Key=store.key(SHA256))
    assert second["LastModified"] == first["LastModified"]


def test_put_under_the_wrong_digest_is_refused_and_stores_nothing(
    store: S3ObjectStore, moto_s3: MotoS3, bucket: str, upload: Path
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(ValueError, match=SHA256):
        asyncio.run(store.put_file(wrong, upload))

    assert moto_s3.keys(bucket) == []


def test_get_of_a_missing_blob_raises_blob_not_found(store: S3ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound, match="missing"):
        asyncio.run(store.get_to_file(SHA256, tmp_path / "copy.zip"))

    assert not (tmp_path / "copy.zip").exists()


def test_get_of_a_damaged_blob_raises_blob_not_found_and_writes_nothing(
    store: S3ObjectStore, moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    moto_s3.client().put_object(Bucket=bucket, Key=store.key(SHA256), Body=b"bit rot")
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(BlobNotFound, match="damaged"):
        asyncio.run(store.get_to_file(SHA256, out / "copy.zip"))

    assert list(out.iterdir()) == []


def test_delete_removes_the_object(
    store: S3ObjectStore, moto_s3: MotoS3, bucket: str, upload: Path
) -> None:
    asyncio.run(store.put_file(SHA256, upload))

    asyncio.run(store.delete(SHA256))

    assert asyncio.run(store.exists(SHA256)) is False
    assert moto_s3.keys(bucket) == []


def test_deleting_a_missing_blob_is_not_an_error(store: S3ObjectStore) -> None:
    asyncio.run(store.delete(SHA256))

    assert asyncio.run(store.exists(SHA256)) is False


@pytest.mark.parametrize(
    "digest",
    ["../" + "a" * 61, SHA256.upper(), SHA256[:63], SHA256 + "\n", ""],
    ids=["traversal", "uppercase", "short", "newline", "empty"],
)
def test_malformed_digest_is_refused_before_any_request(
    store: S3ObjectStore, moto_s3: MotoS3, bucket: str, upload: Path, digest: str
) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        asyncio.run(store.put_file(digest, upload))
    with pytest.raises(ValueError, match="not a SHA-256 digest"):
        asyncio.run(store.exists(digest))

    assert moto_s3.keys(bucket) == []


def test_large_package_streams_both_ways_without_being_held_in_memory(
    store: S3ObjectStore, moto_s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    large = tmp_path / "large.zip"
    digest = hashlib.sha256()
    with large.open("wb") as out:
        for _ in range(LARGE_MB):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            out.write(chunk)
    sha256 = digest.hexdigest()
    # A third of the package: whole-file buffering anywhere on the path would exceed it.
    limit = LARGE_MB * 1024 * 1024 // 3

    put_peak = _peak_allocated_bytes(lambda: asyncio.run(store.put_file(sha256, large)))
    get_peak = _peak_allocated_bytes(
        lambda: asyncio.run(store.get_to_file(sha256, tmp_path / "copy.zip"))
    )

    assert put_peak < limit, f"put held {put_peak} bytes at once"
    assert get_peak < limit, f"get held {get_peak} bytes at once"
    assert (tmp_path / "copy.zip").stat().st_size == LARGE_MB * 1024 * 1024
    # An ETag ending in -<parts> is S3's mark of a multipart upload.
    head = moto_s3.client().head_object(Bucket=bucket, Key=store.key(sha256))
    assert head["ETag"].strip('"').endswith("-8")


def test_a_missing_bucket_is_a_store_failure_not_a_missing_package(
    moto_s3: MotoS3, tmp_path: Path
) -> None:
    store = S3ObjectStore.from_settings(s3_settings(moto_s3, "lambent-no-such-bucket", tmp_path))

    with pytest.raises(ObjectStoreUnavailable, match="LAMBENT_S3_BUCKET"):
        asyncio.run(store.check())
    with pytest.raises(ObjectStoreUnavailable):
        asyncio.run(store.get_to_file(SHA256, tmp_path / "copy.zip"))


def test_an_unreachable_endpoint_is_a_store_failure() -> None:
    # Nothing listens on a fresh free port. One attempt: the retries with back-off that
    # production wants would only slow this test down.
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2),
    )
    store = S3ObjectStore(client, "lambent")

    with pytest.raises(ObjectStoreUnavailable, match=SHA256):
        asyncio.run(store.exists(SHA256))


def test_settings_without_a_bucket_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LAMBENT_S3_BUCKET"):
        S3ObjectStore.from_settings(Settings(data_dir=tmp_path, object_store="s3"))


def test_settings_with_half_the_credentials_are_refused(moto_s3: MotoS3, tmp_path: Path) -> None:
    settings = s3_settings(moto_s3, "lambent", tmp_path, s3_secret_access_key=None)

    with pytest.raises(ValueError, match="LAMBENT_S3_SECRET_ACCESS_KEY"):
        S3ObjectStore.from_settings(settings)


def _peak_allocated_bytes(action: Any) -> int:
    """The most memory Python held at once during ``action``, above what it held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
