"""The long-lived parts of a running control plane, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from app.db import Database
from app.packages.store import ObjectStore
from app.settings import Settings

if TYPE_CHECKING:
    from app.auth import KeyCache
    from app.functions.cache import FunctionCache
    from app.invocations.writer import InvocationWriter
    from app.scheduler.metrics import Metrics
    from app.scheduler.service import Scheduler
    from app.workers.service import WorkerRegistry
    from workers.agent import Worker


@dataclass
class Platform:
    settings: Settings
    db: Database
    store: ObjectStore
    scheduler: Scheduler
    worker: Worker | None  # the embedded worker, unless LAMBENT_EMBEDDED_WORKER is false
    workers: WorkerRegistry
    keys: KeyCache
    functions: FunctionCache
    metrics: Metrics
    writer: InvocationWriter | None = None  # set right after construction; it needs the platform


def get_platform(request: Request) -> Platform:
    return request.app.state.platform
