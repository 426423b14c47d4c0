"""What the billing API takes and returns. Every amount and price is a decimal string."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from app.billing.money import DecimalString, format_decimal
from app.billing.pricing import PlanTerms, Tier
from app.tenants.schemas import ResourceName

Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
EFFECTIVE_FROM = (
    "A whole UTC minute, not before the start of the current billing period; default: the "
    "next whole minute"
)


class TierIn(BaseModel):
    above_gb_seconds: DecimalString = Field(
        description="From this many GB-seconds in a month on, duration costs gb_second_price"
    )
    gb_second_price: DecimalString


class PriceFields(BaseModel):
    @model_validator(mode="after")
    def _tiers_increase(self) -> PriceFields:
        tiers = getattr(self, "tiers", None) or []
        bounds = [t.above_gb_seconds for t in tiers]
        if bounds != sorted(set(bounds)) or any(b <= 0 for b in bounds):
            raise ValueError("tier thresholds must be above zero and strictly increasing")
        return self


class PlanCreate(PriceFields):
    name: ResourceName
    currency: Currency = "USD"
    minor_units: int | None = Field(
        None, ge=0, le=4, description="Decimal places of the currency; known for common ones"
    )
    request_price_per_million: DecimalString
    gb_second_price: DecimalString = Field(description="Duration price below the first tier")
    tiers: list[TierIn] = Field(default_factory=list, max_length=20)
    free_requests: int = Field(0, ge=0, description="Free requests per month")
    free_gb_seconds: DecimalString = Field(Decimal(0), description="Free GB-seconds per month")
    provisioned_gb_second_price: DecimalString = Field(
        description="Per GB-second of provisioned concurrency configured"
    )
    provisioned_duration_gb_second_price: DecimalString = Field(
        description="Per GB-second of duration while a function has provisioned concurrency"
    )
    bill_init: bool = Field(True, description="Charge the init phase of cold starts as duration")

    def terms(self) -> dict[str, Any]:
        return {
            "request_price_per_million": self.request_price_per_million,
            "gb_second_price": self.gb_second_price,
            "tiers": tuple(Tier(t.above_gb_seconds, t.gb_second_price) for t in self.tiers),
            "free_requests": self.free_requests,
            "free_gb_seconds": self.free_gb_seconds,
            "provisioned_gb_second_price": self.provisioned_gb_second_price,
            "provisioned_duration_gb_second_price": self.provisioned_duration_gb_second_price,
            "bill_init": self.bill_init,
        }


class PlanChange(PriceFields):
    """New prices from ``effective_from`` on; fields left out keep their values."""

    effective_from: datetime | None = Field(None, description=EFFECTIVE_FROM)
    request_price_per_million: DecimalString | None = None
    gb_second_price: DecimalString | None = None
    tiers: list[TierIn] | None = Field(None, max_length=20)
    free_requests: int | None = Field(None, ge=0)
    free_gb_seconds: DecimalString | None = None
    provisioned_gb_second_price: DecimalString | None = None
    provisioned_duration_gb_second_price: DecimalString | None = None
    bill_init: bool | None = None

    def changes(self) -> dict[str, Any]:
        given = {
            name: getattr(self, name)
            for name in self.model_fields_set - {"effective_from"}
            if getattr(self, name) is not None
        }
        if "tiers" in given:
            given["tiers"] = tuple(Tier(t.above_gb_seconds, t.gb_second_price) for t in self.tiers)
        return given


class TierOut(BaseModel):
    above_gb_seconds: str
    gb_second_price: str


class PlanTermsOut(BaseModel):
    request_price_per_million: str
    gb_second_price: str
    tiers: list[TierOut]
    free_requests: int
    free_gb_seconds: str
    provisioned_gb_second_price: str
    provisioned_duration_gb_second_price: str
    bill_init: bool

    @classmethod
    def of(cls, terms: PlanTerms) -> PlanTermsOut:
        return cls(
            request_price_per_million=format_decimal(terms.request_price_per_million),
            gb_second_price=format_decimal(terms.gb_second_price),
            tiers=[
                TierOut(
                    above_gb_seconds=format_decimal(t.above_gb_seconds),
                    gb_second_price=format_decimal(t.gb_second_price),
                )
                for t in terms.tiers
            ],
            free_requests=terms.free_requests,
            free_gb_seconds=format_decimal(terms.free_gb_seconds),
            provisioned_gb_second_price=format_decimal(terms.provisioned_gb_second_price),
            provisioned_duration_gb_second_price=format_decimal(
                terms.provisioned_duration_gb_second_price
            ),
            bill_init=terms.bill_init,
        )


class PlanVersionOut(PlanTermsOut):
    effective_from: datetime


class PlanOut(BaseModel):
    name: str
    currency: str
    minor_units: int
    created_at: datetime
    current: PlanTermsOut = Field(description="The prices in force now")
    versions: list[PlanVersionOut] = Field(description="Every version, oldest first")


class PlanList(BaseModel):
    plans: list[PlanOut]


class TenantPlanOut(BaseModel):
    """The plan a tenant is on now."""

    plan: str
    currency: str
    minor_units: int
    prices: PlanTermsOut


class AssignmentCreate(BaseModel):
    plan: ResourceName
    effective_from: datetime | None = Field(None, description=EFFECTIVE_FROM)


class AssignmentOut(BaseModel):
    tenant_id: str
    plan: str
    effective_from: datetime
    created_at: datetime


class AssignmentList(BaseModel):
    assignments: list[AssignmentOut] = Field(
        description="Oldest first; before the first, the tenant is on the default plan"
    )


class InvoiceLineOut(BaseModel):
    function: str
    kind: Literal["invocations", "provisioned_duration", "provisioned_concurrency"] = Field(
        description="invocations: requests and on-demand duration; provisioned_duration: "
        "duration while provisioned; provisioned_concurrency: the provisioned instances"
    )
    requests: int
    billed_ms: int
    init_billed_ms: int = Field(description="Init duration charged (0 if the plan does not)")
    gb_seconds: str = Field(description="Charged GB-seconds, exact")
    free_requests: int = Field(description="Free allowance applied to this line")
    free_gb_seconds: str
    exact_amount: str = Field(description="Before rounding")
    amount: str = Field(description="exact_amount rounded half-up to the currency's minor unit")


class InvoiceSummary(BaseModel):
    id: str
    tenant_id: str
    period: str = Field(description="YYYY-MM, UTC")
    period_start: datetime
    period_end: datetime
    status: Literal["open", "final"] = Field(
        description="open: a running total; final: stored when the period ended, never changed"
    )
    currency: str
    total: str = Field(description="The sum of the lines' amounts")
    requests: int
    billed_ms: int
    finalised_at: datetime | None
    computed_at: datetime


class InvoiceOut(InvoiceSummary):
    plans: list[str] = Field(description="The plans the period was priced by, in order")
    exact_total: str = Field(description="The sum of the lines' exact amounts")
    gb_seconds: str
    lines: list[InvoiceLineOut]


class InvoiceList(BaseModel):
    invoices: list[InvoiceSummary]


class BudgetIn(BaseModel):
    amount: DecimalString = Field(description="Per billing period, in the plan's currency")
    hard_cap: bool = Field(
        False, description="Refuse invocations (402) once the period's total reaches the amount"
    )


class BudgetOut(BaseModel):
    amount: str
    currency: str
    hard_cap: bool
    period: str
    spent: str = Field(description="The open invoice's total")
    percent_used: str
    capped: bool = Field(description="Invocations are being refused")
    updated_at: datetime


class BudgetEventOut(BaseModel):
    period: str
    threshold_percent: int
    budget_amount: str
    spent: str = Field(description="The period's total when the crossing was seen")
    currency: str
    hard_cap: bool
    occurred_at: datetime


class BudgetEventList(BaseModel):
    events: list[BudgetEventOut] = Field(description="Newest first")
