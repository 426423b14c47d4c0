"""The process sandbox: bubblewrap namespaces inside per-instance cgroups.

Each instance gets new user, PID, IPC, UTS, cgroup, mount and network namespaces (the network
namespace holds only its own loopback), a read-only view of the host's ``/usr``, a synthetic
``/etc``, a size-capped private ``/tmp``, the code read-only at ``/var/task`` and nothing else of
the host. bwrap itself runs as an unprivileged host uid, so even an escape lands outside root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

from app.logging import get_logger
from workers import cgroups
from workers.sandbox.base import (
    API_DIR,
    RUNTIME_DIR,
    TASK_ROOT,
    OutputHandler,
    SandboxSpec,
    SandboxStartError,
)
from workers.sandbox.output import OutputPipe

log = get_logger(__name__)

# The uid and gid code sees inside the sandbox (Lambda's sandbox user has the same).
SANDBOX_INNER_ID = 993
# Linux pipes buffer 64 KiB; staying under it lets the arguments be written before bwrap runs.
ARGS_PIPE_BYTES = 60 * 1024

ETC_FILES = {
    "passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"sbx_user:x:{SANDBOX_INNER_ID}:{SANDBOX_INNER_ID}::/tmp:/usr/sbin/nologin\n",
    "group": f"root:x:0:\nsbx_user:x:{SANDBOX_INNER_ID}:\n",
    "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


class BubblewrapSandbox:
    def __init__(
        self,
        instance_id: str,
        process: asyncio.subprocess.Process,
        cgroup: cgroups.InstanceCgroup,
        output_fd: int,
    ) -> None:
        self.instance_id = instance_id
        self.process = process
        self.cgroup = cgroup
        self._output = OutputPipe(output_fd)
        self._destroyed = False
        self._peak_mb = 0
        self._oom = False

    def set_output_handler(self, handler: OutputHandler) -> None:
        self._output.set_handler(handler)

    def drain_output(self) -> None:
        # Whatever the runtime wrote before it replied is already in the pipe: read it now
        # rather than wait for the event loop to notice, so it lands in the right invocation.
        self._output.drain()

    async def wait(self) -> int:
        return await self.process.wait()

    def peak_memory_mb(self) -> int:
        return self._peak_mb if self._destroyed else self.cgroup.peak_memory_mb()

    def oom_killed(self) -> bool:
        return self._oom if self._destroyed else self.cgroup.oom_kills() > 0

    async def resize(self, memory_mb: int) -> None:
        await asyncio.to_thread(self.cgroup.resize, memory_mb)

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._peak_mb = self.cgroup.peak_memory_mb()
        self._oom = self.cgroup.oom_kills() > 0
        self._destroyed = True

        # Killing bwrap takes its PID namespace with it (--die-with-parent, and the kernel
        # ends every process of a namespace whose init dies); the cgroup sweep catches the rest.
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.cgroup.kill_all()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout=5)
        self._output.drain()
        self._output.close()
        await asyncio.to_thread(self.cgroup.destroy)


class BubblewrapBackend:
    name = "process"

    def __init__(self, *, state_dir: Path, sandbox_uid: int, sandbox_gid: int) -> None:
        self.state_dir = state_dir
        self.sandbox_uid = sandbox_uid
        self.sandbox_gid = sandbox_gid
        self.bwrap = shutil.which("bwrap")
        self.setpriv = shutil.which("setpriv")
        if not self.bwrap or not self.setpriv:
            raise SandboxStartError(
                "the process sandbox needs bubblewrap (bwrap) and setpriv: "
                "apt-get install -y bubblewrap util-linux"
            )
        cgroups.check_available()
        cgroups.remove_stale_groups()
        self.etc_dir = state_dir / "etc"
        self._write_etc()

    def _write_etc(self) -> None:
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.etc_dir, 0o755)
        for name, content in ETC_FILES.items():
            path = self.etc_dir / name
            path.write_text(content)
            os.chmod(path, 0o644)
        # Resolved inside the sandbox, where /usr is the host's, read-only.
        localtime = self.etc_dir / "localtime"
        if not localtime.is_symlink():
            localtime.symlink_to("/usr/share/zoneinfo/UTC")

    def launcher(self, args_fd: int) -> list[str]:
        """The host command line: drop to the sandbox uid, then bwrap reading its arguments."""
        return [
            self.setpriv,
            f"--reuid={self.sandbox_uid}",
            f"--regid={self.sandbox_gid}",
            "--clear-groups",
            "--no-new-privs",
            self.bwrap,
            "--args",
            str(args_fd),
        ]

    def bwrap_args(self, spec: SandboxSpec) -> list[str]:
        """bwrap's arguments, passed through a pipe rather than the command line.

        The function's environment (secrets, often) would otherwise be readable by every user
        of the host in /proc/<pid>/cmdline, and inside the sandbox as well.
        """
        tmp_bytes = spec.tmp_mb * 1024 * 1024
        args = [
            "--unshare-all",
            "--unshare-user",
            "--die-with-parent",
            "--new-session",
            "--disable-userns",
            "--uid", str(SANDBOX_INNER_ID),
            "--gid", str(SANDBOX_INNER_ID),
            "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64",
            "--ro-bind", str(self.etc_dir), "/etc",
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(tmp_bytes), "--tmpfs", "/tmp",
            "--ro-bind", str(spec.code_dir), TASK_ROOT,
            "--ro-bind", str(spec.runtime_dir), RUNTIME_DIR,
            "--bind", str(spec.api_dir), API_DIR,
            "--chdir", TASK_ROOT,
            "--clearenv",
        ]  # fmt: skip
        for key, value in spec.env.items():
            args += ["--setenv", key, value]
        return args

    async def start(self, spec: SandboxSpec) -> BubblewrapSandbox:
        if spec.image is not None or spec.code_dir is None:
            raise SandboxStartError(
                "the process sandbox runs zip packages only; container images need "
                "LAMBENT_SANDBOX=docker"
            )
        cgroup = cgroups.InstanceCgroup(spec.instance_id)
        await asyncio.to_thread(
            cgroup.create, cgroups.CgroupLimits(memory_mb=spec.memory_mb, pids_max=spec.pids_max)
        )

        encoded = b"".join(arg.encode() + b"\0" for arg in self.bwrap_args(spec))
        if len(encoded) > ARGS_PIPE_BYTES:
            await asyncio.to_thread(cgroup.destroy)
            raise SandboxStartError(f"sandbox arguments take {len(encoded)} bytes; too many")
        args_read, args_write = os.pipe()
        # Written whole before bwrap starts: it fits in the pipe's buffer, so this never blocks.
        os.write(args_write, encoded)
        os.close(args_write)

        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *cgroup.join_command(),
                *self.launcher(args_read),
                # bwrap takes its command from the real command line only; it holds no secrets.
                "--",
                *spec.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                pass_fds=(args_read,),
                # The worker's own working directory is no business of the sandbox's.
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            await asyncio.to_thread(cgroup.destroy)
            raise SandboxStartError(f"could not start bwrap: {exc}") from exc
        finally:
            os.close(write_fd)
            os.close(args_read)

        log.debug("sandbox started", instance_id=spec.instance_id, pid=process.pid)
        return BubblewrapSandbox(spec.instance_id, process, cgroup, read_fd)

    async def close(self) -> None:
        return None
