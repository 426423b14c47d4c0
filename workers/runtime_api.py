"""The worker's side of the Lambda Runtime API, one server per execution environment.

The runtime inside the sandbox long-polls ``GET /next`` for an event and answers it with
``/response`` or ``/error``; a runtime that cannot load the function posts ``/init/error``
instead. The server listens on a Unix socket that is bind-mounted into the sandbox, so the
sandbox needs no network. The execution environment drives it with ``wait_init()`` and
``invoke()``, and calls ``abort()`` when the sandbox dies or runs out of time.

A pre-started runtime, started before its function was known, first long-polls Lambent's own
``GET /2018-06-01/lambent/assignment``; the worker answers it with ``assign()``, handing over
the function's environment, and from there on the runtime starts as any other would.

One invocation runs at a time. Everything here runs on the worker's event loop, so the
hand-over between ``invoke()`` and the runtime's requests needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from app.logging import get_logger

log = get_logger(__name__)

_PREFIX = "/2018-06-01/runtime"
ASSIGNMENT_PATH = "/2018-06-01/lambent/assignment"
_ACCEPTED = b'{"status":"OK"}'
_JSON = "application/json"

# aiohttp refuses bodies over client_max_size while reading them. The margin lets a body of
# exactly max_response_bytes through; the precise check against the limit is ours.
_BODY_MARGIN_BYTES = 64 * 1024

# aiohttp closes idle keep-alive connections after this long. The runtime's connection sits idle
# for as long as a handler runs, so it must outlast the longest function timeout (15 minutes).
_KEEPALIVE_TIMEOUT_S = 3600.0

# How long stop() lets handlers that are still reading a body finish before cancelling them.
# Long-polling /next requests are woken by abort() and do not count against it.
_SHUTDOWN_TIMEOUT_S = 1.0


class RuntimeGone(Exception):
    """The runtime can no longer answer: its sandbox died or was stopped."""


class ResponseTooLarge(Exception):
    """The runtime posted a response larger than the server accepts."""


@dataclass(frozen=True)
class InitFailure:
    error_type: str
    body: bytes


@dataclass(frozen=True)
class InvocationReply:
    request_id: str
    ok: bool
    body: bytes
    error_type: str | None
    dispatched_ns: int
    completed_ns: int


class _Invocation:
    __slots__ = ("request_id", "payload", "headers", "reply", "dispatched_ns")

    def __init__(
        self,
        request_id: str,
        payload: bytes,
        headers: dict[str, str],
        reply: asyncio.Future[InvocationReply],
    ) -> None:
        self.request_id = request_id
        self.payload = payload
        self.headers = headers
        self.reply = reply
        # Zero until the runtime has received the event; a reply before that is not valid.
        self.dispatched_ns = 0


class RuntimeApiServer:
    """Serves the Runtime API for one execution environment on a Unix socket."""

    def __init__(
        self,
        socket_path: Path,
        *,
        max_response_bytes: int = 6 * 1024 * 1024,
        prestarted: bool = False,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.max_response_bytes = max_response_bytes
        self.prestarted = prestarted
        # A pre-started runtime's pending assignment poll, and what answers it: the function's
        # environment, or None once the server is gone.
        self._assignment: asyncio.Future[dict[str, str] | None] | None = None
        self._assignment_poll: web.Request | None = None
        self._assignment_polled = asyncio.Event()
        self._assignment_delivered = False
        self._runner: web.AppRunner | None = None
        self._init: asyncio.Future[InitFailure | None] | None = None
        self._current: _Invocation | None = None
        # Events the runtime has not asked for yet, and /next requests waiting for an event.
        # Normally at most one of the two is non-empty.
        self._queued: deque[_Invocation] = deque()
        self._pollers: deque[asyncio.Future[_Invocation | None]] = deque()
        self._gone: str | None = None

    async def start(self) -> None:
        """Create the socket and start serving."""
        if self._runner is not None:
            raise RuntimeError(f"runtime API server on {self.socket_path} is already started")

        self._init = asyncio.get_running_loop().create_future()
        if self.prestarted:
            self._assignment = asyncio.get_running_loop().create_future()
        app = web.Application(client_max_size=self.max_response_bytes + _BODY_MARGIN_BYTES)
        app.router.add_get(f"{_PREFIX}/invocation/next", self._handle_next, allow_head=False)
        app.router.add_post(f"{_PREFIX}/invocation/{{request_id}}/response", self._handle_response)
        app.router.add_post(f"{_PREFIX}/invocation/{{request_id}}/error", self._handle_error)
        app.router.add_post(f"{_PREFIX}/init/error", self._handle_init_error)
        app.router.add_get(ASSIGNMENT_PATH, self._handle_assignment, allow_head=False)
        app.router.add_route("*", "/{path:.*}", self._handle_unknown)

        runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=_KEEPALIVE_TIMEOUT_S,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        try:
            await web.UnixSite(runner, str(self.socket_path)).start()
            # The runtime connects as an unprivileged uid inside the sandbox. Who can reach the
            # socket is decided by its directory, which is mounted into this sandbox only.
            os.chmod(self.socket_path, 0o666)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving and remove the socket; a pending wait raises RuntimeGone."""
        self.abort("the runtime API server stopped")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def wait_init(self) -> InitFailure | None:
        """Wait for the end of the init phase: None when the runtime first asks for an event."""
        if self._init is None:
            raise RuntimeError("the runtime API server is not started")
        # Shielded so that a caller giving up does not erase the outcome for the next caller.
        return await asyncio.shield(self._init)

    @property
    def awaiting_assignment(self) -> bool:
        """True while a pre-started runtime is polling for its assignment on a live connection."""
        poll = self._assignment_poll
        if poll is None or self._assignment is None or self._assignment.done():
            return False
        transport = poll.transport
        return transport is not None and not transport.is_closing()

    async def wait_for_assignment_poll(self) -> None:
        """Wait until the pre-started runtime first asks for its assignment: it is ready."""
        await self._assignment_polled.wait()

    def assign(self, environment: dict[str, str]) -> bool:
        """Answer the pre-started runtime's assignment poll with its function's environment.

        False, and nothing is handed over, when the runtime is not polling for one (it died, or
        was already assigned); the caller should not count on this runtime then.
        """
        if self._assignment is None:
            raise RuntimeError(f"the runtime API server on {self.socket_path} is not pre-started")
        if not self.awaiting_assignment:
            return False
        self._assignment.set_result(dict(environment))
        return True

    async def invoke(
        self,
        *,
        request_id: str,
        payload: bytes,
        deadline_ms: int,
        function_arn: str,
        trace_id: str,
        client_context: str | None = None,
    ) -> InvocationReply:
        """Hand one event to the runtime and wait for its response or error."""
        if self._gone is not None:
            raise RuntimeGone(self._gone)
        if self._current is not None:
            raise RuntimeError(
                f"invocation {self._current.request_id} is still running on {self.socket_path}"
            )

        headers = {
            "Content-Type": _JSON,
            "Lambda-Runtime-Aws-Request-Id": request_id,
            "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
            "Lambda-Runtime-Invoked-Function-Arn": function_arn,
            "Lambda-Runtime-Trace-Id": trace_id,
        }
        if client_context is not None:
            headers["Lambda-Runtime-Client-Context"] = client_context
        invocation = _Invocation(
            request_id, payload, headers, asyncio.get_running_loop().create_future()
        )
        self._current = invocation
        self._dispatch(invocation)

        # Cancelling this await (a caller's timeout) cancels the reply future, which turns the
        # event stale: /next skips it and a late reply for it is refused.
        try:
            return await invocation.reply
        finally:
            if self._current is invocation:
                self._current = None

    def abort(self, reason: str) -> None:
        """Make a pending wait_init() or invoke(), and every later one, raise RuntimeGone."""
        if self._gone is None:
            self._gone = reason
        error = RuntimeGone(self._gone)

        if self._init is not None and not self._init.done():
            _fail(self._init, error)
        if self._assignment is not None and not self._assignment.done():
            self._assignment.set_result(None)
        if self._current is not None:
            if not self._current.reply.done():
                _fail(self._current.reply, error)
            self._current = None
        self._queued.clear()
        while self._pollers:
            poller = self._pollers.popleft()
            if not poller.done():
                poller.set_result(None)

    def _dispatch(self, invocation: _Invocation) -> None:
        while self._pollers:
            poller = self._pollers.popleft()
            if not poller.done():
                poller.set_result(invocation)
                return
        self._queued.append(invocation)

    async def _take_event(self) -> _Invocation | None:
        while self._queued:
            invocation = self._queued.popleft()
            if not invocation.reply.done():
                return invocation
        if self._gone is not None:
            return None

        poller: asyncio.Future[_Invocation | None] = asyncio.get_running_loop().create_future()
        self._pollers.append(poller)
        return await poller

    async def _handle_next(self, request: web.Request) -> web.Response:
        """Long-poll for the next event; the first call also marks the end of init."""
        if self._init is not None and not self._init.done():
            self._init.set_result(None)

        while True:
            invocation = await self._take_event()
            if invocation is None:
                return _error(503, "RuntimeGone", f"No more events: {self._gone}")
            if invocation.reply.done():
                continue

            # aiohttp keeps running a handler whose client has hung up. An event written to a
            # closed connection would be lost, so it goes to the runtime's next poll instead.
            transport = request.transport
            if transport is None or transport.is_closing():
                self._dispatch(invocation)
                return _error(503, "ConnectionClosed", "The runtime closed this connection")

            invocation.dispatched_ns = time.perf_counter_ns()
            return web.Response(body=invocation.payload, headers=invocation.headers)

    async def _handle_response(self, request: web.Request) -> web.Response:
        """Accept the result of the running invocation."""
        # Durations end when the reply's headers arrive, before its body is read, so the time
        # spent copying a large response over the socket is not counted as the function's.
        completed_ns = time.perf_counter_ns()
        request_id = request.match_info["request_id"]
        invocation = self._awaiting_reply(request_id)
        if invocation is None:
            return _invalid_request_id(request_id)

        body = await self._read_reply(request, invocation)
        if body is None:
            return _too_large(self.max_response_bytes)
        return self._complete(
            invocation,
            InvocationReply(request_id, True, body, None, invocation.dispatched_ns, completed_ns),
        )

    async def _handle_error(self, request: web.Request) -> web.Response:
        """Accept the failure of the running invocation."""
        completed_ns = time.perf_counter_ns()
        request_id = request.match_info["request_id"]
        invocation = self._awaiting_reply(request_id)
        if invocation is None:
            return _invalid_request_id(request_id)

        body = await self._read_reply(request, invocation)
        if body is None:
            return _too_large(self.max_response_bytes)
        error_type = _error_type(request, body)
        return self._complete(
            invocation,
            InvocationReply(
                request_id, False, body, error_type, invocation.dispatched_ns, completed_ns
            ),
        )

    async def _handle_init_error(self, request: web.Request) -> web.Response:
        """Record why the runtime could not load the function."""
        body = await request.read()
        if self._init is None or self._init.done():
            return _error(
                403, "InvalidStateTransition", "The init phase is over; report errors per request"
            )

        self._init.set_result(InitFailure(_error_type(request, body), body))
        return web.Response(status=202, body=_ACCEPTED, content_type=_JSON)

    async def _handle_assignment(self, request: web.Request) -> web.Response:
        """Long-poll, from a pre-started runtime, for the environment of its function."""
        if self._assignment is None:
            return _error(404, "NotFound", "This runtime was not pre-started")
        if self._assignment_delivered:
            return _error(403, "InvalidStateTransition", "The assignment was already handed out")

        self._assignment_poll = request
        self._assignment_polled.set()
        try:
            environment = await asyncio.shield(self._assignment)
        finally:
            if self._assignment_poll is request:
                self._assignment_poll = None
        if environment is None:
            return _error(503, "RuntimeGone", f"No assignment: {self._gone}")
        # Two polls can wake on one assignment (a runtime that reconnected); one gets it.
        if self._assignment_delivered:
            return _error(403, "InvalidStateTransition", "The assignment was already handed out")
        transport = request.transport
        if transport is None or transport.is_closing():
            # Kept for the runtime's next poll rather than written to a closed connection.
            return _error(503, "ConnectionClosed", "The runtime closed this connection")
        self._assignment_delivered = True
        return web.json_response({"environment": environment})

    async def _handle_unknown(self, request: web.Request) -> web.Response:
        """Answer any other path or method."""
        return _error(404, "NotFound", f"No route for {request.method} {request.path}")

    def _awaiting_reply(self, request_id: str) -> _Invocation | None:
        invocation = self._current
        if (
            invocation is None
            or invocation.request_id != request_id
            or not invocation.dispatched_ns
            or invocation.reply.done()
        ):
            return None
        return invocation

    async def _read_reply(self, request: web.Request, invocation: _Invocation) -> bytes | None:
        """Read a reply's body, or fail the invocation with ResponseTooLarge and return None."""
        limit = self.max_response_bytes
        body: bytes | None = None
        length = request.content_length
        if length is None or length <= limit:
            # A chunked body has no length up front; aiohttp stops reading it past its own limit.
            with contextlib.suppress(web.HTTPRequestEntityTooLarge):
                body = await request.read()
        if body is not None and len(body) <= limit:
            return body

        log.debug("runtime reply over the size limit", request_id=invocation.request_id)
        if not invocation.reply.done():
            _fail(
                invocation.reply,
                ResponseTooLarge(
                    f"Response payload size exceeded maximum allowed payload size ({limit} bytes)."
                ),
            )
        return None

    def _complete(self, invocation: _Invocation, reply: InvocationReply) -> web.Response:
        # The body read may have yielded to an abort() or to the caller giving up.
        if invocation.reply.done():
            return _invalid_request_id(invocation.request_id)

        invocation.reply.set_result(reply)
        self._current = None
        return web.Response(status=202, body=_ACCEPTED, content_type=_JSON)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    future.set_exception(error)
    # Marks the exception as seen, so asyncio does not log it when nobody was waiting.
    future.exception()


def _error_type(request: web.Request, body: bytes) -> str:
    header = request.headers.get("Lambda-Runtime-Function-Error-Type")
    if header:
        return header
    try:
        error_type = json.loads(body).get("errorType")
    except (ValueError, AttributeError):
        return "Unhandled"
    return error_type if isinstance(error_type, str) and error_type else "Unhandled"


def _error(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response({"errorMessage": message, "errorType": error_type}, status=status)


def _invalid_request_id(request_id: str) -> web.Response:
    return _error(400, "InvalidRequestID", f"No invocation {request_id!r} is awaiting a reply")


def _too_large(limit: int) -> web.Response:
    return _error(
        413, "RequestEntityTooLarge", f"Exceeded maximum allowed payload size ({limit} bytes)."
    )
