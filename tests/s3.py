"""A real S3-protocol server for the tests: moto's, on loopback, one per test session."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from tests.support import free_port

REGION = "us-east-1"
# moto accepts any credentials; these only have to be the same everywhere.
ACCESS_KEY_ID = "lambent-test"
SECRET_ACCESS_KEY = "lambent-test-secret"


@dataclass
class MotoS3:
    endpoint_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @functools.cached_property
    def _client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            config=Config(s3={"addressing_style": "path"}),
        )

    def client(self) -> Any:
        return self._client

    def new_bucket(self) -> str:
        """An empty bucket of its own for one test."""
        name = f"lambent-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def settings_env(self, bucket: str) -> dict[str, str]:
        """The LAMBENT_* variables that point a `lambent serve` at ``bucket``."""
        return {
            "LAMBENT_OBJECT_STORE": "s3",
            "LAMBENT_S3_BUCKET": bucket,
            "LAMBENT_S3_ENDPOINT_URL": self.endpoint_url,
            "LAMBENT_S3_REGION": REGION,
            "LAMBENT_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "LAMBENT_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }


def _moto_server_command() -> str:
    beside_python = Path(sys.executable).parent / "moto_server"
    found = str(beside_python) if beside_python.exists() else shutil.which("moto_server")
    if found is None:
        pytest.fail("moto_server is missing: install the test extras (`pip install -e '.[test]'`)")
    return found


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """A `moto_server` subprocess speaking S3 on a free loopback port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [_moto_server_command(), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = MotoS3(f"http://127.0.0.1:{port}", process, log_path)
    try:
        _wait_until_up(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_up(server: MotoS3) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"moto_server exited early:\n{server.log_path.read_text()}")
        try:
            httpx.get(server.endpoint_url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not start:\n{server.log_path.read_text()}")
