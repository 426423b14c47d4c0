"""The two systems under measurement: Lambent itself, and the bare uvicorn baseline.

Both listen on loopback and answer ``POST /v1/functions/{name}/invocations``, so every
measurement drives them with the same client code and the same request bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import httpx

from bench.handlers import noop, sleepy
from tests.support import Server, Tenant, create_tenant, free_port, start_server

REPO = Path(__file__).resolve().parent.parent
# The function the cold-start measurement restarts over and over; same code as "noop", so the
# warm-path functions keep their instances while it runs.
COLD_FUNCTION = "noop-cold"


@dataclass
class Target:
    label: str
    base_url: str
    pid: int
    headers: dict[str, str] = field(default_factory=dict)

    def invoke_path(self, function: str) -> str:
        return f"/v1/functions/{function}/invocations"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30)


def handler_source(module: ModuleType) -> str:
    return Path(str(module.__file__)).read_text()


class Lambent:
    """``lambent serve`` on SQLite in a temporary directory, with one tenant and its functions.

    ``env`` adds ``LAMBENT_*`` settings to the defaults; ``label`` names it in the results.
    """

    def __init__(self, label: str = "Lambent", env: dict[str, str] | None = None) -> None:
        self.label = label
        self.env = env or {}
        self.root = Path(tempfile.mkdtemp(prefix="lambent-bench-"))
        # The sandbox uid must traverse the data dir; a searchable root keeps the sandbox files
        # under it instead of under /var/lib/lambent, so removing the root removes everything.
        os.chmod(self.root, 0o755)
        self.server: Server | None = None
        self.tenant: Tenant | None = None
        self.target: Target | None = None

    def start(self) -> Target:
        self.server = start_server(
            self.root / "data", admin_key=f"lmbop_bench_{uuid.uuid4().hex}", env=self.env
        )
        self.tenant = create_tenant(self.server, "bench")
        for name, module in (("noop", noop), (COLD_FUNCTION, noop), ("sleepy", sleepy)):
            self.tenant.deploy(name, handler_source(module), handler="app.handler")
        self.target = Target(
            self.label,
            self.server.base_url,
            self.server.process.pid,
            {"Authorization": f"Bearer {self.tenant.key}"},
        )
        return self.target

    def force_cold(self, function: str, marker: str) -> None:
        """Bump the function's revision; that stops its warm instances."""
        assert self.tenant is not None
        response = self.tenant.http.patch(f"/v1/functions/{function}", json={"description": marker})
        response.raise_for_status()

    def invocation(self, request_id: str) -> dict[str, object]:
        assert self.tenant is not None
        return self.tenant.invocation(request_id)

    def recent_invocations(self, function: str, limit: int) -> list[dict[str, object]]:
        """The function's newest invocation records, at most 1,000 (the API's page limit)."""
        assert self.tenant is not None
        response = self.tenant.http.get(
            f"/v1/functions/{function}/invocations", params={"limit": min(limit, 1000)}
        )
        response.raise_for_status()
        return response.json()["invocations"]

    def log_tail(self, lines: int = 40) -> str:
        if self.server is None:
            return ""
        return "\n".join(self.server.log().splitlines()[-lines:])

    def stop(self) -> None:
        if self.tenant is not None:
            self.tenant.http.close()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class Baseline:
    """The handlers behind bench/baseline_app.py, served by uvicorn as its own process."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, headers: dict[str, str]) -> Target:
        """Start serving; ``headers`` are sent with every request (and ignored by the app)."""
        port = free_port()
        # uvicorn's defaults pick the same event loop and HTTP parser (uvloop, httptools) that
        # `lambent serve` gets, and access logging is off in both.
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "bench.baseline_app:app",
                "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log",
            ],
            cwd=REPO,
        )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the baseline server exited during start-up")
            try:
                httpx.post(f"{base_url}/v1/functions/noop/invocations", json={}, timeout=1)
                return Target("bare uvicorn", base_url, self.process.pid, headers)
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the baseline server did not start listening within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
