from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class UsageRecord(Base):
    """What one invocation costs. The request id as primary key makes it idempotent."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_tenant_recorded", "tenant_id", "recorded_at"),
        # The rollup job reads every tenant's records of a few minutes at a time.
        Index("ix_usage_records_recorded_at", "recorded_at"),
    )

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    function_id: Mapped[str] = mapped_column(String(32))
    function_name: Mapped[str] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    requests: Mapped[int] = mapped_column(Integer, default=1)
    memory_mb: Mapped[int] = mapped_column(Integer)
    billed_ms: Mapped[int] = mapped_column(BigInteger)
    # The init phase of a cold start, in whole milliseconds rounded up; whether it is charged
    # is the price plan's decision, so it is kept apart from billed_ms.
    init_billed_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    # billed_ms × memory_mb: integer, so sums stay exact; GB-seconds = mb_ms / 1,024,000.
    mb_ms: Mapped[int] = mapped_column(BigInteger)


class _Rollup:
    """Usage records of one function summed over one time bucket [bucket_start, +width)."""

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    function_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    function_name: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(BigInteger)
    billed_ms: Mapped[int] = mapped_column(BigInteger)
    mb_ms: Mapped[int] = mapped_column(BigInteger)
    init_billed_ms: Mapped[int] = mapped_column(BigInteger)
    init_mb_ms: Mapped[int] = mapped_column(BigInteger)  # init_billed_ms × memory_mb, summed


class UsageMinute(_Rollup, Base):
    __tablename__ = "usage_minutes"
    __table_args__ = (Index("ix_usage_minutes_bucket_start", "bucket_start"),)


class UsageHour(_Rollup, Base):
    __tablename__ = "usage_hours"
    __table_args__ = (Index("ix_usage_hours_bucket_start", "bucket_start"),)


class RollupState(Base):
    """How far the rollups reach: one row.

    Every minute before ``minutes_to`` has its per-minute rollups, and every hour before
    ``hours_to`` its per-hour rollups; usage after them is read from the records themselves.
    """

    __tablename__ = "usage_rollup_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    minutes_to: Mapped[datetime] = mapped_column(UTCDateTime)
    hours_to: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LateHour(Base):
    """An hour of a function that got a usage record after it may already have been rolled up.

    Written in the record's own transaction. Until the rollup job has recomputed the hour's
    minutes and the hour itself from the records (and deleted the mark), reads treat those
    buckets as stale and read the hour's records instead, so a late record counts from the
    moment it commits.
    """

    __tablename__ = "usage_late_hours"

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    function_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    # The hour's end, kept so that reads need no date arithmetic in SQL.
    until: Mapped[datetime] = mapped_column(UTCDateTime)
