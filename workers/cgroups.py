"""Per-instance control groups (cgroup v1): memory limit and peak, pids limit, CPU share.

Lambent's machines run the hybrid hierarchy, so each controller is its own tree under
``/sys/fs/cgroup/<controller>/lambent/<instance>``. A process joins the groups by writing its own
pid before it execs the sandbox (see ``join_command``), so nothing it forks escapes them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpu")
PARENT = "lambent"
STALE_AFTER_S = 60.0

# Lambda gives a function one vCPU at 1,769 MB; shares follow the same slope. A share is a weight
# under contention, not a cap, so a small function still starts at full speed on an idle host.
MB_PER_VCPU = 1769
FULL_SHARE = 1024


class CgroupUnavailable(RuntimeError):
    pass


def check_available() -> None:
    missing = [c for c in CONTROLLERS if not (CGROUP_ROOT / c / "cgroup.procs").exists()]
    if missing:
        raise CgroupUnavailable(
            "the process sandbox needs the cgroup v1 controllers "
            f"{', '.join(CONTROLLERS)} under {CGROUP_ROOT}; missing: {', '.join(missing)}"
        )


@dataclass(frozen=True)
class CgroupLimits:
    memory_mb: int
    pids_max: int


class InstanceCgroup:
    def __init__(self, name: str) -> None:
        self.name = name
        self.paths = {c: CGROUP_ROOT / c / PARENT / name for c in CONTROLLERS}
        # Read after every invocation: kept open, so that each read is one pread.
        self._peak_fd: int | None = None

    def create(self, limits: CgroupLimits) -> None:
        for path in self.paths.values():
            path.mkdir(parents=True, exist_ok=True)

        self._set_memory_limit(limits.memory_mb)
        _write(self.paths["memory"] / "memory.swappiness", "0")
        _write(self.paths["pids"] / "pids.max", str(limits.pids_max))
        _write(self.paths["cpu"] / "cpu.shares", str(_cpu_shares(limits.memory_mb)))

    def resize(self, memory_mb: int) -> None:
        """Change the memory limit of a live group, and the CPU share that follows from it.

        The kernel refuses (EBUSY) a memory limit below what the group already uses.
        """
        self._set_memory_limit(memory_mb)
        _write(self.paths["cpu"] / "cpu.shares", str(_cpu_shares(memory_mb)))

    def _set_memory_limit(self, memory_mb: int) -> None:
        memory = self.paths["memory"]
        limit_bytes = memory_mb * 1024 * 1024
        grows = limit_bytes > int(_read(memory / "memory.limit_in_bytes") or 0)
        # The memory+swap limit may never be below the memory limit: it is raised first and
        # lowered last.
        if grows:
            self._set_memsw_limit(limit_bytes)
        _write(memory / "memory.limit_in_bytes", str(limit_bytes))
        if not grows:
            self._set_memsw_limit(limit_bytes)

    def _set_memsw_limit(self, limit_bytes: int) -> None:
        # memsw exists only with swap accounting; without it there is no swap to escape into.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            _write(self.paths["memory"] / "memory.memsw.limit_in_bytes", str(limit_bytes))

    def join_command(self) -> list[str]:
        """A command prefix that moves itself into the groups, then execs the rest."""
        targets = " ".join(str(p / "cgroup.procs") for p in self.paths.values())
        script = f'for f in {targets}; do echo $$ > "$f" || exit 125; done; exec "$@"'
        return ["/bin/sh", "-c", script, "lambent-cgroup-join"]

    def peak_memory_mb(self) -> int:
        try:
            if self._peak_fd is None:
                path = self.paths["memory"] / "memory.max_usage_in_bytes"
                self._peak_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            raw = os.pread(self._peak_fd, 32, 0)
        except OSError:  # the group is gone (or going)
            self._close_peak()
            return 0
        return -(-int(raw or 0) // (1024 * 1024))

    def _close_peak(self) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None

    def oom_kills(self) -> int:
        for line in _read(self.paths["memory"] / "memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        # Older kernels report no count; a hit limit is the next best evidence.
        return int(_read(self.paths["memory"] / "memory.failcnt") or 0)

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.paths["pids"] / "cgroup.procs").split()]

    def kill_all(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def destroy(self, wait_s: float = 2.0) -> None:
        """Kill what is left inside and remove the groups; a busy group is retried briefly."""
        self._close_peak()
        deadline = time.monotonic() + wait_s
        for path in self.paths.values():
            while path.exists():
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    self.kill_all()
                    time.sleep(0.01)


def _cpu_shares(memory_mb: int) -> int:
    return max(2, FULL_SHARE * memory_mb // MB_PER_VCPU)


def remove_stale_groups(min_age_s: float = STALE_AFTER_S) -> int:
    """Remove empty groups left by a worker that died; groups with live processes stay.

    Several workers may share a host, and a group is empty for a moment between its creation
    and its sandbox joining it; only groups older than ``min_age_s`` are taken for stale.
    """
    removed = 0
    cutoff = time.time() - min_age_s
    for controller in CONTROLLERS:
        parent = CGROUP_ROOT / controller / PARENT
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            with contextlib.suppress(OSError):
                if child.stat().st_mtime > cutoff:
                    continue
            if child.is_dir() and not _read(child / "cgroup.procs").strip():
                with contextlib.suppress(OSError):
                    child.rmdir()
                    removed += 1
    return removed


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
