"""Exact money: decimals from end to end, rounded once, at the invoice line.

Prices, GB-seconds and unrounded amounts are ``Decimal`` values computed in a context that
raises on any inexact step, so an amount is never silently rounded along the way. The single
rounding happens when an invoice line is written: half-up (0.005 USD becomes 0.01 USD) to the
currency's minor unit. An invoice's total is the sum of its rounded lines, so the lines always
add up to the total a tenant is charged.

Amounts are stored as decimal strings (SQLite has no exact decimal column) and sent in JSON as
strings, so nothing passes through a binary float on the way in or out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation, localcontext
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema
from sqlalchemy import String
from sqlalchemy.types import TypeDecorator

# ISO 4217 minor units of the currencies a plan is likely to use; any other currency needs its
# minor units given explicitly.
MINOR_UNITS = {
    "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CNY": 2, "CZK": 2, "DKK": 2, "EUR": 2,
    "GBP": 2, "HKD": 2, "INR": 2, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3, "MXN": 2, "NOK": 2,
    "NZD": 2, "OMR": 3, "PLN": 2, "SEK": 2, "SGD": 2, "USD": 2, "ZAR": 2,
}  # fmt: skip

# Wide enough that no sum or product of billing quantities comes near it; exactness is enforced
# by the Inexact trap, not by hoping the precision suffices.
EXACT_PRECISION = 200
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?$")


@contextmanager
def exact() -> Iterator[Context]:
    """A decimal context in which any operation that would have to round raises ``Inexact``."""
    with localcontext() as ctx:
        ctx.prec = EXACT_PRECISION
        ctx.traps[Inexact] = True
        yield ctx


def round_to_minor_unit(amount: Decimal, minor_units: int) -> Decimal:
    """Half-up to the currency's minor unit: the one place an amount is rounded."""
    with exact() as ctx:
        ctx.traps[Inexact] = False  # rounding is the point here
        return amount.quantize(Decimal(1).scaleb(-minor_units), rounding=ROUND_HALF_UP)


def format_decimal(value: Decimal) -> str:
    """Plain notation, never an exponent: '0.0000166667', not '1.66667E-5'."""
    return format(value, "f")


def format_exact(value: Decimal) -> str:
    """An exact quantity without trailing zeros or an exponent: '0.5', '1200'."""
    with exact():
        return format_decimal(value.normalize())


def parse_decimal(value: object) -> Decimal:
    """A non-negative exact decimal from a string; numbers are refused, since JSON numbers
    reach Python as binary floats before anything can check them."""
    if isinstance(value, Decimal):
        if not value.is_finite() or value < 0:
            raise ValueError("must be a non-negative decimal")
        return value
    if not isinstance(value, str):
        raise ValueError('give amounts and prices as strings, e.g. "0.20", so they stay exact')
    text = value.strip()
    if not _DECIMAL.match(text):
        raise ValueError(f"{value!r} is not a non-negative decimal like 0.0000166667")
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal") from None


DecimalString = Annotated[
    Decimal,
    PlainValidator(parse_decimal),
    PlainSerializer(format_decimal, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$", "examples": ["0.20"]}),
]


class ExactDecimal(TypeDecorator[Decimal]):
    """A decimal kept as its exact string on every database."""

    impl = String(64)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"amounts are Decimals, not {type(value).__name__}")
        return format_decimal(value)

    def process_result_value(self, value: Any, dialect: object) -> Decimal | None:
        return None if value is None else Decimal(value)


def minor_units_of(currency: str) -> int | None:
    return MINOR_UNITS.get(currency)
