"""The python3.11 bootstrap's own HTTP client for the Runtime API.

Exchanges the worker's server really has are checked against a real RuntimeApiServer. Replies
it never sends (chunked bodies, dropped connections) come from a scripted peer on a Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from workers.runtime_api import RuntimeApiServer

BOOTSTRAP = Path(__file__).resolve().parents[2] / "workers" / "runtimes" / "python" / "bootstrap.py"
NEXT = b"GET /2018-06-01/runtime/invocation/next "
FUNCTION_ARN = "arn:aws:lambda:eu-west-1:123456789012:function:greeter"
WAIT_S = 10


def load_bootstrap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lambent_python_bootstrap", BOOTSTRAP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()


def reply(body: bytes = b'{"status":"OK"}', *headers: str, status: str = "202 Accepted") -> bytes:
    """A reply with a Content-Length, unless the headers given say how the body is framed."""
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers]
    if not any(header.lower().startswith("transfer-encoding") for header in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def event_reply(request_id: str, body: bytes, *headers: str) -> bytes:
    return reply(body, f"Lambda-Runtime-Aws-Request-Id: {request_id}", *headers, status="200 OK")


@dataclass
class Connection:
    """What the scripted peer does with one connection: answer requests in turn, then close."""

    replies: list[bytes]
    # Wait for the client to hang up before closing, keeping whatever it still sends.
    await_hangup: bool = False
    requests: list[bytes] = field(default_factory=list)
    sent_after_last_reply: bytes = b""


class ScriptedPeer:
    """Accepts one connection per script entry, in order, on a Unix socket."""

    def __init__(self, socket_path: Path, connections: list[Connection]) -> None:
        self.socket_path = socket_path
        self.connections = connections
        self.accepted = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen()
        self._listener.settimeout(WAIT_S)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.close()
        self._thread.join(WAIT_S)

    def _serve(self) -> None:
        for script in self.connections:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            with conn, conn.makefile("rb") as reader:
                conn.settimeout(WAIT_S)
                for answer in script.replies:
                    script.requests.append(_read_request(reader))
                    conn.sendall(answer)
                if script.await_hangup:
                    # Empty at once when the client hangs up; a request if it kept the connection.
                    script.sent_after_last_reply = reader.read1()


def _read_request(reader) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            raise ConnectionError("the client hung up mid-request")
        head += line
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + reader.read(length)


@contextlib.contextmanager
def scripted_peer(*connections: Connection) -> Iterator[ScriptedPeer]:
    # Unix socket paths are limited to about 100 bytes, too few for pytest's tmp_path.
    directory = tempfile.mkdtemp(prefix="lambent-api-")
    peer = ScriptedPeer(Path(directory) / "runtime.sock", list(connections))
    try:
        yield peer
    finally:
        peer.close()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def runtime_api_server() -> AsyncIterator[RuntimeApiServer]:
    directory = tempfile.mkdtemp(prefix="lambent-api-")
    server = RuntimeApiServer(Path(directory) / "runtime.sock")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_an_event_and_its_headers_arrive_as_the_worker_sent_them() -> None:
    async def scenario() -> None:
        async with runtime_api_server() as server:
            api = bootstrap.RuntimeApi(str(server.socket_path))
            pending = asyncio.create_task(
                server.invoke(
                    request_id="req-1",
                    payload=b'{"greeting": "hello"}',
                    deadline_ms=1_700_000_000_000,
                    function_arn=FUNCTION_ARN,
                    trace_id="Root=1-abc",
                    client_context='{"custom": {"name": "Zoë"}}',
                )
            )
            body, headers = await asyncio.to_thread(api.next_invocation)
            await asyncio.to_thread(api.post_response, "req-1", b'"done"')
            answer = await asyncio.wait_for(pending, WAIT_S)
            api.close()

        assert body == b'{"greeting": "hello"}'
        assert headers.get("Lambda-Runtime-Aws-Request-Id") == "req-1"
        assert headers.get("lambda-runtime-deadline-ms") == "1700000000000"
        assert headers.get("LAMBDA-RUNTIME-INVOKED-FUNCTION-ARN") == FUNCTION_ARN
        assert headers.get("Lambda-Runtime-Client-Context") == '{"custom": {"name": "Zoë"}}'
        assert headers.get("Lambda-Runtime-Cognito-Identity") is None
        assert answer.ok and answer.body == b'"done"'

    asyncio.run(scenario())


def test_an_error_type_that_cannot_be_a_header_reaches_the_worker_in_the_body() -> None:
    async def scenario() -> None:
        async with runtime_api_server() as server:
            api = bootstrap.RuntimeApi(str(server.socket_path))
            pending = asyncio.create_task(
                server.invoke(
                    request_id="req-1",
                    payload=b"{}",
                    deadline_ms=0,
                    function_arn=FUNCTION_ARN,
                    trace_id="Root=1-abc",
                )
            )
            await asyncio.to_thread(api.next_invocation)
            failure = bootstrap.FunctionError("Ошибка", "boom")
            await asyncio.to_thread(api.post_error, "req-1", failure)
            answer = await asyncio.wait_for(pending, WAIT_S)
            api.close()

        assert not answer.ok
        assert answer.error_type == "Ошибка"

    asyncio.run(scenario())


def test_requests_share_one_connection() -> None:
    first = Connection([event_reply("req-1", b"{}"), reply(), event_reply("req-2", b"{}")])

    with scripted_peer(first) as peer:
        api = bootstrap.RuntimeApi(str(peer.socket_path))
        api.next_invocation()
        api.post_response("req-1", b"null")
        _, headers = api.next_invocation()
        api.close()

    assert headers.get("Lambda-Runtime-Aws-Request-Id") == "req-2"
    assert peer.accepted == 1
    assert first.requests[1].endswith(b"\r\n\r\nnull")


def test_a_chunked_reply_is_read_whole() -> None:
    chunked = b'5\r\n{"a":\r\n3;ext=1\r\n 1}\r\n0\r\nX-Trailer: yes\r\n\r\n'
    first = Connection(
        [event_reply("req-1", chunked, "Transfer-Encoding: chunked"), reply()],
    )

    with scripted_peer(first) as peer:
        api = bootstrap.RuntimeApi(str(peer.socket_path))
        body, _ = api.next_invocation()
        # The connection is still in step after the chunked body: the next reply reads cleanly.
        api.post_response("req-1", b"null")
        api.close()

    assert body == b'{"a": 1}'
    assert peer.accepted == 1


def test_a_dropped_connection_is_retried_once_on_a_new_one() -> None:
    first = Connection([reply()])
    second = Connection([event_reply("req-2", b'{"b": 2}')])

    with scripted_peer(first, second) as peer:
        api = bootstrap.RuntimeApi(str(peer.socket_path))
        api.post_response("req-1", b"null")
        body, headers = api.next_invocation()
        api.close()

    assert (body, headers.get("Lambda-Runtime-Aws-Request-Id")) == (b'{"b": 2}', "req-2")
    assert peer.accepted == 2
    assert second.requests[0].startswith(NEXT)


def test_a_connection_dropped_twice_is_an_error() -> None:
    with scripted_peer(Connection([]), Connection([])) as peer:
        api = bootstrap.RuntimeApi(str(peer.socket_path))
        with pytest.raises(ConnectionError):
            api.next_invocation()

    assert peer.accepted == 2


def test_a_reply_with_connection_close_ends_the_connection() -> None:
    first = Connection([reply(b"{}", "Connection: close")], await_hangup=True)
    second = Connection([event_reply("req-2", b"{}")])

    with scripted_peer(first, second) as peer:
        api = bootstrap.RuntimeApi(str(peer.socket_path))
        api.post_response("req-1", b"null")
        api.next_invocation()
        api.close()

    assert first.sent_after_last_reply == b""
    assert second.requests[0].startswith(NEXT)
