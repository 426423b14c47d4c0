"""Package blobs in an S3 bucket: Amazon S3, MinIO, or anything else that speaks the protocol.

Every API process on the bucket sees the same packages, which is what lets several of them share
one database. Objects are keyed ``<prefix>/<sha256>``.

boto3 is synchronous, so each call runs in a thread of the store's own pool. That costs a thread
hop per call, which is nothing beside the network round trip, and it keeps boto3's transfer
manager: uploads above ``MULTIPART_THRESHOLD_BYTES`` go up in parts read straight from the file.
The pool is the store's own so that slow transfers cannot use up the event loop's default
executor, which the rest of the control plane shares.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.errors import ServiceUnavailable
from app.logging import get_logger
from app.packages.store import (
    DigestMismatch,
    check_digest,
    copy_verified,
    damaged_blob,
    missing_blob,
)

if TYPE_CHECKING:
    from app.settings import Settings

log = get_logger(__name__)

MULTIPART_THRESHOLD_BYTES = 16 * 1024 * 1024
PART_BYTES = 8 * 1024 * 1024
# Parts in flight per upload; each holds at most one part's buffers, so this bounds memory too.
UPLOAD_THREADS = 4
# Store calls in flight at once; more wait their turn.
STORE_THREADS = 16
_READ_BYTES = 1024 * 1024
_MISSING_KEY_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class ObjectStoreUnavailable(ServiceUnavailable):
    """The object store did not answer, or refused a request Lambent is entitled to make."""


class S3ObjectStore:
    """An ``ObjectStore`` on one bucket.

    Writes are atomic in S3 itself: an object appears whole when its upload completes, and a
    failed multipart upload is aborted. A process killed mid-upload leaves unfinished parts
    that no reader sees; a bucket lifecycle rule that aborts incomplete multipart uploads after
    a day reclaims them.
    """

    def __init__(self, client: Any, bucket: str, prefix: str = "packages") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES,
            multipart_chunksize=PART_BYTES,
            max_concurrency=UPLOAD_THREADS,
        )
        self._threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="s3-store")

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ObjectStore:
        if not settings.s3_bucket:
            raise ValueError("LAMBENT_S3_BUCKET must be set when LAMBENT_OBJECT_STORE is 's3'.")
        secret = settings.s3_secret_access_key
        if bool(settings.s3_access_key_id) != bool(secret):
            raise ValueError(
                "Set both LAMBENT_S3_ACCESS_KEY_ID and LAMBENT_S3_SECRET_ACCESS_KEY, or neither "
                "to use boto3's credential chain."
            )
        client = s3_client(
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
        return cls(client, settings.s3_bucket, settings.s3_prefix)

    def key(self, sha256: str) -> str:
        check_digest(sha256)
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    async def check(self) -> None:
        """Fail now, with the settings to look at, if the bucket cannot be used."""
        try:
            await self._in_thread(self.client.head_bucket, Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise ObjectStoreUnavailable(
                f"The S3 bucket {self.bucket!r} cannot be used: {exc}. Check LAMBENT_S3_BUCKET, "
                "LAMBENT_S3_ENDPOINT_URL, LAMBENT_S3_REGION and the credentials.",
                bucket=self.bucket,
            ) from exc

    async def put_file(self, sha256: str, path: Path) -> None:
        key = self.key(sha256)
        await self._call("put", sha256, self._put, sha256, key, path)

    async def get_to_file(self, sha256: str, dest: Path) -> None:
        key = self.key(sha256)
        await self._call("get", sha256, self._get, sha256, key, dest)

    async def exists(self, sha256: str) -> bool:
        key = self.key(sha256)
        return await self._call("exists", sha256, self._exists, key)

    async def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        # S3 answers a delete of a missing key with success, as the protocol asks.
        await self._call("delete", sha256, self.client.delete_object, Bucket=self.bucket, Key=key)

    async def _call(self, operation: str, sha256: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._in_thread(fn, *args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            log.warning(
                "object store request failed; check the LAMBENT_S3_* settings and the store",
                operation=operation,
                bucket=self.bucket,
                sha256=sha256,
                error=str(exc),
            )
            raise ObjectStoreUnavailable(
                f"The object store failed to {operation} package {sha256}.",
                sha256=sha256,
            ) from exc

    async def _in_thread(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args, **kwargs))

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_KEY_CODES:
                return False
            raise
        return True

    def _put(self, sha256: str, key: str, path: Path) -> None:
        if self._exists(key):
            return

        # Checked before uploading, because a blob stored under the wrong name would be handed
        # out for some other package later. Reading the file twice is cheap: it was just
        # written, so it sits in the page cache, and puts happen only on deploys.
        actual = file_sha256(path)
        if actual != sha256:
            raise DigestMismatch(sha256, actual)
        self.client.upload_file(str(path), self.bucket, key, Config=self.transfer)

    def _get(self, sha256: str, key: str, dest: Path) -> None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            # NoSuchBucket is not a missing blob: it stays an error of the store.
            if _error_code(exc) in _MISSING_KEY_CODES:
                raise missing_blob(sha256) from None
            raise

        body = response["Body"]
        try:
            copy_verified(body, dest, sha256, tmp_dir=dest.parent, prefix=f".{dest.name}.tmp-")
        except DigestMismatch as exc:
            raise damaged_blob(sha256, exc) from exc
        finally:
            body.close()


def s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> Any:
    """A thread-safe S3 client; without explicit keys it uses boto3's credential chain."""
    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=32,
        # A custom endpoint (MinIO) usually has no wildcard DNS for bucket.host names, so
        # buckets go in the path there; Amazon S3 keeps boto3's own choice.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    # A session of its own: boto3's default session is shared and not thread-safe to set up.
    session = boto3.session.Session(
        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
