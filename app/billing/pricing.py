"""Pricing a billing period: usage in, invoice lines out. Pure, so it can be tested alone.

The rules, which the property tests in ``tests/unit/test_billing_pricing.py`` pin:

- **Units.** Duration is kept as integer MB-milliseconds; GB-seconds = MB-ms / 1,024,000,
  which is always an exact decimal. Requests are priced per million.
- **Segments.** A period is cut wherever the tenant's plan (or the plan's prices) changes;
  each segment is priced by the terms in force during it. Usage belongs to the segment its
  record's time falls in.
- **Order of consumption.** Free allowances and tiers are consumed in a fixed order: segments
  in time order, and within a segment functions by name (then id). So in a period on one
  plan, the free allowance goes to the alphabetically first functions, and the cheaper upper
  tiers to the later ones. The tenant's total does not depend on this order when the plan does
  not change within the period; only its split across lines does.
- **Tiers** apply to the tenant's on-demand GB-seconds across all its functions, counted from
  the start of the period (free GB-seconds included, as they are the first GB-seconds used).
  A plan change does not restart the count: after the change, the new plan's tier prices apply
  from the position the period's usage has reached.
- **Free allowance.** The free requests and GB-seconds of the plan in force apply to the
  period's usage so far: after a change to a plan with a larger allowance, what remains is the
  new allowance minus what the period has already used; with a smaller one, possibly nothing.
- **Init phase.** When the plan bills it, a cold start's init duration is charged as duration
  (it counts toward tiers and the free allowance like any other duration).
- **Provisioned concurrency.** While a function has provisioned concurrency, its invocations'
  duration is charged at the plan's provisioned duration price (no tiers, no free GB-seconds),
  and the concurrency itself (count × memory × time, in 5-minute blocks) at the provisioned
  price, each on its own line. Requests are priced the same either way.
- **Rounding** happens once per line, half-up to the currency's minor unit; the total is the
  sum of the rounded lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from app.billing.money import exact, round_to_minor_unit

MB_MS_PER_GB_SECOND = 1_024_000
REQUESTS_PER_PRICE_UNIT = 1_000_000


class LineKind(StrEnum):
    INVOCATIONS = "invocations"
    PROVISIONED_DURATION = "provisioned_duration"
    PROVISIONED_CONCURRENCY = "provisioned_concurrency"


LINE_ORDER = {kind: i for i, kind in enumerate(LineKind)}


def gb_seconds(mb_ms: int) -> Decimal:
    with exact():
        return Decimal(mb_ms) / MB_MS_PER_GB_SECOND


@dataclass(frozen=True)
class Tier:
    """From ``above_gb_seconds`` of monthly GB-seconds on, duration costs ``gb_second_price``."""

    above_gb_seconds: Decimal
    gb_second_price: Decimal


@dataclass(frozen=True)
class PlanTerms:
    """The prices of one plan version."""

    plan: str
    currency: str
    minor_units: int
    request_price_per_million: Decimal
    gb_second_price: Decimal
    tiers: tuple[Tier, ...] = ()
    free_requests: int = 0
    free_gb_seconds: Decimal = Decimal(0)
    provisioned_gb_second_price: Decimal = Decimal(0)
    provisioned_duration_gb_second_price: Decimal = Decimal(0)
    bill_init: bool = True

    def __post_init__(self) -> None:
        thresholds = [t.above_gb_seconds for t in self.tiers]
        if thresholds != sorted(set(thresholds)) or any(t <= 0 for t in thresholds):
            raise ValueError("tier thresholds must be positive and strictly increasing")

    def duration_charge(self, start: Decimal, end: Decimal) -> Decimal:
        """The exact charge for on-demand GB-seconds from monthly position ``start`` to ``end``."""
        with exact():
            charge = Decimal(0)
            bounds = [Decimal(0), *(t.above_gb_seconds for t in self.tiers)]
            prices = [self.gb_second_price, *(t.gb_second_price for t in self.tiers)]
            for i, price in enumerate(prices):
                low = bounds[i]
                high = bounds[i + 1] if i + 1 < len(bounds) else None
                overlap_start = max(start, low)
                overlap_end = end if high is None else min(end, high)
                if overlap_end > overlap_start:
                    charge += (overlap_end - overlap_start) * price
            return charge


@dataclass(frozen=True)
class Usage:
    """Summed usage records: requests, billed duration and its MB-ms, and the init phase."""

    requests: int = 0
    billed_ms: int = 0
    mb_ms: int = 0
    init_billed_ms: int = 0
    init_mb_ms: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.requests + other.requests,
            self.billed_ms + other.billed_ms,
            self.mb_ms + other.mb_ms,
            self.init_billed_ms + other.init_billed_ms,
            self.init_mb_ms + other.init_mb_ms,
        )

    def __bool__(self) -> bool:
        return any(
            (self.requests, self.billed_ms, self.mb_ms, self.init_billed_ms, self.init_mb_ms)
        )


@dataclass(frozen=True)
class FunctionUsage:
    """One function's usage within one segment."""

    function_id: str
    function_name: str
    on_demand: Usage = Usage()
    provisioned: Usage = Usage()  # invocations while the function had provisioned concurrency
    provisioned_concurrency_mb_ms: int = 0  # count × memory × provisioned time


@dataclass(frozen=True)
class Segment:
    start: datetime
    end: datetime
    terms: PlanTerms
    functions: tuple[FunctionUsage, ...] = ()


@dataclass
class Line:
    function_name: str
    kind: LineKind
    requests: int = 0
    billed_ms: int = 0
    init_billed_ms: int = 0  # charged init duration; 0 when the plan does not bill it
    gb_seconds: Decimal = Decimal(0)
    free_requests: int = 0
    free_gb_seconds: Decimal = Decimal(0)
    exact_amount: Decimal = Decimal(0)
    amount: Decimal = Decimal(0)  # exact_amount rounded half-up to the minor unit


@dataclass
class Priced:
    currency: str
    minor_units: int
    lines: list[Line] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal(0))

    @property
    def exact_total(self) -> Decimal:
        with exact():
            return sum((line.exact_amount for line in self.lines), Decimal(0))

    @property
    def requests(self) -> int:
        return sum(line.requests for line in self.lines)

    @property
    def billed_ms(self) -> int:
        return sum(line.billed_ms for line in self.lines)


def price_period(segments: Sequence[Segment], default_terms: PlanTerms) -> Priced:
    """Price a period's segments (in time order) into invoice lines."""
    currencies = {(s.terms.currency, s.terms.minor_units) for s in segments}
    if len(currencies) > 1:
        raise ValueError(f"one period cannot mix currencies: {sorted(currencies)}")
    terms0 = segments[0].terms if segments else default_terms
    priced = Priced(currency=terms0.currency, minor_units=terms0.minor_units)
    lines: dict[tuple[str, LineKind], Line] = {}
    used_requests = 0
    used_gb_seconds = Decimal(0)

    def line(name: str, kind: LineKind) -> Line:
        return lines.setdefault((name, kind), Line(function_name=name, kind=kind))

    with exact():
        for segment in segments:
            terms = segment.terms
            if terms.plan not in priced.plans:
                priced.plans.append(terms.plan)
            for usage in sorted(segment.functions, key=lambda u: (u.function_name, u.function_id)):
                od, prov = usage.on_demand, usage.provisioned
                requests = od.requests + prov.requests

                # Requests, against what is left of the free requests.
                free_requests = min(requests, max(0, terms.free_requests - used_requests))
                used_requests += requests
                request_amount = (
                    Decimal(requests - free_requests)
                    * terms.request_price_per_million
                    / REQUESTS_PER_PRICE_UNIT
                )

                # On-demand duration: free GB-seconds first, then tiers from where the period is.
                od_mb_ms = od.mb_ms + (od.init_mb_ms if terms.bill_init else 0)
                od_gbs = gb_seconds(od_mb_ms)
                free_gbs = min(od_gbs, max(Decimal(0), terms.free_gb_seconds - used_gb_seconds))
                duration_amount = terms.duration_charge(
                    used_gb_seconds + free_gbs, used_gb_seconds + od_gbs
                )
                used_gb_seconds += od_gbs

                if requests or od:
                    inv = line(usage.function_name, LineKind.INVOCATIONS)
                    inv.requests += requests
                    inv.billed_ms += od.billed_ms
                    inv.init_billed_ms += od.init_billed_ms if terms.bill_init else 0
                    inv.gb_seconds += od_gbs
                    inv.free_requests += free_requests
                    inv.free_gb_seconds += free_gbs
                    inv.exact_amount += request_amount + duration_amount

                if prov:
                    pd = line(usage.function_name, LineKind.PROVISIONED_DURATION)
                    prov_gbs = gb_seconds(prov.mb_ms + (prov.init_mb_ms if terms.bill_init else 0))
                    pd.billed_ms += prov.billed_ms
                    pd.init_billed_ms += prov.init_billed_ms if terms.bill_init else 0
                    pd.gb_seconds += prov_gbs
                    pd.exact_amount += prov_gbs * terms.provisioned_duration_gb_second_price

                if usage.provisioned_concurrency_mb_ms:
                    pc = line(usage.function_name, LineKind.PROVISIONED_CONCURRENCY)
                    pc_gbs = gb_seconds(usage.provisioned_concurrency_mb_ms)
                    pc.gb_seconds += pc_gbs
                    pc.exact_amount += pc_gbs * terms.provisioned_gb_second_price

    for key in sorted(lines, key=lambda k: (k[0], LINE_ORDER[k[1]])):
        priced_line = lines[key]
        priced_line.amount = round_to_minor_unit(priced_line.exact_amount, priced.minor_units)
        priced.lines.append(priced_line)
    return priced
