"""Pricing rules, pinned by properties: rounding, tiers, free allowances, plan changes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal, Inexact

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.billing.money import exact, round_to_minor_unit
from app.billing.pricing import (
    FunctionUsage,
    LineKind,
    PlanTerms,
    Segment,
    Tier,
    Usage,
    gb_seconds,
    price_period,
)
from app.billing.service import DEFAULT_TERMS

START = datetime(2026, 11, 1, tzinfo=UTC)
MIDDLE = datetime(2026, 11, 15, tzinfo=UTC)
END = datetime(2026, 12, 1, tzinfo=UTC)
GB_S = 1_024_000  # MB-ms in one GB-second

FLAT = PlanTerms(
    plan="flat",
    currency="USD",
    minor_units=2,
    request_price_per_million=Decimal("0.20"),
    gb_second_price=Decimal("0.0000166667"),
    provisioned_gb_second_price=Decimal("0.0000041667"),
    provisioned_duration_gb_second_price=Decimal("0.0000097222"),
)
# Small tier thresholds, so that generated usage crosses them.
TIERED = replace(
    FLAT,
    plan="tiered",
    tiers=(Tier(Decimal(1000), Decimal("0.000015")), Tier(Decimal(5000), Decimal("0.000013334"))),
)

names = st.sampled_from(["alpha", "beta", "gamma", "delta"])
usage_amounts = st.builds(
    Usage,
    requests=st.integers(0, 3_000_000),
    billed_ms=st.just(0),
    mb_ms=st.integers(0, 8_000 * GB_S),
    init_billed_ms=st.just(0),
    init_mb_ms=st.integers(0, 50 * GB_S),
)
function_usages = st.lists(
    st.builds(FunctionUsage, function_id=names, function_name=names, on_demand=usage_amounts),
    max_size=4,
    unique_by=lambda u: u.function_id,
).map(lambda us: tuple(replace(u, function_name=u.function_id) for u in us))
prices = st.decimals(min_value=0, max_value=Decimal("0.001"), places=10)
plans = st.builds(
    PlanTerms,
    plan=st.just("p"),
    currency=st.just("USD"),
    minor_units=st.just(2),
    request_price_per_million=st.decimals(min_value=0, max_value=5, places=4),
    gb_second_price=prices,
    tiers=st.tuples(prices, prices).map(
        lambda ps: (Tier(Decimal(1000), ps[0]), Tier(Decimal(5000), ps[1]))
    ),
    free_requests=st.integers(0, 2_000_000),
    free_gb_seconds=st.integers(0, 6000).map(Decimal),
    bill_init=st.booleans(),
)


def period(terms: PlanTerms, usages: tuple[FunctionUsage, ...]) -> list[Segment]:
    return [Segment(START, END, terms, usages)]


def one(name: str, mb_ms: int = 0, requests: int = 0, **more: object) -> FunctionUsage:
    return FunctionUsage(name, name, on_demand=Usage(requests=requests, mb_ms=mb_ms), **more)  # type: ignore[arg-type]


def total_usage(usages: tuple[FunctionUsage, ...]) -> Usage:
    return sum((u.on_demand for u in usages), Usage())


# Rounding.


@pytest.mark.parametrize(
    ("exact_amount", "minor_units", "rounded"),
    [
        ("0.005", 2, "0.01"),
        ("0.0049999999", 2, "0.00"),
        ("1.125", 2, "1.13"),
        ("1.135", 2, "1.14"),
        ("2.5", 0, "3"),
        ("0.0005", 3, "0.001"),
    ],
)
def test_line_amounts_round_half_up_to_the_minor_unit(
    exact_amount: str, minor_units: int, rounded: str
) -> None:
    assert str(round_to_minor_unit(Decimal(exact_amount), minor_units)) == rounded


@given(st.decimals(min_value=0, max_value=10**9, places=14))
def test_rounding_moves_an_amount_by_at_most_half_a_cent(amount: Decimal) -> None:
    rounded = round_to_minor_unit(amount, 2)

    assert abs(rounded - amount) <= Decimal("0.005")
    assert rounded == round_to_minor_unit(rounded, 2)
    if abs(rounded - amount) == Decimal("0.005"):
        assert rounded > amount  # a tie goes up


def test_money_arithmetic_refuses_to_round_silently() -> None:
    with pytest.raises(Inexact), exact():
        _ = Decimal(1) / 3


@given(function_usages, plans)
@settings(max_examples=200)
def test_each_line_is_its_exact_amount_rounded_and_the_total_their_sum(
    usages: tuple[FunctionUsage, ...], terms: PlanTerms
) -> None:
    priced = price_period(period(terms, usages), DEFAULT_TERMS)

    for line in priced.lines:
        assert isinstance(line.exact_amount, Decimal)
        assert line.amount == round_to_minor_unit(line.exact_amount, 2)
    assert priced.total == sum(line.amount for line in priced.lines)
    assert abs(priced.total - priced.exact_total) <= Decimal("0.005") * len(priced.lines)


def test_gb_seconds_are_exact() -> None:
    assert gb_seconds(1) == Decimal("0.0000009765625")
    assert gb_seconds(400_000 * GB_S) == 400_000


# Tiers.


def reference_duration_charge(terms: PlanTerms, gbs: Decimal) -> Decimal:
    """The tiered charge for a month's GB-seconds, computed independently of the code."""
    steps = [(Decimal(0), terms.gb_second_price)] + [
        (t.above_gb_seconds, t.gb_second_price) for t in terms.tiers
    ]
    charge = Decimal(0)
    for i, (low, price) in enumerate(steps):
        high = steps[i + 1][0] if i + 1 < len(steps) else gbs
        if gbs > low:
            charge += (min(gbs, high) - low) * price
    return charge


@given(st.integers(0, 8_000 * GB_S))
def test_tiers_price_the_months_gb_seconds_piecewise(mb_ms: int) -> None:
    priced = price_period(period(TIERED, (one("f", mb_ms),)), DEFAULT_TERMS)

    expected = reference_duration_charge(TIERED, gb_seconds(mb_ms))
    assert priced.exact_total == expected


def test_default_plan_has_lambdas_three_tiers() -> None:
    six_billion = Decimal(6_000_000_000)
    charge = DEFAULT_TERMS.duration_charge

    assert charge(Decimal(0), Decimal(1)) == Decimal("0.0000166667")
    assert charge(six_billion, six_billion + 1) == Decimal("0.000015")
    assert charge(Decimal(15_000_000_000), Decimal(15_000_000_001)) == Decimal("0.000013334")


@given(function_usages, plans)
@settings(max_examples=200)
def test_tiers_and_allowances_apply_to_the_tenant_not_each_function(
    usages: tuple[FunctionUsage, ...], terms: PlanTerms
) -> None:
    # However the same usage is spread over functions, the tenant's exact total is the same.
    merged = (FunctionUsage("all", "all", on_demand=total_usage(usages)),)

    spread = price_period(period(terms, usages), DEFAULT_TERMS)
    together = price_period(period(terms, merged), DEFAULT_TERMS)

    assert spread.exact_total == together.exact_total


@given(function_usages, usage_amounts, plans)
def test_more_usage_never_costs_less(
    usages: tuple[FunctionUsage, ...], more: Usage, terms: PlanTerms
) -> None:
    extra = (*usages, FunctionUsage("zeta", "zeta", on_demand=more))

    before = price_period(period(terms, usages), DEFAULT_TERMS)
    after = price_period(period(terms, extra), DEFAULT_TERMS)

    assert after.exact_total >= before.exact_total


# Free allowance.


@given(function_usages, plans)
@settings(max_examples=200)
def test_free_allowance_applied_is_the_usage_up_to_the_allowance(
    usages: tuple[FunctionUsage, ...], terms: PlanTerms
) -> None:
    priced = price_period(period(terms, usages), DEFAULT_TERMS)
    used = total_usage(usages)
    charged_mb_ms = used.mb_ms + (used.init_mb_ms if terms.bill_init else 0)

    assert sum(line.free_requests for line in priced.lines) == min(
        used.requests, terms.free_requests
    )
    assert sum(line.free_gb_seconds for line in priced.lines) == min(
        gb_seconds(charged_mb_ms), terms.free_gb_seconds
    )


@given(function_usages, st.integers(0, 2_000_000), st.integers(0, 6000))
def test_on_a_flat_plan_only_usage_beyond_the_allowance_is_charged(
    usages: tuple[FunctionUsage, ...], free_requests: int, free_gbs: int
) -> None:
    terms = replace(FLAT, free_requests=free_requests, free_gb_seconds=Decimal(free_gbs))
    used = total_usage(usages)
    gbs = gb_seconds(used.mb_ms + used.init_mb_ms)

    priced = price_period(period(terms, usages), DEFAULT_TERMS)

    expected = Decimal(max(0, used.requests - free_requests)) * FLAT.request_price_per_million
    expected = expected / 1_000_000 + max(Decimal(0), gbs - free_gbs) * FLAT.gb_second_price
    assert priced.exact_total == expected


def test_free_allowance_goes_to_functions_in_name_order() -> None:
    terms = replace(FLAT, free_gb_seconds=Decimal(100))
    usages = (one("zulu", 80 * GB_S), one("alpha", 60 * GB_S), one("mike", 10 * GB_S))

    lines = {line.function_name: line for line in price_period(period(terms, usages), FLAT).lines}

    assert lines["alpha"].free_gb_seconds == 60
    assert lines["mike"].free_gb_seconds == 10
    assert lines["zulu"].free_gb_seconds == 30
    assert lines["zulu"].exact_amount == 50 * FLAT.gb_second_price


# Plan changes within a period.


def split(terms_before: PlanTerms, terms_after: PlanTerms, before, after) -> list[Segment]:  # type: ignore[no-untyped-def]
    return [
        Segment(START, MIDDLE, terms_before, before),
        Segment(MIDDLE, END, terms_after, after),
    ]


@given(function_usages, function_usages, plans)
@settings(max_examples=200)
def test_a_change_to_the_same_prices_changes_nothing(
    before: tuple[FunctionUsage, ...], after: tuple[FunctionUsage, ...], terms: PlanTerms
) -> None:
    # Usage merged into one segment against the same usage split across a no-op change.
    merged: dict[str, Usage] = {}
    for u in (*before, *after):
        merged[u.function_id] = merged.get(u.function_id, Usage()) + u.on_demand
    whole = tuple(FunctionUsage(f, f, on_demand=u) for f, u in merged.items())

    one_segment = price_period(period(terms, whole), DEFAULT_TERMS)
    two_segments = price_period(split(terms, terms, before, after), DEFAULT_TERMS)

    assert two_segments.exact_total == one_segment.exact_total


@given(function_usages, plans, plans)
def test_usage_after_the_change_only_is_priced_by_the_new_plan(
    after: tuple[FunctionUsage, ...], old: PlanTerms, new: PlanTerms
) -> None:
    changed = price_period(split(old, new, (), after), DEFAULT_TERMS)
    new_all_period = price_period(period(new, after), DEFAULT_TERMS)

    assert changed.exact_total == new_all_period.exact_total


@given(function_usages, plans, plans)
def test_usage_before_the_change_only_is_priced_by_the_old_plan(
    before: tuple[FunctionUsage, ...], old: PlanTerms, new: PlanTerms
) -> None:
    changed = price_period(split(old, new, before, ()), DEFAULT_TERMS)
    old_all_period = price_period(period(old, before), DEFAULT_TERMS)

    assert changed.exact_total == old_all_period.exact_total


@given(st.integers(0, 8_000 * GB_S), st.integers(0, 8_000 * GB_S))
def test_tier_position_carries_across_a_change(before_mb_ms: int, after_mb_ms: int) -> None:
    cheaper = replace(
        TIERED,
        plan="cheaper",
        gb_second_price=Decimal("0.00001"),
        tiers=(Tier(Decimal(1000), Decimal("0.000009")), Tier(Decimal(5000), Decimal("0.000008"))),
    )

    priced = price_period(
        split(TIERED, cheaper, (one("f", before_mb_ms),), (one("f", after_mb_ms),)), DEFAULT_TERMS
    )

    position = gb_seconds(before_mb_ms)
    expected = TIERED.duration_charge(Decimal(0), position) + cheaper.duration_charge(
        position, position + gb_seconds(after_mb_ms)
    )
    assert priced.exact_total == expected
    assert priced.plans == ["tiered", "cheaper"]


@given(function_usages, function_usages, plans, plans)
def test_the_allowance_left_after_a_change_is_the_new_allowance_less_what_was_used(
    before: tuple[FunctionUsage, ...],
    after: tuple[FunctionUsage, ...],
    old: PlanTerms,
    new: PlanTerms,
) -> None:
    priced = price_period(split(old, new, before, after), DEFAULT_TERMS)
    used_before = total_usage(before).requests
    used_after = total_usage(after).requests

    free_before = min(used_before, old.free_requests)
    free_after = min(used_after, max(0, new.free_requests - used_before))
    assert sum(line.free_requests for line in priced.lines) == free_before + free_after


@given(function_usages, function_usages, plans, st.integers(0, 100))
def test_raising_every_price_mid_period_never_lowers_the_total(
    before: tuple[FunctionUsage, ...],
    after: tuple[FunctionUsage, ...],
    terms: PlanTerms,
    percent: int,
) -> None:
    factor = 1 + Decimal(percent) / 100
    dearer = replace(
        terms,
        request_price_per_million=terms.request_price_per_million * factor,
        gb_second_price=terms.gb_second_price * factor,
        tiers=tuple(replace(t, gb_second_price=t.gb_second_price * factor) for t in terms.tiers),
    )

    unchanged = price_period(split(terms, terms, before, after), DEFAULT_TERMS)
    raised = price_period(split(terms, dearer, before, after), DEFAULT_TERMS)

    assert raised.exact_total >= unchanged.exact_total


def test_one_period_cannot_mix_currencies() -> None:
    euros = replace(FLAT, plan="euros", currency="EUR")

    with pytest.raises(ValueError, match="currencies"):
        price_period(split(FLAT, euros, (), ()), DEFAULT_TERMS)


# Init phase and provisioned concurrency.


def test_init_duration_is_charged_only_when_the_plan_bills_it() -> None:
    cold = FunctionUsage(
        "f", "f", on_demand=Usage(requests=1, billed_ms=100, mb_ms=100 * 1024, init_billed_ms=300,
                                  init_mb_ms=300 * 1024)
    )  # fmt: skip

    billed = price_period(period(FLAT, (cold,)), DEFAULT_TERMS).lines[0]
    free = price_period(period(replace(FLAT, bill_init=False), (cold,)), DEFAULT_TERMS).lines[0]

    assert billed.gb_seconds == Decimal("0.4") and billed.init_billed_ms == 300
    assert free.gb_seconds == Decimal("0.1") and free.init_billed_ms == 0


def test_provisioned_usage_has_its_own_lines_and_prices() -> None:
    usage = FunctionUsage(
        "f",
        "f",
        on_demand=Usage(requests=10, billed_ms=1000, mb_ms=1000 * 1024),
        provisioned=Usage(requests=5, billed_ms=4000, mb_ms=4000 * 1024),
        provisioned_concurrency_mb_ms=2 * 1024 * 300_000,  # 2 × 1 GB for 5 minutes
    )

    lines = price_period(period(FLAT, (usage,)), DEFAULT_TERMS).lines

    assert [line.kind for line in lines] == list(LineKind)
    invocations, duration, concurrency = lines
    assert invocations.requests == 15 and invocations.gb_seconds == 1
    assert duration.gb_seconds == 4
    assert duration.exact_amount == 4 * FLAT.provisioned_duration_gb_second_price
    assert concurrency.gb_seconds == 600
    assert concurrency.exact_amount == 600 * FLAT.provisioned_gb_second_price


@given(st.integers(0, 8_000 * GB_S), st.integers(0, 8_000 * GB_S))
def test_provisioned_duration_uses_neither_tiers_nor_free_gb_seconds(
    on_demand_mb_ms: int, provisioned_mb_ms: int
) -> None:
    terms = replace(TIERED, free_gb_seconds=Decimal(500))
    alone = one("f", on_demand_mb_ms)
    both = replace(alone, provisioned=Usage(mb_ms=provisioned_mb_ms))

    difference = (
        price_period(period(terms, (both,)), DEFAULT_TERMS).exact_total
        - price_period(period(terms, (alone,)), DEFAULT_TERMS).exact_total
    )

    assert difference == gb_seconds(provisioned_mb_ms) * terms.provisioned_duration_gb_second_price


def test_the_default_plan_bills_the_init_phase() -> None:
    assert DEFAULT_TERMS.bill_init is True
    assert DEFAULT_TERMS.free_requests == 1_000_000
    assert DEFAULT_TERMS.free_gb_seconds == 400_000
    assert DEFAULT_TERMS.request_price_per_million == Decimal("0.20")
