"""A `lambent serve` whose packages live in S3 (moto) rather than in its data dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY
from tests.s3 import MotoS3
from tests.support import Server, create_tenant, start_server

HANDLER = """
def handler(event, context):
    return {"greeting": "hello " + event["name"]}
"""


@pytest.fixture(scope="module")
def bucket(moto_s3: MotoS3) -> str:
    return moto_s3.new_bucket()


@pytest.fixture(scope="module")
def s3_server(
    moto_s3: MotoS3, bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("s3-server") / "data"
    running = start_server(data_dir, admin_key=ADMIN_KEY, env=moto_s3.settings_env(bucket))
    yield running
    running.stop()


def test_function_code_goes_to_the_bucket_runs_from_it_and_leaves_with_the_function(
    s3_server: Server, moto_s3: MotoS3, bucket: str
) -> None:
    tenant = create_tenant(s3_server)

    created = tenant.deploy("greeter", HANDLER)
    key = f"packages/{created['code_sha256']}"
    assert moto_s3.keys(bucket) == [key]
    # Nothing local to fall back on: the worker can only have the code from the bucket.
    assert not (s3_server.data_dir / "packages").exists()

    response = tenant.invoke("greeter", {"name": "ada"})
    assert response.status_code == 200, response.text
    assert "x-function-error" not in response.headers, response.text
    assert response.json() == {"greeting": "hello ada"}

    deleted = tenant.http.delete("/v1/functions/greeter")
    assert deleted.status_code == 204, deleted.text
    assert moto_s3.keys(bucket) == []
    tenant.http.close()


def test_a_package_two_functions_share_stays_until_the_last_one_is_deleted(
    s3_server: Server, moto_s3: MotoS3, bucket: str
) -> None:
    tenant = create_tenant(s3_server)
    first = tenant.deploy("first", HANDLER)
    tenant.deploy("second", HANDLER)
    key = f"packages/{first['code_sha256']}"

    assert tenant.http.delete("/v1/functions/first").status_code == 204
    assert key in moto_s3.keys(bucket)
    assert tenant.invoke("second", {"name": "bo"}).json() == {"greeting": "hello bo"}

    assert tenant.http.delete("/v1/functions/second").status_code == 204
    assert key not in moto_s3.keys(bucket)
    tenant.http.close()


def test_unusable_bucket_stops_the_server_at_start_with_the_setting_to_fix(
    moto_s3: MotoS3, tmp_path: Path
) -> None:
    env = moto_s3.settings_env("lambent-no-such-bucket")

    with pytest.raises(RuntimeError, match="LAMBENT_S3_BUCKET"):
        start_server(tmp_path / "data", admin_key=ADMIN_KEY, env=env)
