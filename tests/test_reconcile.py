"""Nothing is lost or counted twice when the platform is killed; ``lambent reconcile`` proves it.

The kill test streams invocations from several threads, SIGKILLs ``lambent serve`` mid-stream,
starts it again on the same database, keeps streaming, and then checks that every invocation
whose response reached a client has exactly one usage record, that usage records and invocation
rows match one to one, and that rollups, usage reads and invoices all agree with the records.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.billing.invoices import compute
from app.billing.periods import MINUTE, Period, ceil_to
from app.db import Database
from app.invocations.models import Invocation
from app.metering.models import RollupState, UsageMinute, UsageRecord
from app.metering.reconcile import reconcile_period
from app.metering.rollups import roll_up
from tests.billing_support import fresh_database, usage_row, with_db, write_usage
from tests.support import LAMBENT, Server, create_tenant, start_server

ADMIN_KEY = f"lmbop_kill_{uuid.uuid4().hex}"
WORK = "def handler(event, context):\n    return sum(range(2000))\n"
FAST_ROLLUPS = {
    "LAMBENT_METERING_SETTLE_S": "1",
    "LAMBENT_ROLLUP_INTERVAL_S": "0.5",
    "LAMBENT_KEEPALIVE_S": "60",
}
CLIENTS = 4


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def reconcile_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")}
    env.update({"LAMBENT_DATABASE_URL": url, "LAMBENT_METERING_SETTLE_S": "1", "COLUMNS": "250"})
    return subprocess.run(
        [str(LAMBENT), "reconcile", *args], env=env, capture_output=True, text=True, timeout=120
    )


class Stream:
    """Client threads invoking a function, following the server across restarts."""

    def __init__(self, server: Server, key: str) -> None:
        self.url = server.base_url
        self.key = key
        self.acknowledged: list[str] = []
        self.failures = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait_for(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acknowledged) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} invocations"
            time.sleep(0.05)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        while not self._stop.is_set():
            try:
                response = httpx.post(
                    f"{self.url}/v1/functions/fn/invocations", json={}, headers=headers, timeout=30
                )
            except httpx.HTTPError:
                with self._lock:
                    self.failures += 1
                time.sleep(0.05)
                continue
            if response.status_code == 200:
                with self._lock:
                    self.acknowledged.append(response.headers["x-request-id"])


@pytest.mark.timeout(300)
def test_nothing_is_lost_or_counted_twice_when_the_platform_is_killed(tmp_path: Path) -> None:
    # Both databases at once: each run waits for a minute to end, and the waits overlap.
    with (
        fresh_database("sqlite", tmp_path / "sqlite") as sqlite_url,
        fresh_database("postgresql", tmp_path) as postgresql_url,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        runs = {
            name: pool.submit(kill_and_reconcile, url, tmp_path / name)
            for name, url in (("sqlite", sqlite_url), ("postgresql", postgresql_url))
        }
        for name, run in runs.items():
            try:
                run.result()
            except Exception as exc:
                raise AssertionError(f"on {name}: {exc}") from exc


def kill_and_reconcile(database: str, work_dir: Path) -> None:
    data_dir = work_dir / "data"
    env = {**FAST_ROLLUPS, "LAMBENT_DATABASE_URL": database}
    server = start_server(data_dir, admin_key=ADMIN_KEY, env=env)
    try:
        tenant = create_tenant(server)
        with server.admin() as admin:
            plan = admin.post(
                "/v1/plans",
                json={
                    "name": "kill-test",
                    "request_price_per_million": "10000",
                    "gb_second_price": "0.5",
                    "provisioned_gb_second_price": "0",
                    "provisioned_duration_gb_second_price": "0",
                },
            )
            assert plan.status_code == 201, plan.text
            assigned = admin.post(
                f"/v1/tenants/{tenant.id}/plan-assignments",
                json={
                    "plan": "kill-test",
                    "effective_from": Period.containing(datetime.now(UTC)).start.isoformat(),
                },
            )
            assert assigned.status_code == 201, assigned.text
        tenant.deploy("fn", WORK)
        stream = Stream(server, tenant.key)
        stream.start()
        stream.wait_for(30)

        server.process.kill()  # SIGKILL: no shutdown, transactions in flight are lost
        server.process.wait()
        killed_at = datetime.now(UTC)
        before_kill = len(stream.acknowledged)
        server = start_server(data_dir, admin_key=ADMIN_KEY, env=env)
        stream.url = server.base_url

        # Keep going until a minute boundary after the kill has passed, so that the rollup job
        # gets to roll up the minutes around the kill.
        boundary = ceil_to(killed_at, MINUTE)
        stream.wait_for(before_kill + 30)
        while datetime.now(UTC) < boundary + timedelta(seconds=2):
            time.sleep(0.2)
        stream.stop()
        assert stream.failures > 0  # the kill did cut the stream
        with_db(database, lambda db: _wait_for_rollups(db, boundary))

        facts = with_db(database, lambda db: _facts(db, tenant.id))
        acknowledged = stream.acknowledged
        assert len(set(acknowledged)) == len(acknowledged)
        # Every answered invocation is metered, once; every usage record has its invocation.
        assert set(acknowledged) <= facts["usage_ids"]
        assert facts["usage_ids"] == facts["invocation_ids"]
        assert facts["usage_rows"] == len(facts["usage_ids"])
        failed = [c for c in facts["checks"] if not c.ok]
        assert not failed, failed
        assert facts["minutes_to"] >= boundary

        # The invoice the tenant sees equals the records priced directly, to the cent.
        tenant.http.close()
        with server.client(tenant.key) as http:
            invoices = http.get("/v1/invoices").json()["invoices"]
        assert invoices[0]["requests"] == facts["priced"].requests
        assert invoices[0]["total"] == str(facts["priced"].total)
    finally:
        server.stop()

    result = reconcile_cli(database, "--tenant", tenant.id)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checks agree" in result.stdout


async def _wait_for_rollups(db: Database, boundary: datetime) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with db.sessionmaker() as session:
            minutes_to = await session.scalar(select(RollupState.minutes_to))
        if minutes_to is not None and minutes_to >= boundary:
            return
        time.sleep(0.2)
    raise AssertionError(f"rollups did not reach {boundary}")


async def _facts(db: Database, tenant_id: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    period = Period.containing(now)
    async with db.sessionmaker() as session:
        usage_ids = set(
            (
                await session.execute(
                    select(UsageRecord.request_id).where(UsageRecord.tenant_id == tenant_id)
                )
            ).scalars()
        )
        usage_rows = await session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
        )
        invocation_ids = set(
            (
                await session.execute(
                    select(Invocation.request_id).where(Invocation.tenant_id == tenant_id)
                )
            ).scalars()
        )
        checks = await reconcile_period(session, period, now)
        priced = await compute(session, tenant_id, period, now, source="records")
        minutes_to = await session.scalar(select(RollupState.minutes_to))
    return {
        "usage_ids": usage_ids,
        "usage_rows": usage_rows,
        "invocation_ids": invocation_ids,
        "checks": checks,
        "priced": priced,
        "minutes_to": minutes_to,
    }


def test_reconcile_exits_non_zero_on_any_mismatch(database: str) -> None:
    tenant = "t-cli"
    at = Period.containing(datetime.now(UTC)).previous().start + timedelta(days=2, minutes=3)
    rows = [usage_row(tenant, "f", at + timedelta(seconds=s), billed_ms=100) for s in (1, 20)]

    async def setup(db: Database) -> None:
        await write_usage(db, rows)
        await roll_up(db.engine, settle_s=0)

    with_db(database, setup)
    agreed = reconcile_cli(database, "--verbose")

    async def tamper(db: Database) -> None:
        async with db.engine.begin() as conn:
            await conn.execute(
                update(UsageMinute)
                .where(UsageMinute.tenant_id == tenant)
                .values(requests=UsageMinute.requests + 1)
            )

    with_db(database, tamper)
    differs = reconcile_cli(database)

    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "minute rollups = records" in agreed.stdout
    assert differs.returncode == 1
    assert "MISMATCH" in differs.stdout and "minute rollups = records" in differs.stdout
    assert "checks differ" in differs.stderr
