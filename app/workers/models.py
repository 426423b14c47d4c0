from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Boolean, Integer, String, false
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class WorkerStatus(StrEnum):
    ACTIVE = "active"  # registered, and heartbeating as far as any API process knows
    DEAD = "dead"  # silent past LAMBENT_WORKER_DEAD_AFTER_S; it must register again


class WorkerRecord(Base):
    """A remote worker, as every API process sees it.

    Whichever API process receives a registration or a heartbeat writes it here, and every API
    process reads the table to decide which workers it uses (app/workers/service.py).
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    # New on every start of the worker: a heartbeat of another boot is refused.
    boot_id: Mapped[str] = mapped_column(String(64), server_default="")
    capacity_mb: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[int] = mapped_column(Integer)
    sandbox: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), server_default=WorkerStatus.ACTIVE.value)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # As of the last heartbeat: memory reserved by instances (and the worker's sequence number
    # of that snapshot), memory of idle instances it would stop to make room, instance counts.
    reserved_mb: Mapped[int] = mapped_column(Integer, server_default="0")
    reserved_seq: Mapped[int] = mapped_column(BigInteger, server_default="0")
    idle_mb: Mapped[int] = mapped_column(Integer, server_default="0")
    instances_initializing: Mapped[int] = mapped_column(Integer, server_default="0")
    instances_idle: Mapped[int] = mapped_column(Integer, server_default="0")
    instances_busy: Mapped[int] = mapped_column(Integer, server_default="0")
    draining: Mapped[bool] = mapped_column(Boolean, server_default=false())
