"""`lambent worker`: one host's sandboxes as their own process, working for a control plane.

The process serves the worker's HTTP API, registers with the control plane and then heartbeats
every ``LAMBENT_HEARTBEAT_S``. With several API processes behind one URL, any of them may take a
heartbeat: they share what they hear through the database. A heartbeat the control plane does
not recognise (it declared this worker dead, or an operator forgot it) is answered by
registering again. Packages the worker has not cached come from the control plane.

On SIGTERM the worker drains: it takes no new instances, deregisters (so no new invocations
arrive and the drain ends), lets running invocations finish for up to ``LAMBENT_WORKER_DRAIN_S``,
then stops its sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from app.logging import get_logger
from app.settings import Settings
from workers import http_api
from workers.agent import Worker, build_worker, worker_id_of

log = get_logger(__name__)

REGISTER_TIMEOUT_S = 15.0
FETCH_TIMEOUT_S = 300.0
REGISTER_RETRY_S = 1.0


class ControlPlaneRefused(RuntimeError):
    """The control plane turned the worker down: a configuration error, not a passing one."""


class PackageUnavailable(RuntimeError):
    pass


class ControlPlane:
    """The worker's calls to the control plane's internal routes."""

    def __init__(self, url: str, token: str, heartbeat_s: float) -> None:
        self.url = url.rstrip("/")
        self.heartbeat_timeout_s = max(2.0, heartbeat_s * 2)
        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=3),
        )

    async def close(self) -> None:
        await self.session.close()

    async def register(self, registration: dict[str, Any]) -> None:
        async with self.session.post(
            f"{self.url}/v1/internal/workers",
            json=registration,
            timeout=aiohttp.ClientTimeout(total=REGISTER_TIMEOUT_S),
        ) as response:
            if response.status == 204:
                return
            message = await _message(response)
            if response.status < 500:
                raise ControlPlaneRefused(f"{response.status}: {message}")
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message=message
            )

    async def heartbeat(self, worker_id: str, beat: dict[str, Any]) -> bool:
        """False when the control plane does not know this worker (it should register)."""
        async with self.session.post(
            f"{self.url}/v1/internal/workers/{worker_id}/heartbeat",
            json=beat,
            timeout=aiohttp.ClientTimeout(total=self.heartbeat_timeout_s),
        ) as response:
            if response.status == 404:
                return False
            if response.status != 204:
                raise ControlPlaneRefused(f"{response.status}: {await _message(response)}")
            return True

    async def deregister(self, worker_id: str) -> None:
        async with self.session.delete(
            f"{self.url}/v1/internal/workers/{worker_id}",
            timeout=aiohttp.ClientTimeout(total=REGISTER_TIMEOUT_S),
        ) as response:
            if response.status not in (204, 404):
                raise ControlPlaneRefused(f"{response.status}: {await _message(response)}")

    async def fetch_package(self, sha256: str, dest: Path) -> None:
        """The worker's code source: a package from the control plane, checked by its hash."""
        async with self.session.get(
            f"{self.url}/v1/internal/packages/{sha256}",
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S, sock_connect=3),
        ) as response:
            if response.status != 200:
                raise PackageUnavailable(
                    f"the control plane answered {response.status} for package {sha256}: "
                    f"{await _message(response)}"
                )
            digest = hashlib.sha256()
            with dest.open("wb") as out:
                async for chunk in response.content.iter_chunked(1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise PackageUnavailable(f"package {sha256} arrived damaged")


async def _message(response: aiohttp.ClientResponse) -> str:
    try:
        return str((await response.json(content_type=None))["message"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return (await response.text())[:200]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class WorkerProcess:
    def __init__(self, settings: Settings) -> None:
        assert settings.worker_token is not None and settings.control_plane_url
        self.settings = settings
        self.token = settings.worker_token.get_secret_value()
        self.listen = split_address(settings.worker_listen)
        self.address = settings.worker_advertise or settings.worker_listen
        self.worker_id = worker_id_of(settings)
        self.boot_id = uuid.uuid4().hex
        self.control_plane = ControlPlane(
            settings.control_plane_url, self.token, settings.heartbeat_s
        )
        self.worker: Worker | None = None
        self.runner: web.AppRunner | None = None

    def registration(self) -> dict[str, Any]:
        assert self.worker is not None
        return {
            "id": self.worker_id,
            "address": self.address,
            "boot_id": self.boot_id,
            "capacity_mb": self.worker.config.memory_mb,
            "cpus": self.settings.worker_cpus,
            "sandbox": self.worker.backend.name,
        }

    def beat(self) -> dict[str, Any]:
        assert self.worker is not None
        usage = self.worker.usage()
        return {
            "boot_id": self.boot_id,
            "reserved_mb": usage.reserved_mb,
            "seq": usage.seq,
            "instances": usage.instances,
            "draining": usage.draining,
            "idle_mb": usage.idle_mb,
        }

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.worker = build_worker(
            self.settings, self.control_plane.fetch_package, worker_id=self.worker_id
        )
        await self.worker.start()
        identity = {
            "worker_id": self.worker_id,
            "boot_id": self.boot_id,
            "capacity_mb": self.worker.config.memory_mb,
            "cpus": self.settings.worker_cpus,
            "sandbox": self.worker.backend.name,
        }
        app = http_api.create_app(self.worker, self.token, identity)
        # A control plane that gives up on a call does not cancel it here: an invocation
        # stopped halfway would leave its instance in an unknown state.
        self.runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=False
        )
        await self.runner.setup()
        host, port = self.listen
        await web.TCPSite(self.runner, host, port, reuse_address=True).start()
        log.info("worker listening", worker_id=self.worker_id, address=self.address)

        try:
            registered = await self._register_first(stop)
        except ControlPlaneRefused as exc:
            log.error(
                "the control plane refused this worker",
                worker_id=self.worker_id,
                reason=str(exc),
            )
            await self._close()
            return 1
        if not registered:  # stopped before the control plane was reachable
            await self._close()
            return 0

        heartbeats = asyncio.create_task(self._heartbeat())
        await stop.wait()
        heartbeats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeats
        await self._shut_down()
        return 0

    async def _register_first(self, stop: asyncio.Event) -> bool:
        """Register, retrying while the control plane cannot be reached; False if stopped."""
        warned = False
        while not stop.is_set():
            try:
                await self.control_plane.register(self.registration())
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if not warned:
                    log.warning(
                        "cannot reach the control plane; retrying",
                        url=self.control_plane.url,
                        error=str(exc) or type(exc).__name__,
                    )
                    warned = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REGISTER_RETRY_S)
                continue
            log.info("worker registered", worker_id=self.worker_id, url=self.control_plane.url)
            return True
        return False

    async def _heartbeat(self) -> None:
        reachable = True
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.settings.heartbeat_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                if not await self.control_plane.heartbeat(self.worker_id, self.beat()):
                    log.info("the control plane does not know this worker; registering again")
                    await self.control_plane.register(self.registration())
                if not reachable:
                    log.info("the control plane is reachable again")
                reachable = True
            except ControlPlaneRefused as exc:
                log.error("the control plane refused a heartbeat", reason=str(exc))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if reachable:
                    log.warning(
                        "cannot reach the control plane",
                        url=self.control_plane.url,
                        error=str(exc) or type(exc).__name__,
                    )
                reachable = False
            next_at = max(next_at, loop.time() - self.settings.heartbeat_s)

    async def _shut_down(self) -> None:
        assert self.worker is not None
        log.info("worker stopping: draining", worker_id=self.worker_id)
        self.worker.draining = True
        try:
            await self.control_plane.deregister(self.worker_id)
        except (ControlPlaneRefused, aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("could not deregister", worker_id=self.worker_id, error=str(exc))
        if not await self.worker.drain(self.settings.worker_drain_s):
            log.warning(
                "invocations still running after the drain; stopping them",
                worker_id=self.worker_id,
                setting="LAMBENT_WORKER_DRAIN_S",
            )
        await self._close()
        log.info("worker stopped", worker_id=self.worker_id)

    async def _close(self) -> None:
        if self.worker is not None:
            await self.worker.close()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.control_plane.close()


async def run(settings: Settings) -> int:
    return await WorkerProcess(settings).run()
