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

Every warm invocation costs two HTTP requests, so the HTTP/1.1 server is a small asyncio
protocol around the httptools (llhttp) parser rather than a web framework: the parser calls
back into the connection, each request is handled as soon as it is complete, and an event is
written to the polling connection from inside ``invoke()`` itself. Requests on one connection
are answered in order; a long-polling request holds those pipelined behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import cast
from urllib.parse import unquote_to_bytes

import httptools

from app.logging import get_logger

log = get_logger(__name__)

ASSIGNMENT_PATH = "/2018-06-01/lambent/assignment"
_ASSIGNMENT_PATH = ASSIGNMENT_PATH.encode()
_NEXT_PATH = b"/2018-06-01/runtime/invocation/next"
_INVOCATION_PREFIX = b"/2018-06-01/runtime/invocation/"
_INIT_ERROR_PATH = b"/2018-06-01/runtime/init/error"
_ACCEPTED = b'{"status":"OK"}'

# What a request is for, decided once its headers are in.
_NEXT = "next"
_RESPONSE = "response"
_ERROR = "error"
_INIT_ERROR = "init-error"
_ASSIGNMENT = "assignment"
_NOT_FOUND = "not-found"

# The request line and headers of one request. Runtimes send well under a kilobyte; the bound
# keeps a runtime from making the worker hold an endless header in memory.
_HEAD_LIMIT_BYTES = 64 * 1024

# All connections of a server read into one buffer, each read being parsed before the next.
# Otherwise asyncio's own loop allocates 256 KiB for every read, which malloc maps and unmaps
# each time: three more system calls per request.
_READ_BUFFER_BYTES = 64 * 1024

# How long a connection that is being closed keeps reading what its client still sends.
_LINGER_S = 2.0

# How long stop() lets connections flush what they were sent before dropping them.
_SHUTDOWN_TIMEOUT_S = 1.0

_STATUS_LINES = {
    status: f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
    for status in (200, 202, 400, 403, 404, 413, 431, 500, 503)
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"


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
    __slots__ = ("request_id", "payload", "head", "reply", "dispatched_ns")

    def __init__(
        self, request_id: str, payload: bytes, head: bytes, reply: asyncio.Future[InvocationReply]
    ) -> None:
        self.request_id = request_id
        self.payload = payload
        # The event's response headers, rendered once, without the status line and the Date.
        self.head = head
        self.reply = reply
        # Zero until the runtime has received the event; a reply before that is not valid.
        self.dispatched_ns = 0


class _Request:
    """One HTTP request on a connection, from its first byte until it is answered."""

    __slots__ = (
        "method",
        "url",
        "route",
        "request_id",
        "keep_alive",
        "connection_header",
        "expects_continue",
        "content_length",
        "error_type",
        "body",
        "body_bytes",
        "too_large",
        "arrived_ns",
        "checked",
        "invocation",
        "refusal",
    )

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.route = _NOT_FOUND
        self.request_id = ""
        self.keep_alive = True
        self.connection_header = b""
        self.expects_continue = False
        self.content_length = 0
        self.error_type: str | None = None
        # The body's pieces, or None for a body that is read and dropped.
        self.body: list[bytes] | None = None
        self.body_bytes = 0
        self.too_large = False
        self.arrived_ns = 0
        # Whether the reply's invocation was looked up when its headers came in; a request
        # pipelined behind a long poll is looked up only once its turn comes.
        self.checked = False
        self.invocation: _Invocation | None = None
        # Set for a request answered with an error regardless of its route: (status, type, text).
        self.refusal: tuple[int, str, str] | None = None

    def refuse(self, status: int, error_type: str, message: str) -> None:
        """Answer with this error, whatever the route, and close the connection after it."""
        self.refusal = (status, error_type, message)
        self.keep_alive = False
        self.connection_header = _CLOSE


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
        # Connections long-polling for the assignment of a pre-started runtime (None when it was
        # not pre-started), oldest first.
        self._assignment_polls: deque[_Connection] | None = deque() if prestarted else None
        self._assignment_polled = asyncio.Event()
        self._assignment_delivered = False
        self._listener: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_buffer = memoryview(bytearray(_READ_BUFFER_BYTES))
        self._connections: set[_Connection] = set()
        self._init: asyncio.Future[InitFailure | None] | None = None
        self._current: _Invocation | None = None
        # Events the runtime has not asked for yet, and connections whose /next waits for an
        # event. Normally at most one of the two is non-empty.
        self._queued: deque[_Invocation] = deque()
        self._pollers: deque[_Connection] = deque()
        self._gone: str | None = None

    async def start(self) -> None:
        """Create the socket and start serving."""
        if self._listener is not None:
            raise RuntimeError(f"runtime API server on {self.socket_path} is already started")

        loop = self._loop = asyncio.get_running_loop()
        self._init = loop.create_future()
        listener = await loop.create_unix_server(
            lambda: _Connection(self), path=str(self.socket_path)
        )
        try:
            # The runtime connects as an unprivileged uid inside the sandbox. Who can reach the
            # socket is decided by its directory, which is mounted into this sandbox only.
            os.chmod(self.socket_path, 0o666)
        except BaseException:
            listener.close()
            raise
        self._listener = listener

    async def stop(self) -> None:
        """Stop serving and remove the socket; a pending wait raises RuntimeGone."""
        self.abort("the runtime API server stopped")

        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            connections = list(self._connections)
            for connection in connections:
                connection.close()
            if connections:
                _, lingering = await asyncio.wait(
                    [connection.lost for connection in connections], timeout=_SHUTDOWN_TIMEOUT_S
                )
                for connection in connections:
                    if connection.lost in lingering:
                        connection.drop()
            await listener.wait_closed()
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
        polls = self._assignment_polls
        if not polls or self._assignment_delivered or self._gone is not None:
            return False
        return any(connection.is_live for connection in polls)

    async def wait_for_assignment_poll(self) -> None:
        """Wait until the pre-started runtime first asks for its assignment: it is ready."""
        await self._assignment_polled.wait()

    def assign(self, environment: dict[str, str]) -> bool:
        """Answer the pre-started runtime's assignment poll with its function's environment.

        False, and nothing is handed over, when the runtime is not polling for one (it died, or
        was already assigned); the caller should not count on this runtime then.
        """
        polls = self._assignment_polls
        if polls is None:
            raise RuntimeError(f"the runtime API server on {self.socket_path} is not pre-started")
        if not self.awaiting_assignment:
            return False

        body = json.dumps({"environment": dict(environment)}).encode()
        while polls:
            connection = polls.popleft()
            request = connection.take_poll()
            if request is None:
                continue
            if self._assignment_delivered:
                # Another poll of the same runtime (one that reconnected) got it first.
                connection.answer_error(
                    request, 403, "InvalidStateTransition", "The assignment was already handed out"
                )
            else:
                self._assignment_delivered = True
                connection.answer(request, 200, body)
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
        timeout_s: float | None = None,
    ) -> InvocationReply:
        """Hand one event to the runtime and wait for its response or error.

        After ``timeout_s`` it raises TimeoutError, and the event is stale as if cancelled.
        """
        if self._gone is not None:
            raise RuntimeGone(self._gone)
        if self._loop is None:
            raise RuntimeError("the runtime API server is not started")
        if self._current is not None:
            raise RuntimeError(
                f"invocation {self._current.request_id} is still running on {self.socket_path}"
            )

        head = (
            "Content-Type: application/json\r\n"
            f"Lambda-Runtime-Aws-Request-Id: {request_id}\r\n"
            f"Lambda-Runtime-Deadline-Ms: {deadline_ms}\r\n"
            f"Lambda-Runtime-Invoked-Function-Arn: {function_arn}\r\n"
            f"Lambda-Runtime-Trace-Id: {trace_id}\r\n"
        )
        values = request_id + function_arn + trace_id
        if client_context is not None:
            head += f"Lambda-Runtime-Client-Context: {client_context}\r\n"
            values += client_context
        # A line break in a value would let it end the event's headers early and forge others.
        if "\r" in values or "\n" in values:
            raise ValueError(f"invocation {request_id!r} has a line break in a header value")
        head += f"Content-Length: {len(payload)}\r\n"
        invocation = _Invocation(request_id, payload, head.encode(), self._loop.create_future())
        self._current = invocation
        self._dispatch(invocation)

        # A timeout fails the reply future, as cancelling this await cancels it; either turns the
        # event stale: /next skips it and a late reply for it is refused. A timer on the future
        # rather than asyncio.timeout() around the await: that costs a Timeout object, its
        # rescheduling and two lookups of the running loop (each a getpid() on Python 3.11)
        # per invocation.
        expiry = (
            None
            if timeout_s is None
            else self._loop.call_later(timeout_s, _expire, invocation.reply, timeout_s)
        )
        try:
            return await invocation.reply
        finally:
            if expiry is not None:
                expiry.cancel()
            if self._current is invocation:
                self._current = None

    def abort(self, reason: str) -> None:
        """Make a pending wait_init() or invoke(), and every later one, raise RuntimeGone."""
        if self._gone is None:
            self._gone = reason
        error = RuntimeGone(self._gone)

        if self._init is not None and not self._init.done():
            _fail(self._init, error)
        if self._current is not None:
            if not self._current.reply.done():
                _fail(self._current.reply, error)
            self._current = None
        self._queued.clear()
        while self._pollers:
            connection = self._pollers.popleft()
            request = connection.take_poll()
            if request is not None:
                connection.answer_error(
                    request, 503, "RuntimeGone", f"No more events: {self._gone}"
                )
        polls = self._assignment_polls
        while polls:
            connection = polls.popleft()
            request = connection.take_poll()
            if request is not None:
                connection.answer_error(request, 503, "RuntimeGone", f"No assignment: {self._gone}")

    def _dispatch(self, invocation: _Invocation) -> None:
        while self._pollers:
            connection = self._pollers.popleft()
            request = connection.take_poll()
            if request is not None:
                connection.answer_event(request, invocation)
                return
        # Nobody polls on a live connection (one that hung up mid-poll was withdrawn): the event
        # waits for the runtime's next /next.
        self._queued.append(invocation)

    def _next(self, connection: _Connection, request: _Request) -> None:
        """Long-poll for the next event; the first call also marks the end of init."""
        if self._init is not None and not self._init.done():
            self._init.set_result(None)

        while self._queued:
            invocation = self._queued.popleft()
            if not invocation.reply.done():
                connection.answer_event(request, invocation)
                return
        if self._gone is not None:
            connection.answer_error(request, 503, "RuntimeGone", f"No more events: {self._gone}")
            return
        connection.hold(request)
        self._pollers.append(connection)

    def _assignment(self, connection: _Connection, request: _Request) -> None:
        """Long-poll, from a pre-started runtime, for the environment of its function."""
        if self._assignment_polls is None:
            connection.answer_error(request, 404, "NotFound", "This runtime was not pre-started")
        elif self._assignment_delivered:
            connection.answer_error(
                request, 403, "InvalidStateTransition", "The assignment was already handed out"
            )
        elif self._gone is not None:
            connection.answer_error(request, 503, "RuntimeGone", f"No assignment: {self._gone}")
        else:
            connection.hold(request)
            self._assignment_polls.append(connection)
            self._assignment_polled.set()

    def _withdraw(self, connection: _Connection, request: _Request) -> None:
        """Forget the poll of a connection that closed, so nothing is written to it."""
        if request.route is _NEXT:
            polls = self._pollers
        elif request.route is _ASSIGNMENT:
            polls = self._assignment_polls
        else:
            return  # a reply waiting for its acknowledgement: nobody to tell
        if polls is not None:
            with contextlib.suppress(ValueError):
                polls.remove(connection)

    def _awaiting_reply(self, request_id: str, arrived_ns: int) -> _Invocation | None:
        invocation = self._current
        if (
            invocation is None
            or invocation.request_id != request_id
            # A reply whose headers came in before its event went out cannot be for that event.
            or not 0 < invocation.dispatched_ns <= arrived_ns
            or invocation.reply.done()
        ):
            return None
        return invocation

    def _refuse_too_large(self, invocation: _Invocation) -> None:
        if invocation.reply.done():
            return
        log.debug("runtime reply over the size limit", request_id=invocation.request_id)
        _fail(
            invocation.reply,
            ResponseTooLarge(
                "Response payload size exceeded maximum allowed payload size "
                f"({self.max_response_bytes} bytes)."
            ),
        )

    def _reply(self, connection: _Connection, request: _Request) -> None:
        """Accept the result (/response) or the failure (/error) of the running invocation."""
        invocation = request.invocation
        if not request.checked:
            invocation = self._awaiting_reply(request.request_id, request.arrived_ns)
        if invocation is None:
            _answer_invalid_request_id(connection, request)
            return
        if request.too_large:
            self._refuse_too_large(invocation)
            _answer_too_large(connection, request, self.max_response_bytes)
            return
        # The body may have taken long enough to arrive for an abort() or the caller giving up.
        if invocation.reply.done():
            _answer_invalid_request_id(connection, request)
            return

        assert request.body is not None
        body = b"".join(request.body)
        ok = request.route is _RESPONSE
        invocation.reply.set_result(
            InvocationReply(
                request.request_id,
                ok,
                body,
                None if ok else _error_type(request.error_type, body),
                invocation.dispatched_ns,
                # Durations end when the reply's headers arrive, before its body is read, so
                # the time spent copying a large response is not counted as the function's.
                request.arrived_ns,
            )
        )
        self._current = None
        # Acknowledged once the task waiting for this reply has run: that task goes on to answer
        # the invocation's caller, whose wait the write (and the runtime it wakes) would add to.
        # Held meanwhile, so that what the runtime sends next is answered after it.
        connection.hold(request)
        self._loop.call_soon(_acknowledge, connection)

    def _init_error(self, connection: _Connection, request: _Request) -> None:
        """Record why the runtime could not load the function."""
        if request.too_large:
            _answer_too_large(connection, request, self.max_response_bytes)
            return
        if self._init is None or self._init.done():
            connection.answer_error(
                request,
                403,
                "InvalidStateTransition",
                "The init phase is over; report errors per request",
            )
            return

        assert request.body is not None
        body = b"".join(request.body)
        self._init.set_result(InitFailure(_error_type(request.error_type, body), body))
        connection.answer(request, 202, _ACCEPTED)


class _Connection(asyncio.BufferedProtocol):
    """One runtime connection: parses its requests and writes their answers, in order."""

    __slots__ = (
        "lost",
        "_server",
        "_loop",
        "_parser",
        "_transport",
        "_request",
        "_poll",
        "_pipelined",
        "_in_head",
        "_head_bytes",
        "_refused",
        "_closing",
        "_closer",
        "_writing_paused",
        "_reading_paused",
    )

    def __init__(self, server: RuntimeApiServer) -> None:
        assert server._loop is not None
        self._server = server
        self._loop = server._loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        # The request being parsed, the long-polling request that holds this connection, and
        # the complete requests pipelined behind that one.
        self._request: _Request | None = None
        self._poll: _Request | None = None
        self._pipelined: deque[_Request] = deque()
        # Whether the bytes arriving are a request's line and headers, and how many there were.
        self._in_head = True
        self._head_bytes = 0
        # After a malformed request nothing more is parsed: it is answered, in its turn, and
        # the connection closed.
        self._refused = False
        # Set once the last answer is written: the connection only waits for its client to go.
        self._closing = False
        self._closer: asyncio.TimerHandle | None = None
        self._writing_paused = False
        self._reading_paused = False

    # asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods of asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)
        self._server._connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._refused:
            return

        if self._in_head:
            self._head_bytes += nbytes
        try:
            # The parser hands out copies of what it parses, so the buffer is free once it returns.
            self._parser.feed_data(self._server._read_buffer[:nbytes])
        except httptools.HttpParserCallbackError:
            log.exception("runtime API request failed", socket=str(self._server.socket_path))
            self._refuse(500, "ServiceException", "The runtime API failed to handle the request")
        except httptools.HttpParserError as error:
            self._refuse(400, "InvalidRequest", f"Malformed HTTP request: {error}")
        except httptools.HttpParserUpgrade:
            # The request was refused when its headers came in; what follows is not HTTP.
            self._refused = True
        else:
            # Counted in whole reads, so a head is caught at most one read past the bound.
            if self._in_head and self._head_bytes > _HEAD_LIMIT_BYTES:
                self._refuse(
                    431,
                    "RequestHeaderFieldsTooLarge",
                    f"Request line and headers exceed {_HEAD_LIMIT_BYTES} bytes",
                )

    def eof_received(self) -> bool | None:
        # A half-close cannot be told from a hang-up here. Taking it for one closes the
        # connection, which withdraws a pending poll: its event then goes to the runtime's next
        # poll instead of being written where nobody reads it.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._closer is not None:
            self._closer.cancel()
        if self._poll is not None:
            self._server._withdraw(self, self._poll)
            self._poll = None
        self._pipelined.clear()
        self._request = None
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        # A client that sends requests without reading the answers is not read from either,
        # so the answers it leaves unread stay bounded.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # httptools parser callbacks

    def on_message_begin(self) -> None:
        self._request = _Request()

    def on_url(self, url: bytes) -> None:
        assert self._request is not None
        self._request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self._request
        assert request is not None
        name = name.lower()
        if name == b"content-length":
            # The parser has already refused a Content-Length that is not a number.
            request.content_length = int(value)
        elif name == b"connection":
            if b"keep-alive" in value.lower():
                request.connection_header = _KEEP_ALIVE
        elif name == b"expect":
            request.expects_continue = value.lower() == b"100-continue"
        elif name == b"lambda-runtime-function-error-type":
            request.error_type = value.decode(errors="replace")

    def on_headers_complete(self) -> None:
        arrived_ns = time.perf_counter_ns()
        request = self._request
        assert request is not None
        self._in_head = False
        self._head_bytes = 0
        parser = self._parser
        server = self._server

        request.method = parser.get_method()
        if not parser.should_keep_alive():
            request.keep_alive = False
            request.connection_header = _CLOSE
        if parser.should_upgrade():
            # llhttp takes what follows an upgrade request's headers for the new protocol, even
            # a body the request announced, so the request cannot be served as plain HTTP.
            request.refuse(400, "InvalidRequest", "Protocol upgrades are not supported")
            return
        try:
            _route(request)
        except httptools.HttpParserInvalidURLError:
            request.refuse(400, "InvalidRequest", "Malformed request target")
            return

        route = request.route
        if route is _RESPONSE or route is _ERROR:
            request.arrived_ns = arrived_ns
            request.body = []
            if self._poll is None and not self._pipelined:
                # Looked up now, so that a reply over the limit fails its invocation as soon as
                # that is known rather than once the runtime has finished sending it.
                request.checked = True
                invocation = server._awaiting_reply(request.request_id, arrived_ns)
                request.invocation = invocation
                if invocation is None:
                    request.body = None
                elif request.content_length > server.max_response_bytes:
                    request.too_large = True
                    request.body = None
                    server._refuse_too_large(invocation)
        elif route is _INIT_ERROR:
            request.body = []

        # Sent only to the request being served: one pipelined behind a poll would take it for
        # the poll's. Such a client sends its body when its own wait for the 100 runs out.
        if request.expects_continue and self._poll is None and not self._pipelined:
            self._write(_CONTINUE)

    def on_body(self, chunk: bytes) -> None:
        request = self._request
        assert request is not None
        body = request.body
        if body is None:
            return

        request.body_bytes += len(chunk)
        if request.body_bytes > self._server.max_response_bytes:
            # The rest is read and dropped rather than the connection closed: the runtime is
            # still writing it and would see a broken pipe instead of the 413. One that never
            # stops writing costs the worker only the parsing, until its sandbox is stopped.
            request.too_large = True
            request.body = None
            if request.invocation is not None:
                self._server._refuse_too_large(request.invocation)
            return
        body.append(chunk)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        self._request = None
        self._in_head = True
        # Requests that came in the same read as one whose answer closed the connection.
        if not self.is_live:
            return

        if self._poll is not None or self._pipelined:
            self._pipelined.append(request)
            self._update_reading()
        else:
            self._handle(request)

    # Serving requests

    @property
    def is_live(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing() and not self._closing

    def hold(self, request: _Request) -> None:
        """Keep the request unanswered until the server hands it an event or an assignment (or,
        for a reply, acknowledges it); what the client sends meanwhile waits its turn."""
        self._poll = request

    def take_poll(self) -> _Request | None:
        """The held request, for the caller to answer now; None if the connection is gone."""
        request = self._poll
        if request is None or not self.is_live:
            return None
        self._poll = None
        if self._pipelined:
            # Handled once the caller's answer is written, and outside invoke() or abort().
            self._loop.call_soon(self._handle_pipelined)
        return request

    def answer(self, request: _Request, status: int, body: bytes) -> None:
        self._write(
            b"".join(
                (
                    _STATUS_LINES[status],
                    _date_header(),
                    b"Content-Type: application/json\r\nContent-Length: ",
                    str(len(body)).encode(),
                    b"\r\n",
                    request.connection_header,
                    b"\r\n",
                    b"" if request.method == b"HEAD" else body,
                )
            ),
            request.keep_alive,
        )

    def answer_error(self, request: _Request, status: int, error_type: str, message: str) -> None:
        body = json.dumps({"errorMessage": message, "errorType": error_type}).encode()
        self.answer(request, status, body)

    def answer_event(self, request: _Request, invocation: _Invocation) -> None:
        assert self._transport is not None
        invocation.dispatched_ns = time.perf_counter_ns()
        self._write(
            b"".join(
                (
                    _STATUS_LINES[200],
                    _date_header(),
                    invocation.head,
                    request.connection_header,
                    b"\r\n",
                    invocation.payload,
                )
            ),
            request.keep_alive,
        )
        if self._transport.is_closing():
            # The write failed, so the runtime hung up without this connection noticing. The
            # event goes to its next poll instead.
            invocation.dispatched_ns = 0
            self._server._dispatch(invocation)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def drop(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _handle(self, request: _Request) -> None:
        server = self._server
        route = request.route
        if request.refusal is not None:
            self.answer_error(request, *request.refusal)
        elif route is _NEXT:
            server._next(self, request)
        elif route is _RESPONSE or route is _ERROR:
            server._reply(self, request)
        elif route is _INIT_ERROR:
            server._init_error(self, request)
        elif route is _ASSIGNMENT:
            server._assignment(self, request)
        else:
            path = _path(request.url).decode(errors="replace")
            method = request.method.decode()
            self.answer_error(request, 404, "NotFound", f"No route for {method} {path}")

    def _handle_pipelined(self) -> None:
        while self._pipelined and self._poll is None and self.is_live:
            self._handle(self._pipelined.popleft())
        self._update_reading()

    def _refuse(self, status: int, error_type: str, message: str) -> None:
        """Answer a request that cannot be parsed, in its turn, and close the connection."""
        self._refused = True
        self._request = None
        request = _Request()
        request.refuse(status, error_type, message)
        if self._poll is not None or self._pipelined:
            self._pipelined.append(request)
        else:
            self._handle(request)

    def _write(self, data: bytes, keep_alive: bool = True) -> None:
        if not self.is_live:
            return
        assert self._transport is not None
        self._transport.write(data)
        # A write that failed has closed the transport already.
        if not keep_alive and not self._transport.is_closing():
            self._close_after_answer()

    def _close_after_answer(self) -> None:
        # Closing a Unix socket that holds unread data resets the connection, and the client
        # can lose the answer with it. So only the writing side is shut now, and whatever the
        # client still sends is dropped until it hangs up, or for a while at most.
        assert self._transport is not None
        self._closing = True
        self._refused = True
        self._pipelined.clear()
        self._transport.write_eof()
        self._closer = self._loop.call_later(_LINGER_S, self._transport.close)
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()

    def _update_reading(self) -> None:
        # Requests pipelined behind a long poll wait, complete, in memory; reading stops while
        # any do, so a runtime cannot queue up more than one read's worth of them. A hang-up
        # goes unseen meanwhile, until answering the poll fails.
        paused = self._writing_paused or bool(self._pipelined)
        if paused == self._reading_paused or not self.is_live:
            return
        assert self._transport is not None
        self._reading_paused = paused
        if paused:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()


def _path(url: bytes) -> bytes:
    if url[:1] == b"/":
        path = url.partition(b"?")[0].partition(b"#")[0]
    elif b"://" in url:
        # The absolute form, as sent to a proxy.
        path = httptools.parse_url(url).path or b"/"
    else:
        # Such as "*", which matches no route.
        return url
    return unquote_to_bytes(path) if b"%" in path else path


def _route(request: _Request) -> None:
    path = _path(request.url)
    method = request.method
    if path == _NEXT_PATH:
        if method == b"GET":
            request.route = _NEXT
    elif path.startswith(_INVOCATION_PREFIX):
        request_id, _, action = path[len(_INVOCATION_PREFIX) :].partition(b"/")
        if request_id and method == b"POST":
            if action == b"response":
                request.route = _RESPONSE
            elif action == b"error":
                request.route = _ERROR
            request.request_id = request_id.decode(errors="replace")
    elif path == _INIT_ERROR_PATH:
        if method == b"POST":
            request.route = _INIT_ERROR
    elif path == _ASSIGNMENT_PATH and method == b"GET":
        request.route = _ASSIGNMENT


_date_second = 0
_date_line = b""


def _date_header() -> bytes:
    # Formatting the date costs more than the rest of a response's head; it changes once a
    # second.
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
    return _date_line


def _acknowledge(connection: _Connection) -> None:
    request = connection.take_poll()
    if request is not None:
        connection.answer(request, 202, _ACCEPTED)


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    if not future.done():
        _fail(future, TimeoutError(f"no reply within {timeout_s} s"))


def _fail(future: asyncio.Future, error: BaseException) -> None:
    future.set_exception(error)
    # Marks the exception as seen, so asyncio does not log it when nobody was waiting.
    future.exception()


def _error_type(header: str | None, body: bytes) -> str:
    if header:
        return header
    try:
        error_type = json.loads(body).get("errorType")
    except (ValueError, AttributeError):
        return "Unhandled"
    return error_type if isinstance(error_type, str) and error_type else "Unhandled"


def _answer_invalid_request_id(connection: _Connection, request: _Request) -> None:
    connection.answer_error(
        request,
        400,
        "InvalidRequestID",
        f"No invocation {request.request_id!r} is awaiting a reply",
    )


def _answer_too_large(connection: _Connection, request: _Request, limit: int) -> None:
    connection.answer_error(
        request,
        413,
        "RequestEntityTooLarge",
        f"Exceeded maximum allowed payload size ({limit} bytes).",
    )
