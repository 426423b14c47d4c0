from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, String, false
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class ApiProcess(Base):
    """A running API process, as every API process sees it (app/scheduler/processes.py).

    One that has not been seen for ``LAMBENT_API_DEAD_AFTER_S`` is no longer live: its
    concurrency leases stop counting, and the next process to notice deletes it with them.
    """

    __tablename__ = "api_processes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # True once every invocation the process has in flight holds a lease row here, and each new
    # one takes its row before it runs; a process that joins waits for the others to be so.
    shared: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Provisioned instances ready in this process, per function id, as of its last heartbeat.
    provisioned: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)


class ConcurrencyLease(Base):
    """One invocation in flight, counted against its limits while several API processes run."""

    __tablename__ = "concurrency_leases"
    __table_args__ = (
        Index("ix_concurrency_leases_tenant_id", "tenant_id"),
        Index("ix_concurrency_leases_function_id", "function_id"),
    )

    process_id: Mapped[str] = mapped_column(
        ForeignKey("api_processes.id", ondelete="CASCADE"), primary_key=True
    )
    # The process's own number for the invocation, unique within the process.
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[str] = mapped_column(String(32))
    function_id: Mapped[str] = mapped_column(String(32))
    # Admitted under the function's reserved concurrency rather than the tenant's shared rest.
    reserved: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
