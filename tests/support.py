"""Builders and clients shared by the tests."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from workers.agent import resolve_sandbox_dir

REPO = Path(__file__).resolve().parent.parent
LAMBENT = REPO / ".venv" / "bin" / "lambent"


def make_zip(files: dict[str, str | bytes], modes: dict[str, int] | None = None) -> bytes:
    """A zip package from {path: content}; modes sets unix permission bits per path."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            mode = (modes or {}).get(name, 0o644)
            info.external_attr = (0o100000 | mode) << 16
            zf.writestr(info, content)
    return buf.getvalue()


def python_package(source: str, module: str = "app") -> bytes:
    return make_zip({f"{module}.py": source})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    admin_key: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    database: str

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)

    def admin(self) -> httpx.Client:
        return self.client(self.admin_key)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # Test data dirs sit in private temp dirs, so the server kept its sandbox files
        # (code cache) under /var/lib/lambent; they are of no use after the test.
        sandbox_dir = resolve_sandbox_dir(self.data_dir, None)
        if sandbox_dir.is_relative_to("/var/lib/lambent"):
            shutil.rmtree(sandbox_dir, ignore_errors=True)


def start_server(
    data_dir: Path,
    *,
    database_url: str | None = None,
    admin_key: str | None = None,
    env: dict[str, str] | None = None,
    database: str = "sqlite",
) -> Server:
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")}
    process_env.update({"LAMBENT_DATA_DIR": str(data_dir), "LAMBENT_LOG_LEVEL": "info"})
    if admin_key:
        process_env["LAMBENT_ADMIN_KEY"] = admin_key
    if database_url:
        process_env["LAMBENT_DATABASE_URL"] = database_url
    process_env.update(env or {})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(LAMBENT), "serve", "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=process_env,
            cwd=data_dir.parent,
        )
    server = Server(
        f"http://127.0.0.1:{port}", admin_key or "", data_dir, process, log_path, database
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lambent serve exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"lambent serve did not become healthy:\n{server.log()}")


@dataclass
class Tenant:
    """A tenant of a running server, with a client that carries its key."""

    server: Server
    id: str
    name: str
    key: str
    http: httpx.Client = field(repr=False)

    def deploy(
        self,
        name: str,
        source: str | None = None,
        *,
        files: dict[str, str | bytes] | None = None,
        modes: dict[str, int] | None = None,
        runtime: str = "python3.11",
        handler: str = "app.handler",
        expect: int = 201,
        **config: Any,
    ) -> dict[str, Any]:
        package = make_zip(files if files is not None else {"app.py": source or ""}, modes)
        body = {
            "name": name,
            "runtime": runtime,
            "handler": handler,
            "code": {"zip_base64": base64.b64encode(package).decode()},
            **config,
        }
        response = self.http.post("/v1/functions", json=body)
        assert response.status_code == expect, response.text
        return response.json()

    def invoke(self, name: str, event: Any = None, **kwargs: Any) -> httpx.Response:
        if "content" in kwargs:
            return self.http.post(f"/v1/functions/{name}/invocations", **kwargs)
        return self.http.post(f"/v1/functions/{name}/invocations", json=event or {}, **kwargs)

    def invocation(self, request_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v1/invocations/{request_id}")
        assert response.status_code == 200, response.text
        return response.json()


def create_tenant(server: Server, name: str | None = None) -> Tenant:
    name = name or f"t-{uuid.uuid4().hex[:12]}"
    with server.admin() as admin:
        response = admin.post("/v1/tenants", json={"name": name})
    assert response.status_code == 201, response.text
    body = response.json()
    return Tenant(server, body["id"], body["name"], body["api_key"], server.client(body["api_key"]))


def python_executable() -> str:
    return sys.executable
