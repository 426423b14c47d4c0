from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support import Server, Tenant, create_tenant, start_server

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


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A running `lambent serve`, once on SQLite and once on PostgreSQL."""
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_database")
    data_dir = tmp_path_factory.mktemp(f"server-{request.param}") / "data"
    running = start_server(
        data_dir, database_url=database_url, admin_key=ADMIN_KEY, database=request.param
    )
    yield running
    running.stop()


@pytest.fixture
def tenant(server: Server) -> Iterator[Tenant]:
    created = create_tenant(server)
    yield created
    created.http.close()


@pytest.fixture
def other_tenant(server: Server) -> Iterator[Tenant]:
    created = create_tenant(server)
    yield created
    created.http.close()
