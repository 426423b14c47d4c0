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
    from app.scheduler.metrics import Metrics
    from app.scheduler.service import Scheduler
    from workers.agent import Worker


@dataclass
class Platform:
    settings: Settings
    db: Database
    store: ObjectStore
    scheduler: Scheduler
    worker: Worker
    keys: KeyCache
    functions: FunctionCache
    metrics: Metrics


def get_platform(request: Request) -> Platform:
    return request.app.state.platform
