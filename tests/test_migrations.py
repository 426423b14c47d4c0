"""Alembic's migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.db import create_engine
from app.migrate import upgrade_to_head
from app.models import Base
from app.settings import async_database_url


def schema_differences(url: str) -> list[object]:
    async def compare() -> list[object]:
        engine = create_engine(async_database_url(url))
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata)
            )
        await engine.dispose()
        return list(diff)

    return asyncio.run(compare())


def test_migrations_match_the_models_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    upgrade_to_head(async_database_url(url))

    assert schema_differences(url) == []


def test_migrations_match_the_models_on_postgresql(postgres_database: str) -> None:
    upgrade_to_head(async_database_url(postgres_database))

    assert schema_differences(postgres_database) == []


def test_migrations_can_run_twice(tmp_path: Path) -> None:
    url = async_database_url(f"sqlite:///{tmp_path / 'twice.db'}")
    upgrade_to_head(url)
    upgrade_to_head(url)

    assert schema_differences(url) == []
