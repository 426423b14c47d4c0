"""One typed settings object, read from ``LAMBENT_*`` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_worker_memory_mb() -> int:
    # Leave a quarter of the host (at least 512 MB) to the platform and the operating system.
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return max(512, min(total_mb * 3 // 4, total_mb - 512))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBENT_", extra="ignore")

    data_dir: Path = Field(Path("./.lambent"), description="Database, packages and code cache.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; SQLite in the data dir when unset."
    )
    admin_key: SecretStr | None = Field(
        None, description="The operator's key; generated and printed once on first start if unset."
    )
    region: str = Field("local", description="Reported to functions as AWS_REGION.")
    host: str = "127.0.0.1"
    port: int = 8080
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"

    # Execution side.
    sandbox: Literal["process"] = Field(
        "process", description="Sandbox backend: 'process' runs bubblewrap sandboxes."
    )
    sandbox_dir: Path | None = Field(
        None,
        description="Where sandbox-visible files live (code cache, sockets). Must be traversable "
        "by the sandbox uid; defaults to <data_dir>/sandbox, or /var/lib/lambent/... when the data "
        "dir sits below a private directory.",
    )
    sandbox_uid: int = Field(61000, description="Unprivileged host uid that sandboxes run as.")
    sandbox_gid: int = 61000
    python_executable: Path = Field(
        Path("/usr/bin/python3"), description="Interpreter of the python3.11 runtime."
    )
    worker_memory_mb: int = Field(
        default_factory=_default_worker_memory_mb,
        description="Instance memory the embedded worker may place.",
    )
    keepalive_s: float = Field(300.0, description="Idle instances are stopped after this.")
    tenant_concurrency_limit: int = Field(
        100, description="Concurrent invocations per tenant unless the operator sets another."
    )
    capacity_wait_s: float = Field(
        10.0, description="How long an invocation waits for a worker with room before 503."
    )
    init_timeout_s: float = Field(10.0, description="Longest a runtime may take to initialise.")
    tmp_mb: int = Field(512, description="Size cap of each instance's /tmp (counts as memory).")
    pids_max: int = Field(1024, description="Processes and threads per instance.")
    log_max_bytes: int = Field(256 * 1024, description="Log bytes kept per invocation.")

    # Limits of the public API.
    max_payload_bytes: int = 6 * 1024 * 1024
    max_zipped_bytes: int = 50 * 1024 * 1024
    max_unzipped_bytes: int = 250 * 1024 * 1024

    @property
    def resolved_database_url(self) -> str:
        url = self.database_url or f"sqlite:///{(self.data_dir / 'lambent.db').resolve()}"
        return async_database_url(url)


def async_database_url(url: str) -> str:
    """Map a plain SQLAlchemy URL onto the async driver Lambent uses for it."""
    for plain, async_scheme in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql+psycopg://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return async_scheme + url[len(plain) :]
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()
