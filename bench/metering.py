"""What metering costs: warm invocations with metering on and off, and an invoice at scale.

    .venv/bin/python bench/metering.py                    # 10,000,000 usage records
    .venv/bin/python bench/metering.py --records 1000000  # quicker
    .venv/bin/python bench/metering.py --skip-invoice     # latency only

1. Warm latency. One Lambent server (SQLite, the embedded worker) runs in this process and a
   client in a child process invokes a no-op function one request at a time, in blocks;
   between blocks the server's metering switch (``LAMBENT_METERING_ENABLED``) is flipped, in
   ABBA order. Metering off still writes the invocation row; the difference is the usage
   record and the budget bookkeeping on the invoke path (the background jobs run in both).
2. An invoice for one tenant with many usage records. Records spread evenly over last month
   across ten functions are bulk-loaded into a fresh SQLite database, the rollup job runs over
   them, and then the tenant's invoice for the month is computed the way the API does (rollups,
   then the records' open tail) and, for comparison, from the records alone.

Progress goes to stderr, the results to stdout and to bench/results/metering.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from multiprocessing import Pipe, Process
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from tests.support import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results"
NOOP = "def handler(event, context):\n    return event\n"
MODES = {"metering on": True, "metering off": False}
FUNCTIONS = 10
BATCH = 200_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(ordered: list[float], q: float) -> float:
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ordered),
        "p50_ms": percentile(ordered, 50),
        "p90_ms": percentile(ordered, 90),
        "p99_ms": percentile(ordered, 99),
        "mean_ms": statistics.fmean(ordered),
    }


# 1. Warm latency, metering on against off.


def client_process(base_url: str, key: str, conn: Connection) -> None:
    """Invoke in blocks when told to, and send back each block's latencies."""
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        while True:
            count = conn.recv()
            if count == 0:
                return
            samples = []
            for _ in range(count):
                began = time.perf_counter()
                response = client.post("/v1/functions/noop/invocations", content=b"{}")
                samples.append(time.perf_counter() - began)
                if response.status_code != 200:
                    raise RuntimeError(f"invocation failed: {response.status_code}")
            conn.send(samples)


def warm_latency(requests: int, block: int, warmup: int) -> dict[str, Any]:
    """One server, metering switched on and off between blocks of requests.

    Separate server processes configured alike differ by up to 30% in median latency on a
    small virtual machine (where each lands, what it shares a core with), which swamps the
    effect measured here. So the server runs in this process, the client in a child process,
    and the metering switch is flipped between blocks (ABBA order), pairing the two modes in
    one process and one stretch of time.
    """
    from app.main import create_app
    from app.migrate import upgrade_to_head
    from app.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="lambent-metering-bench-"))
    os.chmod(root, 0o755)  # the sandbox uid must reach the code cache below it
    settings = Settings(
        data_dir=root / "data",
        admin_key=f"lmbop_bench_{uuid.uuid4().hex}",
        log_level="warning",
        port=free_port(),
    )
    settings.data_dir.mkdir()
    upgrade_to_head(settings.resolved_database_url)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{settings.port}"
    samples: dict[str, list[float]] = {name: [] for name in MODES}
    per_block: dict[str, list[float]] = {name: [] for name in MODES}
    try:
        while not server.started:
            time.sleep(0.05)
        admin = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {settings.admin_key.get_secret_value()}"},
        )
        key = admin.post("/v1/tenants", json={"name": "bench"}).json()["api_key"]
        code = base64.b64encode(zip_of(NOOP)).decode()
        created = httpx.post(
            f"{base_url}/v1/functions",
            headers={"Authorization": f"Bearer {key}"},
            json={"name": "noop", "runtime": "python3.11", "handler": "app.handler",
                  "code": {"zip_base64": code}},
        )  # fmt: skip
        created.raise_for_status()
        parent, child = Pipe()
        client = Process(target=client_process, args=(base_url, key, child))
        client.start()
        parent.send(warmup)
        parent.recv()
        rounds = max(1, requests // block)
        log(f"warm latency: {rounds} rounds of {block} requests in each mode")
        for r in range(rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for name in order:
                settings.metering_enabled = MODES[name]
                parent.send(block)
                taken = parent.recv()
                samples[name] += taken
                per_block[name].append(statistics.median(taken) * 1000)
        parent.send(0)
        client.join(timeout=30)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    result: dict[str, Any] = {name: summary(s) for name, s in samples.items()}
    on_s, off_s = result["metering on"], result["metering off"]
    pairs = zip(per_block["metering on"], per_block["metering off"], strict=True)
    wins = sum(on > off for on, off in pairs)
    result["blocks"] = len(per_block["metering on"])
    result["blocks_where_on_was_slower"] = wins
    result["overhead"] = {
        "p50_pct": 100 * (on_s["p50_ms"] / off_s["p50_ms"] - 1),
        "mean_pct": 100 * (on_s["mean_ms"] / off_s["mean_ms"] - 1),
        "p99_pct": 100 * (on_s["p99_ms"] / off_s["p99_ms"] - 1),
    }
    return result


def zip_of(source: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", source)
    return buffer.getvalue()


# 2. An invoice for a tenant with many usage records.


def sqlite_time(at: datetime) -> str:
    """A timestamp as SQLAlchemy stores it in SQLite."""
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def load_records(path: Path, tenant_id: str, start: datetime, end: datetime, count: int) -> float:
    """Bulk-load ``count`` usage records spread evenly over [start, end); returns rows/s.

    Request ids are sequential so that the primary key grows at its end, and the secondary
    indexes are rebuilt once after loading: both only make the load faster, not the queries.
    """
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("DROP INDEX ix_usage_records_tenant_recorded")
    db.execute("DROP INDEX ix_usage_records_recorded_at")
    step_us = (end - start) / timedelta(microseconds=1) / count
    began = time.perf_counter()
    for first in range(0, count, BATCH):
        rows = []
        for i in range(first, min(first + BATCH, count)):
            memory_mb = (128, 256, 512, 1024, 1769)[i % 5]
            billed = 1 + (i * 7919) % 2000
            rows.append(
                (
                    f"bench-{i:012d}",
                    tenant_id,
                    f"fn{i % FUNCTIONS:02d}",
                    f"function-{i % FUNCTIONS:02d}",
                    sqlite_time(start + timedelta(microseconds=int(i * step_us))),
                    1,
                    memory_mb,
                    billed,
                    billed * memory_mb,
                    300 if i % 1000 == 0 else 0,
                )
            )
        db.executemany("INSERT INTO usage_records VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
        db.commit()
        done = min(first + BATCH, count)
        if done % 1_000_000 == 0 or done == count:
            log(f"  loaded {done:,} records")
    db.execute(
        "CREATE INDEX ix_usage_records_tenant_recorded ON usage_records (tenant_id, recorded_at)"
    )
    db.execute("CREATE INDEX ix_usage_records_recorded_at ON usage_records (recorded_at)")
    db.commit()
    db.close()
    return count / (time.perf_counter() - began)


async def invoice_timings(
    url: str, tenant_id: str, runs: int, from_records: bool
) -> dict[str, Any]:
    from app.billing.invoices import compute
    from app.billing.periods import Period
    from app.billing.service import ensure_default_plan
    from app.db import Database
    from app.metering.rollups import roll_up

    db = Database(url)
    try:
        async with db.sessionmaker() as session:
            await ensure_default_plan(session)
        began = time.perf_counter()
        await roll_up(db.engine, settle_s=0)
        rollup_s = time.perf_counter() - began
        log(f"  rolled up in {rollup_s:.1f} s")

        period = Period.containing(datetime.now(UTC)).previous()
        times, priced = [], None
        for _ in range(runs):
            async with db.sessionmaker() as session:
                began = time.perf_counter()
                priced = await compute(session, tenant_id, period, datetime.now(UTC))
                times.append(time.perf_counter() - began)
        assert priced is not None
        result: dict[str, Any] = {
            "rollup_s": rollup_s,
            "invoice": summary(times),
            "invoice_total": f"{priced.total} {priced.currency}",
            "invoice_requests": priced.requests,
        }
        if from_records:
            log("  pricing the month from the records alone (a full scan)")
            async with db.sessionmaker() as session:
                began = time.perf_counter()
                raw = await compute(session, tenant_id, period, datetime.now(UTC), source="records")
                result["invoice_from_records_s"] = time.perf_counter() - began
            result["totals_agree"] = raw.total == priced.total and raw.requests == priced.requests
        return result
    finally:
        await db.dispose()


def invoice_at_scale(count: int, runs: int, from_records: bool) -> dict[str, Any]:
    from app.billing.periods import Period
    from app.migrate import upgrade_to_head
    from app.settings import async_database_url

    root = Path(tempfile.mkdtemp(prefix="lambent-invoice-bench-"))
    try:
        path = root / "lambent.db"
        url = async_database_url(f"sqlite:///{path}")
        upgrade_to_head(url)
        period = Period.containing(datetime.now(UTC)).previous()
        tenant_id = uuid.uuid4().hex
        log(f"invoice: loading {count:,} usage records into {period.label}")
        rate = load_records(path, tenant_id, period.start, period.end, count)
        result = asyncio.run(invoice_timings(url, tenant_id, runs, from_records))
        result.update(
            records=count,
            load_rows_per_s=rate,
            database_mb=sum(f.stat().st_size for f in root.iterdir()) / 2**20,
        )
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="warm requests per mode")
    parser.add_argument("--block", type=int, default=100, help="requests per block")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--invoice-runs", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-invoice", action="store_true")
    parser.add_argument(
        "--no-records-scan", action="store_true", help="skip pricing from the records alone"
    )
    args = parser.parse_args()

    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(),
        "cpus": os.cpu_count(),
    }
    if not args.skip_latency:
        results["warm_latency"] = warm_latency(args.requests, args.block, args.warmup)
    if not args.skip_invoice:
        results["invoice"] = invoice_at_scale(
            args.records, args.invoice_runs, not args.no_records_scan
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "metering.json").write_text(json.dumps(results, indent=2, default=str))
    print(report(results))


def report(results: dict[str, Any]) -> str:
    lines = []
    latency = results.get("warm_latency")
    if latency:
        lines.append("Warm invocation latency, metering on against off (ms)")
        lines.append(f"  {'':14}{'n':>7}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
        for name in ("metering on", "metering off"):
            s = latency[name]
            lines.append(
                f"  {name:14}{s['n']:>7}{s['p50_ms']:>9.3f}{s['p90_ms']:>9.3f}"
                f"{s['p99_ms']:>9.3f}{s['mean_ms']:>9.3f}"
            )
        lines.append(
            f"  blocks where metering on had the higher median: "
            f"{latency['blocks_where_on_was_slower']} of {latency['blocks']}"
        )
        o = latency["overhead"]
        lines.append(
            f"  metering adds {o['p50_pct']:+.1f}% at the median, {o['mean_pct']:+.1f}% on the "
            f"mean, {o['p99_pct']:+.1f}% at p99"
        )
    invoice = results.get("invoice")
    if invoice:
        lines.append("")
        lines.append(f"Invoice for one tenant with {invoice['records']:,} usage records (SQLite)")
        lines.append(f"  bulk load: {invoice['load_rows_per_s']:,.0f} records/s")
        lines.append(f"  rollup job over all of them: {invoice['rollup_s']:.1f} s")
        s = invoice["invoice"]
        lines.append(
            f"  invoice (rollups + open tail): median {s['p50_ms']:.1f} ms, "
            f"max of {s['n']} {s['p99_ms']:.1f} ms -> {invoice['invoice_total']}"
        )
        if "invoice_from_records_s" in invoice:
            lines.append(
                f"  the same from the records alone: {invoice['invoice_from_records_s']:.1f} s "
                f"(totals agree: {invoice['totals_agree']})"
            )
        lines.append(f"  database size: {invoice['database_mb']:,.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
