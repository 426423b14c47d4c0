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
    api_workers: int = Field(
        1,
        ge=1,
        description="API processes `lambent serve` runs (--workers). More than one needs "
        "LAMBENT_EMBEDDED_WORKER=false: an embedded worker belongs to one process.",
    )
    log_format: Literal["console", "json"] = "console"
    log_level: str = "info"

    # Object store for packages.
    object_store: Literal["local", "s3"] = Field(
        "local",
        description="'local' keeps packages in <data_dir>/packages; 's3' in a bucket that every "
        "API process shares.",
    )
    s3_bucket: str | None = Field(None, description="Bucket of the 's3' object store.")
    s3_prefix: str = Field("packages", description="Key prefix of packages in the bucket.")
    s3_endpoint_url: str | None = Field(
        None, description="e.g. http://minio:9000; unset for Amazon S3."
    )
    s3_region: str | None = Field(None, description="The bucket's region; unset: boto3's default.")
    s3_access_key_id: str | None = Field(
        None, description="With the secret key; both unset: boto3's credential chain."
    )
    s3_secret_access_key: SecretStr | None = None

    # Execution side.
    sandbox: Literal["process", "docker"] = Field(
        "process",
        description="Sandbox backend of this host's worker: 'process' runs bubblewrap sandboxes; "
        "'docker' runs a container per instance on the Docker engine (DOCKER_HOST, or its local "
        "socket), from the images `lambent images build` makes.",
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
        Path("/usr/bin/python3"),
        description="Interpreter of the python3.11 runtime (process sandbox; the Docker sandbox "
        "uses its image's).",
    )
    node_executable: Path = Field(
        Path("/usr/bin/node"),
        description="Node.js 20 of the nodejs20.x runtime (process sandbox; the Docker sandbox "
        "uses its image's, which `lambent images build` copies from this path).",
    )
    worker_memory_mb: int = Field(
        default_factory=_default_worker_memory_mb,
        description="Instance memory this host's worker (embedded or `lambent worker`) may place.",
    )

    # Workers on other hosts.
    embedded_worker: bool = Field(
        True, description="Run a worker inside `lambent serve`; false for an API of remote ones."
    )
    worker_token: SecretStr | None = Field(
        None,
        description="Shared secret between the control plane and its remote workers, sent as a "
        "bearer key both ways. Required by `lambent worker`; unset, the API takes no workers.",
    )
    heartbeat_s: float = Field(1.0, description="How often a remote worker reports to the API.")
    worker_dead_after_s: float = Field(
        5.0,
        description="A remote worker silent this long is declared dead: its instances leave the "
        "pool and its invocations in flight fail with WorkerLostException.",
    )
    api_dead_after_s: float = Field(
        5.0,
        description="An API process silent this long (it heartbeats every LAMBENT_HEARTBEAT_S) "
        "no longer counts: its invocations stop counting against concurrency limits, and "
        "provisioned concurrency is divided among the others.",
    )
    worker_drain_s: float = Field(
        30.0, description="How long a stopping worker lets running invocations finish."
    )
    control_plane_url: str | None = Field(
        None, description="Where `lambent worker` registers, e.g. http://10.0.0.1:8080."
    )
    worker_listen: str = Field("127.0.0.1:8081", description="HOST:PORT `lambent worker` serves.")
    worker_advertise: str | None = Field(
        None,
        description="HOST:PORT the control plane reaches the worker at; the listen address "
        "when unset.",
    )
    worker_id: str | None = Field(
        None, description="A remote worker's id; generated once and kept in the data dir if unset."
    )
    worker_cpus: int = Field(
        default_factory=lambda: os.cpu_count() or 1, description="CPUs a remote worker reports."
    )
    keepalive_s: float = Field(
        300.0,
        description="Idle instances are stopped after this. A worker stops an instance idle for "
        "this plus a margin (half of it, 1 to 60 s) itself, in case the API process that started "
        "it is gone; so set it alike for the API and its workers.",
    )
    prestart_pool_size: int = Field(
        2,
        ge=0,
        description="Sandboxes each worker keeps pre-started per runtime, so that a cold start "
        "only loads the function's code; 0 keeps none. Each holds 128 MB of the worker's memory "
        "until a function takes it, and gives it up when an instance needs it.",
    )
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

    # Metering and billing.
    metering_enabled: bool = Field(
        True,
        description="Write a usage record per invocation. Off only to measure what metering "
        "costs: invocations are then not billed.",
    )
    metering_settle_s: float = Field(
        120.0,
        description="How long after its time a usage record may still be committed. Rollups "
        "and invoice finalisation wait this long after a minute or a billing period ends.",
    )
    rollup_interval_s: float = Field(10.0, description="How often usage is rolled up.")
    budget_check_interval_s: float = Field(
        2.0, description="How often budgets of tenants with new usage are checked."
    )
    billing_sweep_interval_s: float = Field(
        300.0, description="How often invoices of ended billing periods are finalised."
    )

    invoke_fast_path: bool = Field(
        True,
        description="Serve synchronous invocations ahead of FastAPI's router (same answers, "
        "less overhead). Off, the FastAPI route serves them; kept to compare the two.",
    )

    # Limits of the public API.
    max_payload_bytes: int = 6 * 1024 * 1024
    max_zipped_bytes: int = 50 * 1024 * 1024
    max_unzipped_bytes: int = 250 * 1024 * 1024
    max_image_bytes: int = Field(
        2 * 1024**3,
        description="Largest container image archive (`docker save` output) a function may be "
        "created from. Lambda allows 10 GB; uploads here pass through the API process and the "
        "object store, so the default is 2 GB.",
    )
    image_reference_patterns: str = Field(
        "lambent-functions/*",
        description="Comma-separated patterns (fnmatch) of the image references that functions "
        "may name, for images an operator put on the workers. Tenants see nothing else of the "
        "engine's images: not the platform's, and not another tenant's uploaded ones.",
    )

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
