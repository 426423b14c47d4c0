"""Measure Lambent against baselines run on the same machine in the same run.

    .venv/bin/python bench/run.py            # one to two minutes
    .venv/bin/python bench/run.py --quick    # about half a minute, noisier

Prints one table per benchmark and writes everything to bench/results/latest.json. These are
measurements, not tests: nothing passes or fails. bench/README.md explains how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

# Run as a script, Python puts bench/ on the path; the benchmarks import the repository's
# packages (bench, tests.support) from its root.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.settings import Settings  # noqa: E402
from bench import scenarios  # noqa: E402
from bench.machine import background_busy_pct, machine_facts  # noqa: E402
from bench.report import Table, ms, ratio  # noqa: E402
from bench.stats import Summary  # noqa: E402
from bench.targets import COLD_FUNCTION, Baseline, Lambent, Target  # noqa: E402

RESULTS = REPO / "bench" / "results"
SANDBOX_PYTHON = "/usr/bin/python3"
BARE_PYTHON = [SANDBOX_PYTHON, "-c", "pass"]
# The least a sandboxed interpreter start can cost: fresh namespaces, the host's /usr read-only.
BARE_BWRAP = [
    "bwrap", "--unshare-all", "--die-with-parent",
    "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64",
    "--symlink", "usr/bin", "/bin",
    "--proc", "/proc", "--dev", "/dev",
    *BARE_PYTHON,
]  # fmt: skip
SLEEP_MS = 100  # what bench/handlers/sleepy.py sleeps
# Warm latency alternates between the baseline and Lambent in blocks of this many requests.
WARM_BLOCK = 100
# Between cold starts: longer than a sandbox takes to start, so each one finds Lambent settled.
COLD_PAUSE_S = 0.3
# Background load above this share of the cores makes a run worth repeating.
BUSY_PCT = 10.0
QUIET = " (quiet enough)"
NOISY = ": SOMETHING ELSE WAS RUNNING, so these numbers are skewed; run again on a quiet machine"


@dataclass(frozen=True)
class Profile:
    name: str
    warm_requests: int
    warm_warmup: int
    clients: int
    load_s: float
    load_warmup_s: float
    cold_starts: int
    process_starts: int
    burst_size: int


DEFAULT = Profile(
    name="default",
    warm_requests=2000,
    warm_warmup=100,
    clients=16,
    load_s=15.0,
    load_warmup_s=2.0,
    cold_starts=30,
    process_starts=50,
    burst_size=50,
)
QUICK = Profile(
    name="quick",
    warm_requests=200,
    warm_warmup=30,
    clients=16,
    load_s=3.0,
    load_warmup_s=1.0,
    cold_starts=8,
    process_starts=10,
    burst_size=20,
)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def lambent_target(lambent: Lambent) -> Target:
    if lambent.target is None:
        raise RuntimeError("lambent serve is not started")
    return lambent.target


def warm_latency(profile: Profile, lambent: Lambent, baseline: Target) -> tuple[Table, dict]:
    ours_target = lambent_target(lambent)
    progress(
        f"warm latency: {profile.warm_requests} sequential requests to each of bare uvicorn and "
        f"Lambent, in alternating blocks of {WARM_BLOCK}"
    )
    base, ours = scenarios.interleaved_latency(
        [baseline, ours_target],
        "noop",
        requests=profile.warm_requests,
        warmup=profile.warm_warmup,
        block=WARM_BLOCK,
    )
    recorded = scenarios.recorded_times(lambent, "noop", profile.warm_requests)

    table = Table(
        f"1. Warm invoke latency, ms: no-op handler, {profile.warm_requests} sequential requests "
        f"to each on one keep-alive connection (after {profile.warm_warmup} warm-up requests), "
        f"the two alternating every {WARM_BLOCK}",
        ["", "p50", "p90", "p99", "mean", "max"],
    )
    rows = [
        (baseline.label, base),
        (ours_target.label, ours),
        ("  of which: record span", recorded.span),
        ("  of which: sandbox round trip", recorded.duration),
    ]
    for label, s in rows:
        table.add(label, ms(s.p50_ms), ms(s.p90_ms), ms(s.p99_ms), ms(s.mean_ms), ms(s.max_ms))
    table.add(
        "ratio Lambent / bare",
        ratio(ours.p50_ms, base.p50_ms),
        ratio(ours.p90_ms, base.p90_ms),
        ratio(ours.p99_ms, base.p99_ms),
        ratio(ours.mean_ms, base.mean_ms),
    )
    table.notes += [
        f"Lambent adds {ms(ours.p50_ms - base.p50_ms)} ms at p50 to what a plain web app "
        "hosting the same handler costs.",
        "Both times include the benchmark's own httpx client, which is a fixed share of each.",
        f"The 'of which' rows come from Lambent's own records of the last {recorded.n} requests: "
        "the span from started_at to finished_at (scheduling, the sandbox round trip, building "
        "the log) and duration_ms (the runtime getting the event until its reply). Whatever "
        "the caller waits beyond the span is HTTP, auth and journaling the records (on SQLite "
        "they are committed after the answer).",
    ]
    record = {
        "lambent": asdict(ours),
        "lambent_recorded": asdict(recorded),
        "baseline": asdict(base),
        "ratio_p50": ours.p50_ms / base.p50_ms,
    }
    return table, record


def load(profile: Profile, lambent: Lambent, baseline: Target) -> tuple[Table, dict]:
    ours_target = lambent_target(lambent)
    results = {}
    for target in (baseline, ours_target):
        progress(
            f"throughput: {profile.clients} clients for {profile.load_s:g} s "
            f"(+{profile.load_warmup_s:g} s warm-up) against {target.label}"
        )
        results[target.label] = scenarios.throughput(
            target,
            "noop",
            clients=profile.clients,
            duration_s=profile.load_s,
            warmup_s=profile.load_warmup_s,
        )
    ours, base = results[ours_target.label], results[baseline.label]
    recorded = scenarios.recorded_times(lambent, "noop", ours.requests)

    table = Table(
        f"2. Throughput: no-op handler, {profile.clients} concurrent keep-alive clients, "
        f"each sending its next request on the last answer, for {profile.load_s:g} s",
        ["", "req/s", "p50 ms", "p99 ms", "errors", "server CPU", "all CPU", "client CPU",
         "machine busy"],
    )  # fmt: skip
    for label, t in results.items():
        table.add(
            label,
            f"{t.requests_per_s:.0f}",
            ms(t.latency.p50_ms),
            ms(t.latency.p99_ms),
            str(t.errors),
            f"{t.server_cpu_ms_per_request:.2f} ms",
            f"{t.machine_cpu_ms_per_request:.2f} ms",
            f"{t.client_cpu_ms_per_request:.2f} ms",
            f"{t.machine_busy_pct:.0f}%",
        )
    table.add(
        "ratio Lambent / bare",
        ratio(ours.requests_per_s, base.requests_per_s),
        ratio(ours.latency.p50_ms, base.latency.p50_ms),
        ratio(ours.latency.p99_ms, base.latency.p99_ms),
        "",
        ratio(ours.server_cpu_ms_per_request, base.server_cpu_ms_per_request),
        ratio(ours.machine_cpu_ms_per_request, base.machine_cpu_ms_per_request),
    )
    table.notes += [
        "CPU columns are CPU time per answered request: 'server' is the API process alone, "
        "'all' is the whole machine (server, sandboxes, client, kernel), 'client' is this "
        "benchmark's load generator, which shares the same cores.",
        "Machine busy near 100% means the cores, not the design, set the ceiling; the "
        "client's share of 'all' is then capacity the servers did not get. Well below it, "
        "requests are waiting on something other than CPU.",
        f"Lambent's records of the last {recorded.n} of these requests put the span from "
        f"started_at to finished_at at p50 {ms(recorded.span.p50_ms)} ms, "
        f"p99 {ms(recorded.span.p99_ms)} ms; the rest of the caller's wait is spent outside "
        "it (HTTP, auth, and journaling the invocation and usage records).",
    ]
    record = {
        "lambent": asdict(ours),
        "lambent_recorded": asdict(recorded),
        "baseline": asdict(base),
        "ratio_requests_per_s": ours.requests_per_s / base.requests_per_s,
    }
    return table, record


def prestart_setting() -> str | None:
    """The setting that sizes the pre-started sandbox pool, if this Lambent has one."""
    return "LAMBENT_PRESTART_POOL_SIZE" if "prestart_pool_size" in Settings.model_fields else None


def cold(profile: Profile, lambent: Lambent) -> tuple[Table, dict]:
    count = profile.cold_starts
    progress(f"cold starts: {count} revision bumps and invocations on {lambent.label}")
    runs = {
        lambent.label: scenarios.cold_starts(
            lambent, COLD_FUNCTION, count=count, pause_s=COLD_PAUSE_S
        )
    }

    # With a pool, a cold start takes a sandbox whose runtime is already running; a second
    # server without one shows what a start from nothing costs, the bare bwrap baseline's match.
    setting = prestart_setting()
    if setting is not None:
        scratch = Lambent("Lambent, pool off", {setting: "0"})
        progress(f"cold starts: starting a second lambent serve with {setting}=0")
        try:
            scratch.start()
            runs[scratch.label] = scenarios.cold_starts(
                scratch, COLD_FUNCTION, count=count, pause_s=COLD_PAUSE_S
            )
        finally:
            scratch.stop()

    progress(f"cold starts: {profile.process_starts} bare bwrap and plain python starts")
    bwrap = scenarios.process_starts(BARE_BWRAP, count=profile.process_starts)
    python = scenarios.process_starts(BARE_PYTHON, count=profile.process_starts)

    table = Table(
        f"3. Cold start, ms: {count} invocations, each right after a revision bump (which stops "
        f"the warm instance), against {profile.process_starts} bare process starts",
        ["", "p50", "p90", "p99", "mean"],
    )
    for label, run in runs.items():
        table.add(f"{label}: caller's wait", *quartet(run.client))
        table.add(f"{label}: init_duration_ms", *quartet(run.init))
        table.add(f"{label}: first duration_ms", *quartet(run.first_duration))
    table.add("bare bwrap + python3 -c pass", *quartet(bwrap))
    table.add("python3 -c pass, no sandbox", *quartet(python))
    for label, run in runs.items():
        table.add(f"ratio {label} wait / bare bwrap", *ratios(run.client, bwrap))
    table.add("ratio bare bwrap / no sandbox", *ratios(bwrap, python))

    table.notes += [
        "init_duration_ms is Lambent's own figure: from the sandbox process being spawned to "
        "the runtime's first request for an event. The caller also waits for what comes "
        "before it (placement, cgroups, the Runtime API server) and after it: the new "
        "instance's first invocation (its duration_ms; about the warm figure when nothing "
        "competes with it) and journaling the records.",
        f"Cold starts run one at a time, {COLD_PAUSE_S:g} s apart. The code is already "
        "unpacked on the worker, so fetching and extracting it are not included.",
    ]
    if setting is not None:
        table.notes.append(
            f"'{lambent.label}' runs with the default pre-start pool: a cold start takes a "
            "sandbox whose runtime is already running, and init_duration_ms covers only handing "
            f"it over and loading the function. 'Lambent, pool off' is a second server started "
            f"with {setting}=0: each start spawns its sandbox, like the bare bwrap baseline."
        )
    for label, run in runs.items():
        if run.not_cold:
            table.notes.append(
                f"{label}: {run.not_cold} of {run.count} invocations were not cold starts and "
                "are left out."
            )
    record = {
        "pause_s": COLD_PAUSE_S,
        "lambent": {label: asdict(run) for label, run in runs.items()},
        "bare_bwrap": asdict(bwrap),
        "bare_python": asdict(python),
        "bwrap_argv": BARE_BWRAP,
        "ratio_client_p50_to_bwrap_p50": {
            label: run.client.p50_ms / bwrap.p50_ms for label, run in runs.items()
        },
    }
    return table, record


def quartet(s: Summary) -> tuple[str, str, str, str]:
    return ms(s.p50_ms), ms(s.p90_ms), ms(s.p99_ms), ms(s.mean_ms)


def ratios(a: Summary, b: Summary) -> tuple[str, str, str, str]:
    return (
        ratio(a.p50_ms, b.p50_ms),
        ratio(a.p90_ms, b.p90_ms),
        ratio(a.p99_ms, b.p99_ms),
        ratio(a.mean_ms, b.mean_ms),
    )


def bursts(profile: Profile, lambent: Lambent, baseline: Target) -> tuple[Table, dict]:
    size = profile.burst_size
    progress(f"burst: {size} concurrent invocations of a {SLEEP_MS} ms handler, cold then warm")
    cold_burst = scenarios.burst(lambent_target(lambent), "sleepy", size=size)
    cold_count = scenarios.count_cold(lambent, cold_burst.request_ids)
    warm_burst = scenarios.burst(lambent_target(lambent), "sleepy", size=size)
    warm_cold_count = scenarios.count_cold(lambent, warm_burst.request_ids)
    base_burst = scenarios.burst(baseline, "sleepy", size=size)

    table = Table(
        f"4. Burst: {size} concurrent invocations of a handler that sleeps {SLEEP_MS} ms",
        ["", "slowest ms", "p50 ms", "instances", "cold starts"],
    )
    table.add("ideal: the sleep alone", str(SLEEP_MS), str(SLEEP_MS), "", "")
    for label, b, colds in (
        ("Lambent, no instance warm", cold_burst, str(cold_count)),
        ("Lambent, same burst again", warm_burst, str(warm_cold_count)),
        ("bare uvicorn (thread pool)", base_burst, "n/a"),
    ):
        table.add(label, ms(b.slowest_ms), ms(b.latency.p50_ms), str(b.distinct_instances), colds)
    table.add(
        "ratio Lambent cold / bare",
        ratio(cold_burst.slowest_ms, base_burst.slowest_ms),
        ratio(cold_burst.latency.p50_ms, base_burst.latency.p50_ms),
    )
    table.add(
        "ratio Lambent warm / bare",
        ratio(warm_burst.slowest_ms, base_burst.slowest_ms),
        ratio(warm_burst.latency.p50_ms, base_burst.latency.p50_ms),
    )
    table.notes += [
        "An instance serves one invocation at a time, so a burst on no warm instances starts "
        "one per request and they all initialise at once on the same cores; 'instances' counts "
        "the distinct ids the handler's module drew at import.",
        "The baseline runs the handler on the thread pool of one process: one 'instance'.",
    ]
    record = {
        "lambent_cold": asdict(cold_burst) | {"cold_starts": cold_count},
        "lambent_warm": asdict(warm_burst) | {"cold_starts": warm_cold_count},
        "baseline": asdict(base_burst),
        "ratio_slowest_cold_to_baseline": cold_burst.slowest_ms / base_burst.slowest_ms,
    }
    return table, record


def machine_header(facts: dict, profile: Profile, elapsed_s: float) -> str:
    background_pct = max(facts["busy_before_pct"], facts["busy_after_pct"])
    verdict = QUIET if background_pct < BUSY_PCT else NOISY
    return "\n".join(
        [
            f"Lambent benchmarks, {profile.name} profile, "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, took {elapsed_s:.0f} s",
            f"  machine: {facts['cpu_cores']} cores ({facts['cpu_cores_usable']} usable), "
            f"{facts['cpu_model']}, {facts['memory_gib']} GiB, {facts['kernel']}",
            f"  python:  {facts['bench_python']} runs the API, baseline and client; "
            f"{facts['sandbox_python']} ({facts['sandbox_python_path']}) runs in the sandboxes",
            f"  also:    {facts['bwrap']}, lambent at {facts['lambent_commit']}, "
            "SQLite, everything on 127.0.0.1",
            f"  others:  the machine was {facts['busy_before_pct']:.0f}% busy in the second "
            f"before the run and {facts['busy_after_pct']:.0f}% in the second after it{verdict}",
            "  ratios are Lambent divided by its baseline from this same run: above 1x means "
            "slower (or, for req/s, more)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples; about 30 s")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else DEFAULT
    # A terminated run should still stop its servers and remove their temporary files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    started = time.perf_counter()
    facts = machine_facts(SANDBOX_PYTHON)
    # Anything else running shares the cores with both sides and skews every ratio.
    facts["busy_before_pct"] = round(background_busy_pct(), 1)
    facts["load_average_1m_before"] = round(os.getloadavg()[0], 2)
    lambent, baseline_server = Lambent(), Baseline()
    tables: list[Table] = []
    results: dict[str, dict] = {}
    try:
        progress("starting lambent serve (SQLite, temporary data dir) and the bare uvicorn app")
        ours = lambent.start()
        # The same header on both sides keeps the requests the same size; the baseline
        # ignores it.
        key_length = len(ours.headers["Authorization"]) - len("Bearer ")
        baseline = baseline_server.start({"Authorization": "Bearer " + "x" * key_length})

        for key, run in (
            ("warm_latency", lambda: warm_latency(profile, lambent, baseline)),
            ("throughput", lambda: load(profile, lambent, baseline)),
            ("cold_start", lambda: cold(profile, lambent)),
            ("burst", lambda: bursts(profile, lambent, baseline)),
        ):
            table, record = run()
            tables.append(table)
            results[key] = record
    except Exception:
        print(f"lambent serve's log ends:\n{lambent.log_tail()}", file=sys.stderr)
        raise
    finally:
        baseline_server.stop()
        lambent.stop()
    facts["busy_after_pct"] = round(background_busy_pct(), 1)
    elapsed = time.perf_counter() - started

    RESULTS.mkdir(exist_ok=True)
    output = RESULTS / "latest.json"
    document = {
        "finished_at": datetime.now(UTC).isoformat(),
        "elapsed_s": round(elapsed, 1),
        "profile": asdict(profile),
        "machine": facts,
        "results": results,
    }
    output.write_text(json.dumps(document, indent=2) + "\n")

    print()
    print(machine_header(facts, profile, elapsed))
    for table in tables:
        print()
        print(table.render())
    print(f"\nAll numbers, with more detail, are in {output.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
