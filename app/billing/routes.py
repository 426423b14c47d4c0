from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

from fastapi import APIRouter, Depends, Query, Response

from app.auth import Principal, require_operator, require_tenant
from app.billing import budgets, invoices, service
from app.billing.invoices import InvoiceNotFound, InvoiceView
from app.billing.money import exact, format_decimal, format_exact
from app.billing.periods import Period
from app.billing.runtime import billing
from app.billing.schemas import (
    AssignmentCreate,
    AssignmentList,
    AssignmentOut,
    BudgetEventList,
    BudgetEventOut,
    BudgetIn,
    BudgetOut,
    InvoiceLineOut,
    InvoiceList,
    InvoiceOut,
    InvoiceSummary,
    PlanChange,
    PlanCreate,
    PlanList,
    PlanOut,
    PlanTermsOut,
    PlanVersionOut,
    TenantPlanOut,
)
from app.billing.service import PlanHistory, terms_of
from app.errors import InvalidParameterValue
from app.invocations.writer import records_settled
from app.platform import Platform, get_platform
from app.tenants.schemas import ResourceName

router = APIRouter(tags=["billing"])
CSV_RESPONSE = {200: {"content": {"text/csv": {"schema": {"type": "string"}}}}}


def _now() -> datetime:
    return datetime.now(UTC)


def plan_out(history: PlanHistory, now: datetime) -> PlanOut:
    plan = history.plan
    return PlanOut(
        name=plan.name,
        currency=plan.currency,
        minor_units=plan.minor_units,
        created_at=plan.created_at,
        current=PlanTermsOut.of(history.terms_at(now)),
        versions=[
            PlanVersionOut(
                effective_from=v.effective_from, **PlanTermsOut.of(terms_of(plan, v)).model_dump()
            )
            for v in history.versions
        ],
    )


def _summary_fields(view: InvoiceView) -> dict[str, object]:
    return {
        "id": view.id,
        "tenant_id": view.tenant_id,
        "period": view.period.label,
        "period_start": view.period.start,
        "period_end": view.period.end,
        "status": view.status,
        "currency": view.currency,
        "total": format_decimal(view.total),
        "requests": view.requests,
        "billed_ms": view.billed_ms,
        "finalised_at": view.finalised_at,
        "computed_at": view.computed_at,
    }


def invoice_out(view: InvoiceView) -> InvoiceOut:
    with exact():
        gb_seconds = sum((line.gb_seconds for line in view.lines), Decimal(0))
    return InvoiceOut(
        **_summary_fields(view),
        plans=view.plans,
        exact_total=format_exact(view.exact_total),
        gb_seconds=format_exact(gb_seconds),
        lines=[
            InvoiceLineOut(
                function=line.function_name,
                kind=line.kind.value,
                requests=line.requests,
                billed_ms=line.billed_ms,
                init_billed_ms=line.init_billed_ms,
                gb_seconds=format_exact(line.gb_seconds),
                free_requests=line.free_requests,
                free_gb_seconds=format_exact(line.free_gb_seconds),
                exact_amount=format_exact(line.exact_amount),
                amount=format_decimal(line.amount),
            )
            for line in view.lines
        ],
    )


CSV_COLUMNS = [
    "invoice_id",
    "tenant_id",
    "period",
    "status",
    "currency",
    "function",
    "kind",
    "requests",
    "billed_ms",
    "init_billed_ms",
    "gb_seconds",
    "free_requests",
    "free_gb_seconds",
    "exact_amount",
    "amount",
]


def invoice_csv(view: InvoiceView) -> Response:
    """One row per line, then a total row; the same numbers as the JSON."""
    body = invoice_out(view)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    head = [body.id, body.tenant_id, body.period, body.status, body.currency]
    for line in body.lines:
        writer.writerow(
            head
            + [
                line.function,
                line.kind,
                line.requests,
                line.billed_ms,
                line.init_billed_ms,
                line.gb_seconds,
                line.free_requests,
                line.free_gb_seconds,
                line.exact_amount,
                line.amount,
            ]
        )
    writer.writerow(
        head
        + ["", "total", body.requests, body.billed_ms, "", body.gb_seconds, "", ""]
        + [body.exact_total, body.total]
    )
    return Response(
        buffer.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{body.id}.csv"'},
    )


# Operator: price plans and assignments.


@router.post("/v1/plans", status_code=201, response_model=PlanOut)
async def create_plan(
    body: PlanCreate,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> PlanOut:
    """Create a price plan; its prices apply wherever it is assigned."""
    async with platform.db.sessionmaker() as session:
        history = await service.create_plan(
            session,
            name=body.name,
            currency=body.currency,
            minor_units=body.minor_units,
            terms=body.terms(),
        )
    return plan_out(history, _now())


@router.get("/v1/plans", response_model=PlanList)
async def list_plans(
    _: Principal = Depends(require_operator), platform: Platform = Depends(get_platform)
) -> PlanList:
    """Every price plan with its prices now and its history."""
    now = _now()
    async with platform.db.sessionmaker() as session:
        histories = await service.list_plans(session)
    return PlanList(plans=[plan_out(h, now) for h in histories if h.versions])


@router.get("/v1/plans/{name}", response_model=PlanOut)
async def get_plan(
    name: ResourceName,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> PlanOut:
    """One price plan with its prices now and its history."""
    async with platform.db.sessionmaker() as session:
        history = await service.load_plan(session, name)
    return plan_out(history, _now())


@router.patch("/v1/plans/{name}", response_model=PlanOut)
async def change_plan(
    name: ResourceName,
    body: PlanChange,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> PlanOut:
    """Change a plan's prices from a time on; earlier usage keeps the prices it had."""
    now = _now()
    async with platform.db.sessionmaker() as session:
        history = await service.change_plan(
            session, name, body.changes(), effective_from=body.effective_from, now=now
        )
    return plan_out(history, now)


def assignment_out(a: object) -> AssignmentOut:
    return AssignmentOut.model_validate(a, from_attributes=True)


@router.post(
    "/v1/tenants/{tenant_id}/plan-assignments", status_code=201, response_model=AssignmentOut
)
async def assign_plan(
    tenant_id: str,
    body: AssignmentCreate,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> AssignmentOut:
    """Put a tenant on a price plan from a time on."""
    async with platform.db.sessionmaker() as session:
        assignment = await service.assign_plan(
            session, tenant_id, body.plan, effective_from=body.effective_from, now=_now()
        )
    return assignment_out(assignment)


@router.get("/v1/tenants/{tenant_id}/plan-assignments", response_model=AssignmentList)
async def list_assignments(
    tenant_id: str,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> AssignmentList:
    """A tenant's plan assignments."""
    async with platform.db.sessionmaker() as session:
        rows = await service.list_assignments(session, tenant_id)
    return AssignmentList(assignments=[assignment_out(a) for a in rows])


# Tenant: its plan and invoices.


@router.get("/v1/plan", response_model=TenantPlanOut)
async def get_my_plan(
    tenant_id: str = Depends(require_tenant), platform: Platform = Depends(get_platform)
) -> TenantPlanOut:
    """The price plan you are on now, with its prices."""
    async with platform.db.sessionmaker() as session:
        terms = await service.plan_in_force(session, tenant_id, _now())
    return TenantPlanOut(
        plan=terms.plan,
        currency=terms.currency,
        minor_units=terms.minor_units,
        prices=PlanTermsOut.of(terms),
    )


@router.get("/v1/invoices", response_model=InvoiceList, dependencies=[Depends(records_settled)])
async def list_invoices(
    tenant_id: str = Depends(require_tenant), platform: Platform = Depends(get_platform)
) -> InvoiceList:
    """Your invoices, newest first: the open period's running total, then final ones."""
    async with platform.db.sessionmaker() as session:
        views = await invoices.list_invoices(
            session, tenant_id, _now(), platform.settings.metering_settle_s
        )
    return InvoiceList(invoices=[InvoiceSummary(**_summary_fields(v)) for v in views])


async def _tenant_invoice(platform: Platform, tenant_id: str, invoice_id: str) -> InvoiceView:
    owner, period = invoices.parse_invoice_id(invoice_id)
    if owner != tenant_id:
        raise InvoiceNotFound(f"invoice {invoice_id!r} does not exist")
    async with platform.db.sessionmaker() as session:
        return await invoices.get_invoice(
            session, tenant_id, period, _now(), platform.settings.metering_settle_s
        )


@router.get(
    "/v1/invoices/{invoice_id}.csv",
    response_class=Response,
    responses=CSV_RESPONSE,
    dependencies=[Depends(records_settled)],
)
async def get_invoice_csv(
    invoice_id: str,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> Response:
    """One of your invoices as CSV: a row per line, then the total."""
    return invoice_csv(await _tenant_invoice(platform, tenant_id, invoice_id))


@router.get(
    "/v1/invoices/{invoice_id}", response_model=InvoiceOut, dependencies=[Depends(records_settled)]
)
async def get_invoice(
    invoice_id: str,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> InvoiceOut:
    """One of your invoices with its lines per function."""
    return invoice_out(await _tenant_invoice(platform, tenant_id, invoice_id))


# Operator: every tenant's invoices.


@router.get(
    "/v1/operator/invoices", response_model=InvoiceList, dependencies=[Depends(records_settled)]
)
async def list_all_invoices(
    tenant_id: str | None = Query(None, description="Only this tenant's"),
    period: str | None = Query(None, description="Only this period, YYYY-MM"),
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> InvoiceList:
    """Every tenant's invoices, newest first, open ones with their running totals."""
    try:
        wanted = Period.parse(period) if period else None
    except ValueError as exc:
        raise InvalidParameterValue(str(exc)) from None
    settle_s = platform.settings.metering_settle_s
    now = _now()
    async with platform.db.sessionmaker() as session:
        if tenant_id is not None:
            views = await invoices.list_invoices(session, tenant_id, now, settle_s)
            views = [v for v in views if wanted is None or v.period == wanted]
        else:
            views = await invoices.list_all_invoices(session, now, settle_s, period=wanted)
    return InvoiceList(invoices=[InvoiceSummary(**_summary_fields(v)) for v in views])


async def _any_invoice(platform: Platform, invoice_id: str) -> InvoiceView:
    tenant_id, period = invoices.parse_invoice_id(invoice_id)
    async with platform.db.sessionmaker() as session:
        return await invoices.get_invoice(
            session, tenant_id, period, _now(), platform.settings.metering_settle_s
        )


@router.get(
    "/v1/operator/invoices/{invoice_id}.csv",
    response_class=Response,
    responses=CSV_RESPONSE,
    dependencies=[Depends(records_settled)],
)
async def get_any_invoice_csv(
    invoice_id: str,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Any tenant's invoice as CSV."""
    return invoice_csv(await _any_invoice(platform, invoice_id))


@router.get(
    "/v1/operator/invoices/{invoice_id}",
    response_model=InvoiceOut,
    dependencies=[Depends(records_settled)],
)
async def get_any_invoice(
    invoice_id: str,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> InvoiceOut:
    """Any tenant's invoice with its lines."""
    return invoice_out(await _any_invoice(platform, invoice_id))


# Tenant: budget.


def budget_out(status: budgets.BudgetStatus) -> BudgetOut:
    return BudgetOut(
        amount=format_decimal(status.budget.amount),
        currency=status.currency,
        hard_cap=status.budget.hard_cap,
        period=status.period.label,
        spent=format_decimal(status.spent),
        percent_used=format_decimal(status.percent_used),
        capped=status.capped,
        updated_at=status.budget.updated_at,
    )


@router.put("/v1/budget", response_model=BudgetOut)
async def set_budget(
    body: BudgetIn,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> BudgetOut:
    """Set your monthly budget, and whether reaching it stops invocations."""
    async with platform.db.sessionmaker() as session:
        await budgets.set_budget(session, tenant_id, body.amount, body.hard_cap, _now())
    status = await billing(platform).check_budget(tenant_id)
    assert status is not None
    return budget_out(status)


@router.get("/v1/budget", response_model=BudgetOut, dependencies=[Depends(records_settled)])
async def get_budget(
    tenant_id: str = Depends(require_tenant), platform: Platform = Depends(get_platform)
) -> BudgetOut:
    """Your budget and how much of it this period has used."""
    async with platform.db.sessionmaker() as session:
        await budgets.get_budget(session, tenant_id)
    status = await billing(platform).check_budget(tenant_id)
    if status is None:  # deleted meanwhile
        raise budgets.BudgetNotFound("no budget is set; set one with PUT /v1/budget")
    return budget_out(status)


@router.delete("/v1/budget", status_code=204, response_class=Response)
async def delete_budget(
    tenant_id: str = Depends(require_tenant), platform: Platform = Depends(get_platform)
) -> Response:
    """Remove your budget (and its cap)."""
    async with platform.db.sessionmaker() as session:
        await budgets.delete_budget(session, tenant_id)
    billing(platform).guard.apply(tenant_id, None)
    return Response(status_code=204)


@router.get(
    "/v1/budget/events", response_model=BudgetEventList, dependencies=[Depends(records_settled)]
)
async def list_budget_events(
    tenant_id: str = Depends(require_tenant), platform: Platform = Depends(get_platform)
) -> BudgetEventList:
    """Budget thresholds (80% and 100%) crossed, newest first."""
    async with platform.db.sessionmaker() as session:
        events = await budgets.list_events(session, tenant_id)
    return BudgetEventList(
        events=[
            BudgetEventOut(
                period=Period.containing(e.period_start).label,
                threshold_percent=e.threshold_percent,
                budget_amount=format_decimal(e.budget_amount),
                spent=format_decimal(e.spent),
                currency=e.currency,
                hard_cap=e.hard_cap,
                occurred_at=e.occurred_at,
            )
            for e in events
        ]
    )
