from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from tests.support import (
    TEST_IMAGES,
    Server,
    Tenant,
    create_tenant,
    leftover_containers,
    remove_test_images,
    require_docker,
    start_server,
)

# The moto S3 server fixture, for the tests of the S3 object store and of several API processes.
pytest_plugins = ["tests.s3"]

ADMIN_KEY = f"lmbop_test_{uuid.uuid4().hex}"


def postgres_base_url() -> str:
    url = os.environ.get("LAMBENT_TEST_POSTGRES_URL")
    if not url:
        pytest.fail(
            "LAMBENT_TEST_POSTGRES_URL is not set: run the suite with `make test`, which starts "
            "PostgreSQL, or point the variable at a server where the role may create databases"
        )
    return url


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def _admin_sql(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; dropped afterwards."""
    base = postgres_base_url()
    name = f"lambent_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin_sql(base, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(base, name)
    finally:
        asyncio.run(_admin_sql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# The `server` variants every API test runs against, and those of the behavioural tests (marked
# `both_sandboxes`), which run once more with the Docker sandbox.
SERVERS = ["sqlite", "postgresql"]
BOTH_SANDBOXES = [*SERVERS, "docker"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_sandboxes: run the test against the Docker sandbox too, not only the process one",
    )
    config.addinivalue_line(
        "markers", "docker_only: run the test against the Docker sandbox's server alone"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames:
        variants = SERVERS
        if metafunc.definition.get_closest_marker("both_sandboxes") is not None:
            variants = BOTH_SANDBOXES
        if metafunc.definition.get_closest_marker("docker_only") is not None:
            variants = ["docker"]
        metafunc.parametrize("server", variants, indirect=True, scope="session")


@pytest.fixture(scope="session")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A running `lambent serve`: on SQLite, on PostgreSQL, or on SQLite with Docker sandboxes."""
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_database")
    sandbox = "docker" if request.param == "docker" else "process"
    if sandbox == "docker":
        require_docker()
    data_dir = tmp_path_factory.mktemp(f"server-{request.param}") / "data"
    running = start_server(
        data_dir,
        database_url=database_url,
        admin_key=ADMIN_KEY,
        database="postgresql" if database_url else "sqlite",
        sandbox=sandbox,
    )
    yield running
    running.stop()


@pytest.fixture(scope="session", autouse=True)
def no_containers_left_behind() -> Iterator[None]:
    """Fail the session if a test's Docker worker left a container behind once stopped."""
    yield
    leaked = leftover_containers()
    if TEST_IMAGES:
        remove_test_images()
    assert leaked == [], f"containers of test workers left behind: {leaked}"


def delete_functions(tenant: Tenant) -> None:
    """Delete a finished test's functions, so their instances stop and free the worker.

    The session's servers serve every test; warm instances left behind would fill the worker's
    memory and make later tests' starts evict idle instances.
    """
    try:
        listed = tenant.http.get("/v1/functions", params={"limit": 1000})
        for function in listed.json()["functions"] if listed.status_code == 200 else []:
            tenant.http.delete(f"/v1/functions/{function['name']}")
    except httpx.HTTPError:
        pass  # the server is gone: so are its instances


@pytest.fixture
def tenant(server: Server) -> Iterator[Tenant]:
    created = create_tenant(server)
    yield created
    delete_functions(created)
    created.http.close()


@pytest.fixture
def other_tenant(server: Server) -> Iterator[Tenant]:
    created = create_tenant(server)
    yield created
    delete_functions(created)
    created.http.close()
