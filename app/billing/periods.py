"""Billing periods: calendar months in UTC, and the time grid billing works on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, order=True)
class Period:
    """One month, [start, end) in UTC."""

    start: datetime
    end: datetime

    @classmethod
    def containing(cls, at: datetime) -> Period:
        start = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return cls(start, _next_month(start))

    @classmethod
    def parse(cls, text: str) -> Period:
        """'2026-12' → December 2026."""
        try:
            start = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(f"{text!r} is not a billing period like 2026-12") from None
        return cls(start, _next_month(start))

    @property
    def label(self) -> str:
        return self.start.strftime("%Y-%m")

    def next(self) -> Period:
        return Period(self.end, _next_month(self.end))

    def previous(self) -> Period:
        return Period.containing(self.start - timedelta(days=1))


def _next_month(start: datetime) -> datetime:
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def floor_to(at: datetime, step: timedelta) -> datetime:
    """The start of the ``step``-long slot of the UTC grid that contains ``at``."""
    offset = (at - EPOCH) % step
    return at - offset


def ceil_to(at: datetime, step: timedelta) -> datetime:
    floored = floor_to(at, step)
    return floored if floored == at else floored + step


def periods_between(first: Period, last: Period) -> list[Period]:
    periods, period = [], first
    while period <= last:
        periods.append(period)
        period = period.next()
    return periods
