"""Facts about the host, and CPU time read from /proc, so results say where they came from."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    # `python -V` and `bwrap --version` print on stdout; older Pythons printed on stderr.
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _lambent_commit() -> str:
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return f"{head} with uncommitted changes" if status.stdout.strip() else head


def machine_facts(sandbox_python: str) -> dict[str, object]:
    return {
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "bench_python": f"{platform.python_implementation()} {platform.python_version()}",
        "bench_python_path": sys.executable,
        "sandbox_python": _first_line([sandbox_python, "-V"]),
        "sandbox_python_path": sandbox_python,
        "bwrap": _first_line(["bwrap", "--version"]),
        "lambent_commit": _lambent_commit(),
    }


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used (its reaped children not included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces; the fields after it are fixed.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent not idle, over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_S


def background_busy_pct(window_s: float = 1.0) -> float:
    """How busy the machine is before the benchmark starts anything, in percent of all cores."""
    before = machine_busy_s()
    time.sleep(window_s)
    return 100 * (machine_busy_s() - before) / (window_s * len(os.sched_getaffinity(0)))
