from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class Invocation(Base):
    """One invocation's final state; written once, with its usage record, when it ends."""

    __tablename__ = "invocations"
    __table_args__ = (Index("ix_invocations_function_started", "function_id", "started_at"),)

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), index=True)
    function_id: Mapped[str] = mapped_column(String(32))
    function_name: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    error_type: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cold_start: Mapped[bool] = mapped_column(Boolean)
    # How a cold start's instance came up: "fresh" or "prestarted"; None when warm.
    start_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    duration_ns: Mapped[int] = mapped_column(BigInteger)
    billed_ms: Mapped[int] = mapped_column(BigInteger)
    init_duration_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    memory_mb: Mapped[int] = mapped_column(Integer)
    max_memory_used_mb: Mapped[int] = mapped_column(Integer)
    instance_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)
