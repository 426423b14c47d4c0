"""The measurements. Each takes a Target and returns plain numbers; none judges them."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

from bench.machine import machine_busy_s, process_cpu_s
from bench.stats import Summary, summarize, summarize_ms
from bench.targets import Lambent, Target

# A small event: enough to exercise JSON decoding, small enough to leave transfer out of it.
EVENT = {"id": 42, "kind": "bench", "tags": ["a", "b"], "ok": True}


class BenchError(RuntimeError):
    """A target answered wrongly, so its numbers would mean nothing."""


def _check(response: httpx.Response, target: Target) -> None:
    if response.status_code != 200 or "x-function-error" in response.headers:
        raise BenchError(f"{target.label} answered {response.status_code}: {response.text[:300]}")


def interleaved_latency(
    targets: list[Target], function: str, *, requests: int, warmup: int, block: int = 100
) -> list[Summary]:
    """Latency of back-to-back requests to each target over its own keep-alive connection,
    measured in alternating blocks of ``block``.

    A shared machine drifts (other tenants of the host, CPU frequency); measured one after the
    other, two targets would each meet a different part of the drift. In alternating blocks
    they meet the same, so their ratio is steadier from run to run.
    """
    clients = [target.client() for target in targets]
    samples: list[list[float]] = [[] for _ in targets]
    try:
        for target, client in zip(targets, clients, strict=True):
            for _ in range(warmup):
                _check(client.post(target.invoke_path(function), json=EVENT), target)
        while len(samples[0]) < requests:
            for index, (target, client) in enumerate(zip(targets, clients, strict=True)):
                path = target.invoke_path(function)
                for _ in range(min(block, requests - len(samples[index]))):
                    start = time.perf_counter()
                    response = client.post(path, json=EVENT)
                    samples[index].append(time.perf_counter() - start)
                    _check(response, target)
    finally:
        for client in clients:
            client.close()
    return [summarize(s) for s in samples]


@dataclass(frozen=True)
class Throughput:
    clients: int
    duration_s: float
    requests: int
    errors: int
    requests_per_s: float
    latency: Summary
    # CPU seconds per request, to show where the machine's time went.
    server_cpu_ms_per_request: float
    machine_cpu_ms_per_request: float
    client_cpu_ms_per_request: float
    machine_busy_pct: float


def _load(
    target: Target, function: str, clients: int, duration_s: float
) -> tuple[list[float], int]:
    """Run ``clients`` threads, each with its own keep-alive client, until the time is up."""
    path = target.invoke_path(function)
    samples: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    deadline = time.perf_counter() + duration_s

    def one_client(index: int) -> None:
        with target.client() as client:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    response = client.post(path, json=EVENT)
                except httpx.HTTPError:
                    errors[index] += 1
                    continue
                if response.status_code == 200:
                    samples[index].append(time.perf_counter() - start)
                else:
                    errors[index] += 1

    _run_threads(one_client, clients)
    return [s for per_client in samples for s in per_client], sum(errors)


def _run_threads(work: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def throughput(
    target: Target, function: str, *, clients: int, duration_s: float, warmup_s: float
) -> Throughput:
    """Closed-loop load: each client sends its next request as soon as the last is answered."""
    # The warm-up window lets Lambent start an instance per concurrent client first.
    _load(target, function, clients, warmup_s)

    cpu_before = (process_cpu_s(target.pid), machine_busy_s(), time.process_time())
    started = time.perf_counter()
    samples, errors = _load(target, function, clients, duration_s)
    elapsed = time.perf_counter() - started
    server_cpu = process_cpu_s(target.pid) - cpu_before[0]
    machine_cpu = machine_busy_s() - cpu_before[1]
    client_cpu = time.process_time() - cpu_before[2]

    done = max(len(samples), 1)
    return Throughput(
        clients=clients,
        duration_s=elapsed,
        requests=len(samples),
        errors=errors,
        requests_per_s=len(samples) / elapsed,
        latency=summarize(samples),
        server_cpu_ms_per_request=server_cpu * 1000 / done,
        machine_cpu_ms_per_request=machine_cpu * 1000 / done,
        client_cpu_ms_per_request=client_cpu * 1000 / done,
        machine_busy_pct=100 * machine_cpu / (elapsed * len(os.sched_getaffinity(0))),
    )


@dataclass(frozen=True)
class ColdStarts:
    count: int
    not_cold: int
    client: Summary  # what the caller waited, request sent to answer read
    init: Summary  # init_duration_ms as Lambent records it
    first_duration: Summary  # duration_ms of the new instance's first invocation
    recorded: Summary  # finished_at - started_at of the invocation record


def cold_starts(lambent: Lambent, function: str, *, count: int, pause_s: float) -> ColdStarts:
    """Invoke right after a revision bump, so that every invocation starts a new instance.

    The pause before each bump lets the previous instance's teardown, and whatever Lambent
    does in the background after a start, finish first: one cold start at a time, as sporadic
    traffic meets them.
    """
    assert lambent.target is not None
    target = lambent.target
    path = target.invoke_path(function)
    client_s: list[float] = []
    init_ms: list[float] = []
    duration_ms: list[float] = []
    recorded_ms: list[float] = []
    not_cold = 0
    with target.client() as client:
        for i in range(count):
            time.sleep(pause_s)
            lambent.force_cold(function, f"cold start {i}")
            start = time.perf_counter()
            response = client.post(path, json=EVENT)
            client_s.append(time.perf_counter() - start)
            _check(response, target)

            record = lambent.invocation(response.headers["x-request-id"])
            if not record["cold_start"] or record["init_duration_ms"] is None:
                not_cold += 1
                continue
            init_ms.append(float(record["init_duration_ms"]))
            duration_ms.append(float(record["duration_ms"]))
            recorded_ms.append(_record_span_ms(record))
    if not init_ms:
        raise BenchError("no invocation was a cold start; revision bumps did not retire instances")
    return ColdStarts(
        count=count,
        not_cold=not_cold,
        client=summarize(client_s),
        init=summarize_ms(init_ms),
        first_duration=summarize_ms(duration_ms),
        recorded=summarize_ms(recorded_ms),
    )


@dataclass(frozen=True)
class RecordedTimes:
    """What Lambent's own invocation records say about a set of invocations."""

    n: int
    duration: Summary  # duration_ms: the event handed to the runtime until its reply
    span: Summary  # finished_at - started_at: scheduling, the sandbox round trip, log assembly


def recorded_times(lambent: Lambent, function: str, count: int) -> RecordedTimes:
    """Summarize the newest ``count`` records (up to 1,000) of a function."""
    records = lambent.recent_invocations(function, count)
    return RecordedTimes(
        n=len(records),
        duration=summarize_ms([float(r["duration_ms"]) for r in records]),
        span=summarize_ms([_record_span_ms(r) for r in records]),
    )


def _record_span_ms(record: dict[str, object]) -> float:
    started = datetime.fromisoformat(str(record["started_at"]).replace("Z", "+00:00"))
    finished = datetime.fromisoformat(str(record["finished_at"]).replace("Z", "+00:00"))
    return (finished - started).total_seconds() * 1000


def process_starts(argv: list[str], *, count: int) -> Summary:
    """Wall time from spawning a command to reaping it."""
    first = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    if first.returncode != 0:
        raise BenchError(f"{argv[0]} failed ({first.returncode}): {first.stderr.decode()[:300]}")
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30)
        samples.append(time.perf_counter() - start)
    return summarize(samples)


@dataclass(frozen=True)
class Burst:
    size: int
    slowest_ms: float  # from the burst's start to its last answer
    latency: Summary
    distinct_instances: int
    request_ids: list[str]


def burst(target: Target, function: str, *, size: int) -> Burst:
    """``size`` requests released at once; each answer names the instance that served it."""
    path = target.invoke_path(function)
    gate = threading.Barrier(size)
    starts, ends = [0.0] * size, [0.0] * size
    responses: list[httpx.Response | Exception | None] = [None] * size

    def one(index: int) -> None:
        with target.client() as client:
            gate.wait(timeout=30)
            starts[index] = time.perf_counter()
            try:
                responses[index] = client.post(path, json=EVENT)
            except httpx.HTTPError as exc:
                responses[index] = exc
            ends[index] = time.perf_counter()

    _run_threads(one, size)
    answers = []
    for response in responses:
        if not isinstance(response, httpx.Response):
            raise BenchError(f"a burst request to {target.label} failed: {response!r}")
        _check(response, target)
        answers.append(response)
    return Burst(
        size=size,
        slowest_ms=(max(ends) - min(starts)) * 1000,
        latency=summarize([end - start for start, end in zip(starts, ends, strict=True)]),
        distinct_instances=len({response.json()["instance"] for response in answers}),
        request_ids=[response.headers.get("x-request-id", "") for response in answers],
    )


def count_cold(lambent: Lambent, request_ids: list[str]) -> int:
    return sum(1 for rid in request_ids if lambent.invocation(rid)["cold_start"])
