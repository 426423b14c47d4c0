"""The control plane's client of a worker on another host, through the worker's HTTP API.

Calls share one keep-alive connection pool (an ``aiohttp`` session that carries the worker
token). aiohttp rather than httpx because this is on the warm invoke path: on loopback an
aiohttp round trip costs about a quarter of an httpx one.

A call that cannot connect raises ``WorkerUnreachable`` (nothing ran, another worker may take
it); a call cut off later (reset, timeout, worker declared dead) raises ``WorkerUnavailable``,
since the worker may or may not have acted on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from app.logging import get_logger
from workers import http_api
from workers.agent import InstanceInfo
from workers.protocol import (
    InstanceGone,
    InstanceSpec,
    InvokeRequest,
    InvokeResult,
    NoRoom,
    StartResult,
    WorkerUnavailable,
    WorkerUnreachable,
)

log = get_logger(__name__)

# The worker enforces the function's timeout itself and then stops the sandbox; past this
# margin it is taken to have stopped answering.
INVOKE_MARGIN_S = 5.0
# A start may fetch and unpack a 50 MB package before the runtime's own init timeout.
START_TIMEOUT_S = 60.0
CONTROL_TIMEOUT_S = 10.0
# Missing this many heartbeats makes a worker unhealthy: nothing new is placed on it.
UNHEALTHY_AFTER_HEARTBEATS = 3


class RemoteWorkerError(RuntimeError):
    """The worker answered that the call failed there."""


def new_session(token: str) -> aiohttp.ClientSession:
    """The connection pool of a control plane's calls to its workers."""
    return aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"},
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=3),
        auto_decompress=False,
    )


class HttpWorkerClient:
    """A remote worker as the scheduler sees it.

    Free memory is the capacity less the worker's own count of what it reserved (from the
    ``X-Reserved`` header of every answer and from heartbeats, the latest snapshot winning) and
    less what this client is starting there right now, so placing an instance needs no round
    trip. Heartbeats reach one API process; the others learn of them from the workers table
    (app/workers/service.py), so a heartbeat may carry the time it was received.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        worker_id: str,
        address: str,
        boot_id: str,
        capacity_mb: int,
        cpus: int,
        sandbox: str,
        heartbeat_s: float,
    ) -> None:
        self.worker_id = worker_id
        self.address = address
        self.boot_id = boot_id
        self.cpus = cpus
        self.sandbox = sandbox
        self.base_url = f"http://{address}"
        self.heartbeat_s = heartbeat_s
        self.instance_counts: dict[str, int] = {}
        self.draining = False
        self.dead = False
        self.last_heartbeat = time.monotonic()
        self.last_heartbeat_at = datetime.now(UTC)
        self._session = session
        self._capacity_mb = capacity_mb
        self._reserved_mb = 0
        self._reserved_seq = -1
        self._idle_mb = 0
        self._pending_mb = 0
        self._failed_since_heartbeat = False
        self._calls: set[asyncio.Timeout] = set()

    # What the scheduler reads.

    @property
    def capacity_mb(self) -> int:
        return self._capacity_mb

    @property
    def free_mb(self) -> int:
        return self._capacity_mb - self._reserved_mb - self._pending_mb

    @property
    def idle_mb(self) -> int:
        """Memory of idle instances the worker would stop to make room for a new one."""
        return 0 if self.dead else self._idle_mb

    @property
    def healthy(self) -> bool:
        silent_s = time.monotonic() - self.last_heartbeat
        return not (
            self.dead
            or self.draining
            or self._failed_since_heartbeat
            or silent_s > self.heartbeat_s * UNHEALTHY_AFTER_HEARTBEATS
        )

    # What the registry tells it.

    def heartbeat(
        self,
        *,
        reserved_mb: int,
        seq: int,
        instances: dict[str, int],
        draining: bool,
        idle_mb: int = 0,
        at: datetime | None = None,
    ) -> None:
        """A heartbeat, received now or (by another API process) ``at`` then."""
        now = datetime.now(UTC)
        at = min(at or now, now)
        self.last_heartbeat = time.monotonic() - (now - at).total_seconds()
        self.last_heartbeat_at = at
        self._failed_since_heartbeat = False
        self.instance_counts = instances
        self.draining = draining
        self._note_reserved(seq, reserved_mb, idle_mb)

    def identify(self, identity: dict[str, Any]) -> None:
        """Take what the worker's health answer says about it, counting as a heartbeat."""
        self.boot_id = identity["boot_id"]
        self._capacity_mb = identity["capacity_mb"]
        self.cpus = identity["cpus"]
        self.sandbox = identity["sandbox"]
        self.heartbeat(
            reserved_mb=identity["reserved_mb"],
            seq=identity["seq"],
            instances=identity["instances"],
            draining=identity["draining"],
            idle_mb=identity.get("idle_mb", 0),
        )

    def mark_dead(self) -> None:
        """The worker missed its heartbeats: calls in flight raise WorkerUnavailable now."""
        self.dead = True
        now = asyncio.get_running_loop().time()
        for deadline in list(self._calls):
            if not deadline.expired():  # one that expired already raises on its own
                deadline.reschedule(now)

    def _note_reserved(self, seq: int, reserved_mb: int, idle_mb: int) -> None:
        # Idle memory changes without a new sequence number (an instance invoked and back), so
        # a snapshot as recent as the last one counts too.
        if seq >= self._reserved_seq:
            self._reserved_seq, self._reserved_mb, self._idle_mb = seq, reserved_mb, idle_mb

    # Calls.

    async def _request(
        self,
        method: str,
        path: str,
        timeout_s: float,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        if self.dead:
            raise WorkerUnreachable(f"worker {self.worker_id} was declared dead")
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                self._calls.add(deadline)
                try:
                    async with self._session.request(
                        method, self.base_url + path, data=data, headers=headers
                    ) as response:
                        content = await response.read()
                finally:
                    self._calls.discard(deadline)
        except TimeoutError:
            self._failed_since_heartbeat = True
            if self.dead:
                raise WorkerUnavailable(
                    f"worker {self.worker_id} missed its heartbeats and was declared dead"
                ) from None
            raise WorkerUnavailable(
                f"worker {self.worker_id} did not answer within {timeout_s:g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            self._failed_since_heartbeat = True
            raise WorkerUnreachable(
                f"cannot connect to worker {self.worker_id} at {self.address}: {exc}"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            self._failed_since_heartbeat = True
            raise WorkerUnavailable(
                f"worker {self.worker_id} at {self.address} broke off the call: {exc!r}"
            ) from exc

        reserved = response.headers.get(http_api.RESERVED)
        if reserved is not None:
            self._note_reserved(*http_api.parse_reserved(reserved))
        if response.status == 401:
            raise WorkerUnavailable(
                f"worker {self.worker_id} refused the worker token (LAMBENT_WORKER_TOKEN differs)"
            )
        return response.status, response.headers, content

    def _failure(self, status: int, content: bytes) -> Exception:
        try:
            message = json.loads(content)["message"]
        except (ValueError, KeyError, TypeError):
            message = content[:200].decode(errors="replace")
        if status == 404:
            return InstanceGone(message)
        if status == 503:
            return NoRoom(message)
        return RemoteWorkerError(f"worker {self.worker_id} answered {status}: {message}")

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        body = json.dumps({"spec": dataclasses.asdict(spec), "provisioned": provisioned}).encode()
        # Counted before the first await, so concurrent placements see the memory as taken.
        self._pending_mb += spec.memory_mb
        try:
            status, _, content = await self._request(
                "POST",
                "/v1/instances",
                START_TIMEOUT_S,
                data=body,
                headers={"Content-Type": "application/json"},
            )
        finally:
            self._pending_mb -= spec.memory_mb
        if status != 201:
            raise self._failure(status, content)
        return http_api.start_result(json.loads(content))

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult:
        status, headers, content = await self._request(
            "POST",
            f"/v1/instances/{instance_id}/invoke",
            request.timeout_s + INVOKE_MARGIN_S,
            data=request.payload,
            headers=http_api.invoke_headers(request),
        )
        if status != 200:
            raise self._failure(status, content)
        return http_api.invoke_result(request.request_id, headers, content)

    async def stop_instance(self, instance_id: str) -> None:
        status, _, content = await self._request(
            "DELETE", f"/v1/instances/{instance_id}", CONTROL_TIMEOUT_S
        )
        if status != 204:
            raise self._failure(status, content)

    async def keep_instances(self, instance_ids: list[str]) -> list[str]:
        body = json.dumps({"instance_ids": instance_ids}).encode()
        status, _, content = await self._request(
            "POST",
            "/v1/instances/keep",
            CONTROL_TIMEOUT_S,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        if status != 200:
            raise self._failure(status, content)
        return list(json.loads(content)["gone"])

    async def instances(self) -> list[InstanceInfo]:
        status, _, content = await self._request("GET", "/v1/instances", CONTROL_TIMEOUT_S)
        if status != 200:
            raise self._failure(status, content)
        return [http_api.instance_info(item) for item in json.loads(content)["instances"]]

    async def health(self, timeout_s: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        status, _, content = await self._request("GET", "/v1/health", timeout_s)
        if status != 200:
            raise self._failure(status, content)
        return json.loads(content)
