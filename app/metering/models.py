from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class UsageRecord(Base):
    """What one invocation costs. The request id as primary key makes it idempotent."""

    __tablename__ = "usage_records"
    __table_args__ = (Index("ix_usage_records_tenant_recorded", "tenant_id", "recorded_at"),)

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
