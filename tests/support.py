"""Builders and clients shared by the tests."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
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
import pytest

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    admin_key: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    database: str
    sandbox: str = "process"

    @property
    def worker_id(self) -> str:
        """The embedded worker's id, which it keeps in its data dir."""
        return (self.data_dir / "worker-id").read_text().strip()

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
    port: int | None = None,
    sandbox: str = "process",
) -> Server:
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")}
    process_env.update(
        {
            "LAMBENT_DATA_DIR": str(data_dir),
            "LAMBENT_LOG_LEVEL": "info",
            "LAMBENT_SANDBOX": sandbox,
        }
    )
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
        f"http://127.0.0.1:{port}", admin_key or "", data_dir, process, log_path, database, sandbox
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"lambent serve exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                if sandbox == "docker":
                    DOCKER_WORKER_IDS.add(server.worker_id)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"lambent serve did not become healthy:\n{server.log()}")


@dataclass
class WorkerAgent:
    """A `lambent worker` process, registered with a server."""

    id: str
    host: str
    port: int
    data_dir: Path
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    @property
    def sandbox_dir(self) -> Path:
        return resolve_sandbox_dir(self.data_dir, None)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict[str, Any] | None:
        """The worker's own health answer; None while it does not answer."""
        try:
            response = httpx.get(
                f"{self.base_url}/v1/health",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=2,
            )
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM (a graceful drain), then SIGKILL if it lingers; then drop its sandbox files."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.sandbox_dir.is_relative_to("/var/lib/lambent"):
            shutil.rmtree(self.sandbox_dir, ignore_errors=True)


def spawn_worker(
    server: Server,
    data_dir: Path,
    token: str,
    *,
    worker_id: str,
    host: str = "127.0.0.2",
    port: int | None = None,
    memory_mb: int = 1024,
    env: dict[str, str] | None = None,
) -> WorkerAgent:
    """Start `lambent worker` for ``server``; see ``wait_registered``."""
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-worker.log"
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")}
    process_env.update(
        {"LAMBENT_DATA_DIR": str(data_dir), "LAMBENT_WORKER_TOKEN": token, **(env or {})}
    )
    command = [
        str(LAMBENT),
        "worker",
        "--listen",
        f"{host}:{port}",
        "--control-plane",
        server.base_url,
        "--memory-mb",
        str(memory_mb),
        "--id",
        worker_id,
    ]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=process_env, cwd=data_dir.parent
        )
    return WorkerAgent(worker_id, host, port, data_dir, token, process, log_path)


def wait_registered(server: Server, *workers: WorkerAgent, timeout_s: float = 30) -> None:
    """Wait until every one of ``workers`` answers, and the server lists it as healthy."""
    deadline = time.monotonic() + timeout_s
    with server.admin() as admin:
        while time.monotonic() < deadline:
            for worker in workers:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"lambent worker {worker.id} exited:\n{worker.log()}")
            listed = {w["id"]: w["status"] for w in admin.get("/v1/workers").json()["workers"]}
            if all(
                listed.get(worker.id) == "healthy" and worker.health() is not None
                for worker in workers
            ):
                return
            time.sleep(0.1)
    logs = "\n".join(worker.log() for worker in workers)
    raise RuntimeError(f"workers did not register in time:\n{logs}\n{server.log()}")


def start_worker(server: Server, data_dir: Path, token: str, **kwargs: Any) -> WorkerAgent:
    worker = spawn_worker(server, data_dir, token, **kwargs)
    try:
        wait_registered(server, worker)
    except BaseException:
        worker.stop()
        raise
    return worker


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


# The Docker sandbox's tests.

# Ids of the Docker workers the tests started: none may leave a container behind.
DOCKER_WORKER_IDS: set[str] = set()
# Images the tests built, removed at the end of the session, once no container runs them.
TEST_IMAGES: set[str] = set()


def docker_client():  # type: ignore[no-untyped-def]
    import docker

    return docker.from_env()


def require_docker() -> None:
    """Fail, saying what to do, unless the Docker engine answers and has Lambent's images."""
    import docker.errors

    from workers.agent import SUPPORTED_RUNTIMES
    from workers.images import missing_images, required_images

    try:
        client = docker_client()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"the Docker engine does not answer ({exc}): run the suite with `make test`, which "
            "installs and starts it"
        )
    missing = missing_images(client, required_images(SUPPORTED_RUNTIMES))
    if missing:
        pytest.fail(f"the images {missing} are missing: run `lambent images build` or `make test`")


def leftover_containers() -> list[str]:
    """Containers, running or not, of the Docker workers the tests started."""
    if not DOCKER_WORKER_IDS:
        return []
    client = docker_client()
    found = []
    for worker_id in sorted(DOCKER_WORKER_IDS):
        containers = client.api.containers(
            all=True, filters={"label": f"lambent.worker={worker_id}"}
        )
        found += [f"{c['Names'][0]} ({c['State']})" for c in containers]
    return found


def wait_for_prestarted(server: Server, timeout_s: float = 30) -> None:
    """Wait until a Docker server's worker has a pre-started sandbox free for every runtime.

    A container takes a third of a second to start, so a pool drained by the previous tests
    can still be refilling; the process sandbox's pool refills faster than tests use it.
    """
    if server.sandbox != "docker":
        return
    from workers.agent import SUPPORTED_RUNTIMES

    tasks = resolve_sandbox_dir(server.data_dir, None) / "tasks"
    client = docker_client()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free = set()
        containers = client.api.containers(
            filters={"label": [f"lambent.worker={server.worker_id}", "lambent.prestarted"]}
        )
        for container in containers:
            labels = container["Labels"]
            task_dir = tasks / labels["lambent.instance"]
            # An empty task dir: the sandbox waits for a function.
            if task_dir.is_dir() and not any(task_dir.iterdir()):
                free.add(labels["lambent.prestarted"])
        if free >= set(SUPPORTED_RUNTIMES):
            return
        time.sleep(0.05)
    raise AssertionError(f"the pre-started pool did not refill in {timeout_s} s")


def remove_test_images() -> None:
    import docker.errors

    client = docker_client()
    for image in sorted(TEST_IMAGES):
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(image, force=True)
    TEST_IMAGES.clear()


def container_of(instance_id: str) -> dict[str, Any]:
    """The engine's record of an instance's container."""
    containers = docker_client().api.containers(
        all=True, filters={"label": f"lambent.instance={instance_id}"}
    )
    assert len(containers) == 1, containers
    return docker_client().api.inspect_container(containers[0]["Id"])
