"""Billing arithmetic: whole milliseconds rounded up, GB-seconds exact."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from app.metering.service import billed_ms, gb_seconds


def test_a_fifth_of_a_millisecond_bills_one() -> None:
    assert billed_ms(200_000) == 1


def test_a_hair_over_twelve_milliseconds_bills_thirteen() -> None:
    assert billed_ms(12_000_100) == 13


def test_exactly_twelve_milliseconds_bills_twelve() -> None:
    assert billed_ms(12_000_000) == 12


def test_one_nanosecond_bills_one_millisecond() -> None:
    assert billed_ms(1) == 1


def test_nothing_run_bills_nothing() -> None:
    assert billed_ms(0) == 0


@given(st.integers(min_value=1, max_value=900 * 10**9))
def test_billed_is_the_smallest_whole_millisecond_not_below_the_duration(ns: int) -> None:
    billed = billed_ms(ns)

    assert billed * 1_000_000 >= ns
    assert (billed - 1) * 1_000_000 < ns


def test_gb_seconds_of_one_second_at_1024_mb_is_one() -> None:
    assert gb_seconds(1000 * 1024) == Decimal(1)


@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=128, max_value=10240))
def test_gb_seconds_is_exact(billed: int, memory_mb: int) -> None:
    value = gb_seconds(billed * memory_mb)

    assert value * 1000 * 1024 == billed * memory_mb
    assert value == Decimal(billed) / 1000 * Decimal(memory_mb) / 1024
