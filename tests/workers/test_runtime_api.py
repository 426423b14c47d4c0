"""The Runtime API server, driven by the real python3.11 bootstrap, by provided runtimes and by
HTTP written byte by byte.

There is no sandbox here: runtimes run as plain subprocesses of Debian's python3, pointed at a
real RuntimeApiServer on a temporary Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import aiohttp
import pytest
import uvloop

from workers.runtime_api import (
    ASSIGNMENT_PATH,
    InitFailure,
    InvocationReply,
    ResponseTooLarge,
    RuntimeApiServer,
    RuntimeGone,
)

SYSTEM_PYTHON = "/usr/bin/python3"
RUNTIMES = Path(__file__).resolve().parents[2] / "workers" / "runtimes"
BOOTSTRAP = RUNTIMES / "python" / "bootstrap.py"
RELAY = RUNTIMES / "relay.py"
NEXT = "/2018-06-01/runtime/invocation/next"
FUNCTION_ARN = "arn:aws:lambda:eu-west-1:123456789012:function:greeter"
TRACE_ID = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
WAIT_S = 10

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def api_server(**options: Any) -> AsyncIterator[RuntimeApiServer]:
    # Unix socket paths are limited to about 100 bytes, too few for pytest's tmp_path.
    directory = tempfile.mkdtemp(prefix="lambent-api-")
    server = RuntimeApiServer(Path(directory) / "runtime.sock", **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def runtime_client(server: RuntimeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client standing in for a runtime, for exchanges no real runtime would make."""
    connector = aiohttp.UnixConnector(path=str(server.socket_path))
    timeout = aiohttp.ClientTimeout(total=WAIT_S)
    async with aiohttp.ClientSession(
        "http://runtime", connector=connector, timeout=timeout
    ) as session:
        yield session


@dataclass
class FunctionProcess:
    server: RuntimeApiServer
    process: asyncio.subprocess.Process
    task_root: Path
    output: Path
    # The function's environment: the runtime's own, or, pre-started, what to assign it.
    environment: dict[str, str]

    def logs(self) -> str:
        return self.output.read_text()

    async def exit_status(self) -> int:
        return await asyncio.wait_for(self.process.wait(), WAIT_S)


@contextlib.asynccontextmanager
async def function_process(
    tmp_path: Path,
    files: dict[str, str],
    *,
    handler: str = "app.handler",
    command: list[str] | None = None,
    prestarted: bool = False,
    **server_options: Any,
) -> AsyncIterator[FunctionProcess]:
    """Run a runtime (by default the python3.11 bootstrap) on the files as its task root.

    Pre-started, the runtime gets only the generic variables and waits for its assignment.
    """
    task_root = tmp_path / "task"
    task_root.mkdir()
    for name, source in files.items():
        path = task_root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        path.chmod(0o755)
    output = tmp_path / "output.log"

    async with api_server(prestarted=prestarted, **server_options) as server:
        env = {
            "PATH": "/usr/bin:/bin",
            "LAMBENT_RUNTIME_SOCKET": str(server.socket_path),
            "LAMBDA_TASK_ROOT": str(task_root),
            "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{free_port()}",
            "_HANDLER": handler,
            "AWS_LAMBDA_FUNCTION_NAME": "greeter",
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
            "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/greeter",
            "AWS_LAMBDA_LOG_STREAM_NAME": "$LATEST/instance-1",
        }
        process_env = env
        if prestarted:
            generic = (
                "PATH",
                "LAMBENT_RUNTIME_SOCKET",
                "LAMBDA_TASK_ROOT",
                "AWS_LAMBDA_RUNTIME_API",
            )
            process_env = {key: env[key] for key in generic} | {"LAMBENT_PRESTARTED": "1"}
        with output.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *(command or [SYSTEM_PYTHON, "-u", str(BOOTSTRAP)]),
                cwd=task_root,
                env=process_env,
                stdout=sink,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group, so that cleanup also reaches a relay's child.
                start_new_session=True,
            )
        try:
            yield FunctionProcess(server, process, task_root, output, env)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()


async def invoke(
    server: RuntimeApiServer, event: Any, *, request_id: str = "req-1", **options: Any
) -> InvocationReply:
    call = server.invoke(
        request_id=request_id,
        payload=json.dumps(event).encode(),
        deadline_ms=int(time.time() * 1000) + 30_000,
        function_arn=FUNCTION_ARN,
        trace_id=TRACE_ID,
        **options,
    )
    return await asyncio.wait_for(call, WAIT_S)


async def wait_init(server: RuntimeApiServer) -> InitFailure | None:
    return await asyncio.wait_for(server.wait_init(), WAIT_S)


CONTEXT_HANDLER = """
    import os

    def handler(event, context):
        return {
            "event": event,
            "aws_request_id": context.aws_request_id,
            "function_name": context.function_name,
            "function_version": context.function_version,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "invoked_function_arn": context.invoked_function_arn,
            "log_group_name": context.log_group_name,
            "log_stream_name": context.log_stream_name,
            "identity": context.identity.cognito_identity_id,
            "client_context": context.client_context,
            "remaining_ms": context.get_remaining_time_in_millis(),
            "trace_id": os.environ.get("_X_AMZN_TRACE_ID"),
        }
"""


def test_invoke_returns_the_handler_result_with_context_fields(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with function_process(tmp_path, {"app.py": CONTEXT_HANDLER}) as function:
            assert await wait_init(function.server) is None
            reply = await invoke(function.server, {"name": "Ada"}, request_id="req-42")

        assert reply.ok
        assert reply.request_id == "req-42"
        assert reply.error_type is None
        assert 0 < reply.dispatched_ns < reply.completed_ns
        result = json.loads(reply.body)
        assert 25_000 < result.pop("remaining_ms") <= 30_000
        assert result == {
            "event": {"name": "Ada"},
            "aws_request_id": "req-42",
            "function_name": "greeter",
            "function_version": "$LATEST",
            "memory_limit_in_mb": "256",
            "invoked_function_arn": FUNCTION_ARN,
            "log_group_name": "/aws/lambda/greeter",
            "log_stream_name": "$LATEST/instance-1",
            "identity": None,
            "client_context": None,
            "trace_id": TRACE_ID,
        }

    run(scenario())


def test_handler_module_may_be_named_by_path(tmp_path: Path) -> None:
    files = {"src/greet/app.py": "def handler(event, context):\n    return 'hi ' + event\n"}

    async def scenario() -> None:
        async with function_process(tmp_path, files, handler="src/greet/app.handler") as function:
            reply = await invoke(function.server, "Ada")

        assert json.loads(reply.body) == "hi Ada"

    run(scenario())


def test_user_code_imports_from_the_task_root_not_the_runtime(tmp_path: Path) -> None:
    files = {
        "relay.py": "OWNER = 'user'\n",
        "app.py": """
            import sys
            import relay

            def handler(event, context):
                return {"path": sys.path, "relay": relay.OWNER}
        """,
    }

    async def scenario() -> None:
        async with function_process(tmp_path, files) as function:
            result = json.loads((await invoke(function.server, {})).body)
            task_root = str(function.task_root)

        assert result["path"][0] == task_root
        assert not any(entry.startswith(str(RUNTIMES)) for entry in result["path"])
        assert result["relay"] == "user"

    run(scenario())


def test_user_code_reaches_the_runtime_api_on_its_tcp_address(tmp_path: Path) -> None:
    source = """
        import os, urllib.error, urllib.request

        def handler(event, context):
            url = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/ping"
            try:
                urllib.request.urlopen(url, timeout=5)
            except urllib.error.HTTPError as error:
                return {"status": error.code, "body": error.read().decode()}
    """

    async def scenario() -> None:
        async with function_process(tmp_path, {"app.py": source}) as function:
            result = json.loads((await invoke(function.server, {})).body)

        assert result["status"] == 404
        assert json.loads(result["body"])["errorType"] == "NotFound"

    run(scenario())


def test_module_level_code_runs_once_across_invocations(tmp_path: Path) -> None:
    source = """
        import os

        with open(os.path.join(os.path.dirname(__file__), "inits.log"), "a") as log:
            log.write("init\\n")
        calls = 0

        def handler(event, context):
            global calls
            calls += 1
            return {"calls": calls, "pid": os.getpid()}
    """

    async def scenario() -> None:
        async with function_process(tmp_path, {"app.py": source}) as function:
            first = json.loads((await invoke(function.server, {}, request_id="a")).body)
            second = json.loads((await invoke(function.server, {}, request_id="b")).body)
            inits = (function.task_root / "inits.log").read_text()

        assert (first["calls"], second["calls"]) == (1, 2)
        assert first["pid"] == second["pid"]
        assert inits == "init\n"

    run(scenario())


def test_handler_exception_reports_only_user_frames(tmp_path: Path) -> None:
    source = """
        def check(value):
            raise ValueError(f"bad value {value}")

        def handler(event, context):
            print("checking")
            return check(event["value"])
    """

    async def scenario() -> None:
        async with function_process(tmp_path, {"app.py": source}) as function:
            reply = await invoke(function.server, {"value": 7})
            app_file = str(function.task_root / "app.py")
            logs = function.logs()

        assert not reply.ok
        assert reply.error_type == "ValueError"
        error = json.loads(reply.body)
        assert error["errorType"] == "ValueError"
        assert error["errorMessage"] == "bad value 7"
        assert [frame.split(", in ")[1].split("\n")[0] for frame in error["stackTrace"]] == [
            "handler",
            "check",
        ]
        assert all(f'File "{app_file}"' in frame for frame in error["stackTrace"])
        assert "bootstrap" not in json.dumps(error)
        assert "checking\n" in logs
        assert "[ERROR] ValueError: bad value 7\nTraceback (most recent call last):\n" in logs

    run(scenario())


@pytest.mark.parametrize(
    ("handler", "source", "error_type", "message"),
    [
        ("app", "", "Runtime.MalformedHandlerName", "Bad handler 'app'"),
        (
            "app.handler",
            "import not_installed_anywhere\n",
            "Runtime.ImportModuleError",
            "Unable to import module 'app': No module named 'not_installed_anywhere'",
        ),
        (
            "app.handler",
            "def handler(event, context)\n    return 1\n",
            "Runtime.UserCodeSyntaxError",
            "Syntax error in module 'app': expected ':'",
        ),
        (
            "app.handle",
            "def handler(event, context):\n    return 1\n",
            "Runtime.HandlerNotFound",
            "Handler 'handle' missing on module 'app'",
        ),
        (
            "app.handler",
            "import os\nDSN = os.environ['DATABASE_URL']\n",
            "KeyError",
            "'DATABASE_URL'",
        ),
    ],
    ids=["malformed-name", "import-error", "syntax-error", "handler-not-found", "module-raises"],
)
def test_init_failure_is_reported_and_ends_the_runtime(
    tmp_path: Path, handler: str, source: str, error_type: str, message: str
) -> None:
    async def scenario() -> None:
        async with function_process(tmp_path, {"app.py": source}, handler=handler) as function:
            failure = await wait_init(function.server)
            status = await function.exit_status()
            logs = function.logs()

        assert failure is not None
        assert failure.error_type == error_type
        body = json.loads(failure.body)
        assert body["errorType"] == error_type
        assert body["errorMessage"].startswith(message)
        assert isinstance(body["stackTrace"], list)
        assert status == 1
        assert f"[ERROR] {error_type}: {message}" in logs

    run(scenario())


def test_unserializable_result_is_a_marshal_error(tmp_path: Path) -> None:
    source = "def handler(event, context):\n    return {'tags': {'a', 'b'}}\n"

    async def scenario() -> None:
        async with function_process(tmp_path, {"app.py": source}) as function:
            reply = await invoke(function.server, {})

        assert not reply.ok
        assert reply.error_type == "Runtime.MarshalError"
        assert json.loads(reply.body)["errorMessage"] == (
            "Unable to marshal response: Object of type set is not JSON serializable"
        )

    run(scenario())


def test_response_over_the_limit_raises_response_too_large(tmp_path: Path) -> None:
    source = "def handler(event, context):\n    return 'x' * event\n"

    async def scenario() -> None:
        files = {"app.py": source}
        async with function_process(tmp_path, files, max_response_bytes=1024) as function:
            with pytest.raises(ResponseTooLarge):
                await invoke(function.server, 5000, request_id="big")
            # The runtime is told with a 413 and carries on with the next event.
            small = await invoke(function.server, 10, request_id="small")

        assert small.ok
        assert json.loads(small.body) == "x" * 10

    run(scenario())


def test_chunked_response_over_the_limit_raises_response_too_large() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 1024

    async def scenario() -> None:
        async with api_server(max_response_bytes=1024) as server, runtime_client(server) as api:
            pending = asyncio.create_task(invoke(server, {}))
            async with api.get(NEXT) as event:
                request_id = event.headers["Lambda-Runtime-Aws-Request-Id"]
            path = f"/2018-06-01/runtime/invocation/{request_id}/response"
            async with api.post(path, data=chunks()) as answer:
                status, body = answer.status, await answer.json()

            with pytest.raises(ResponseTooLarge):
                await pending

        assert status == 413
        assert body["errorType"] == "RequestEntityTooLarge"

    run(scenario())


def test_next_carries_the_invocation_headers() -> None:
    async def scenario() -> None:
        async with api_server() as server, runtime_client(server) as api:
            pending = asyncio.create_task(
                invoke(server, {"a": 1}, request_id="req-7", client_context='{"custom": {}}')
            )
            async with api.get(NEXT) as event:
                headers, body = event.headers, await event.read()
            path = "/2018-06-01/runtime/invocation/req-7/response"
            async with api.post(path, data=b'"done"') as answer:
                accepted = answer.status, await answer.json()
            reply = await pending

        assert json.loads(body) == {"a": 1}
        assert headers["Lambda-Runtime-Aws-Request-Id"] == "req-7"
        assert headers["Lambda-Runtime-Invoked-Function-Arn"] == FUNCTION_ARN
        assert headers["Lambda-Runtime-Trace-Id"] == TRACE_ID
        assert headers["Lambda-Runtime-Client-Context"] == '{"custom": {}}'
        assert int(headers["Lambda-Runtime-Deadline-Ms"]) > time.time() * 1000
        assert accepted == (202, {"status": "OK"})
        assert reply.ok and reply.body == b'"done"'

    run(scenario())


def test_event_is_kept_for_the_next_poll_when_a_polling_runtime_hung_up() -> None:
    async def scenario() -> None:
        async with api_server() as server, runtime_client(server) as api:
            _, writer = await asyncio.open_unix_connection(str(server.socket_path))
            writer.write(f"GET {NEXT} HTTP/1.1\r\nHost: runtime\r\n\r\n".encode())
            await wait_init(server)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.1)

            pending = asyncio.create_task(invoke(server, {"kept": True}, request_id="req-1"))
            async with api.get(NEXT) as event:
                assert await event.json() == {"kept": True}
            pending.cancel()

    run(scenario())


@pytest.mark.parametrize(
    ("headers", "body", "error_type"),
    [
        ({"Lambda-Runtime-Function-Error-Type": "Custom.Header"}, b"{}", "Custom.Header"),
        ({}, b'{"errorMessage": "no", "errorType": "Custom.Body"}', "Custom.Body"),
        ({}, b"not json", "Unhandled"),
    ],
    ids=["header", "body", "default"],
)
def test_error_type_comes_from_header_then_body(
    headers: dict[str, str], body: bytes, error_type: str
) -> None:
    async def scenario() -> None:
        async with api_server() as server, runtime_client(server) as api:
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            async with api.get(NEXT) as event:
                await event.read()
            path = "/2018-06-01/runtime/invocation/req-1/error"
            async with api.post(path, data=body, headers=headers) as answer:
                status = answer.status
            reply = await pending

        assert status == 202
        assert not reply.ok
        assert reply.error_type == error_type
        assert reply.body == body

    run(scenario())


def test_unknown_request_id_is_rejected() -> None:
    async def scenario() -> tuple[int, dict[str, str]]:
        async with api_server() as server, runtime_client(server) as api:
            path = "/2018-06-01/runtime/invocation/not-a-request/response"
            async with api.post(path, data=b"{}") as answer:
                return answer.status, await answer.json()

    status, body = run(scenario())

    assert status == 400
    assert body["errorType"] == "InvalidRequestID"


def test_unknown_route_is_a_json_404() -> None:
    async def scenario() -> tuple[int, dict[str, str]]:
        async with (
            api_server() as server,
            runtime_client(server) as api,
            api.post(NEXT) as answer,
        ):
            return answer.status, await answer.json()

    status, body = run(scenario())

    assert status == 404
    assert set(body) == {"errorMessage", "errorType"}


def test_socket_is_open_to_the_sandbox_user() -> None:
    async def scenario() -> int:
        async with api_server() as server:
            return server.socket_path.stat().st_mode & 0o777

    assert run(scenario()) == 0o666


def test_abort_makes_a_pending_invoke_raise_runtime_gone() -> None:
    async def scenario() -> None:
        async with api_server() as server, runtime_client(server) as api:
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            async with api.get(NEXT) as event:
                await event.read()
            server.abort("runtime exited with status 137")

            with pytest.raises(RuntimeGone, match="status 137"):
                await pending
            path = "/2018-06-01/runtime/invocation/req-1/response"
            async with api.post(path, data=b"{}") as late:
                assert late.status == 400
            with pytest.raises(RuntimeGone):
                await invoke(server, {}, request_id="req-2")

    run(scenario())


def test_abort_during_init_makes_wait_init_raise_runtime_gone() -> None:
    async def scenario() -> None:
        async with api_server() as server:
            waiting = asyncio.create_task(wait_init(server))
            await asyncio.sleep(0)
            server.abort("init timed out")

            with pytest.raises(RuntimeGone, match="init timed out"):
                await waiting

    run(scenario())


def test_stop_answers_a_long_polling_runtime_promptly() -> None:
    async def scenario() -> None:
        async with api_server() as server, runtime_client(server) as api:

            async def poll() -> int:
                async with api.get(NEXT) as answer:
                    return answer.status

            polling = asyncio.create_task(poll())
            await wait_init(server)
            started = time.monotonic()
            await server.stop()
            status = await asyncio.wait_for(polling, WAIT_S)

            assert status == 503
            assert time.monotonic() - started < 1
            assert not server.socket_path.exists()
            with pytest.raises(RuntimeGone):
                await invoke(server, {})

    run(scenario())


# HTTP as runtimes and HTTP clients may speak it, written byte by byte on the socket.

PING = "/2018-06-01/ping"


def http_request(
    method: str, path: str, body: bytes = b"", *, headers: str = "", version: str = "HTTP/1.1"
) -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body else ""
    head = f"{method} {path} {version}\r\nHost: runtime\r\n{headers}{length}\r\n"
    return head.encode() + body


def response_path(request_id: str) -> str:
    return f"/2018-06-01/runtime/invocation/{request_id}/response"


@dataclass
class RawResponse:
    status: int
    # Names lower-cased.
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    """Read one response; for a HEAD request, its headers only."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    length = int(headers["content-length"])
    body = b"" if head else await asyncio.wait_for(reader.readexactly(length), WAIT_S)
    return RawResponse(int(status_line.split()[1]), headers, body)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), WAIT_S)


@contextlib.asynccontextmanager
async def raw_connection(
    server: RuntimeApiServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def take_event(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> RawResponse:
    writer.write(http_request("GET", NEXT))
    return await read_response(reader)


async def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each event loop the server runs on: uvloop in the worker, asyncio's own elsewhere."""
    if request.param == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield request.param
    finally:
        asyncio.set_event_loop_policy(None)


@pytest.mark.usefixtures("event_loop_kind")
def test_chunked_reply_is_reassembled() -> None:
    async def scenario() -> None:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            await take_event(reader, writer)
            head = "Transfer-Encoding: chunked\r\n"
            writer.write(http_request("POST", response_path("req-1"), headers=head))
            # Each piece on its own, so the parser meets the body split at every boundary.
            for piece in (b"4\r\n", b'{"a"', b"\r\n", b"4\r\n:  1\r\n", b"1\r\n}\r\n0\r\n\r\n"):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
            answer = await read_response(reader)
            reply = await pending

        assert answer.status == 202
        assert reply.ok and reply.body == b'{"a":  1}'

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_reply_and_next_poll_may_be_pipelined() -> None:
    async def scenario() -> None:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            first = asyncio.create_task(invoke(server, {"n": 1}, request_id="req-1"))
            await take_event(reader, writer)
            writer.write(
                http_request("POST", response_path("req-1"), b'"one"') + http_request("GET", NEXT)
            )
            accepted = await read_response(reader)
            assert (await first).body == b'"one"'

            second = asyncio.create_task(invoke(server, {"n": 2}, request_id="req-2"))
            event = await read_response(reader)
            second.cancel()

        assert accepted.status == 202
        assert event.status == 200
        assert event.headers["lambda-runtime-aws-request-id"] == "req-2"
        assert event.json() == {"n": 2}

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_a_runtime_that_hangs_up_right_after_its_reply_leaves_the_server_serving() -> None:
    """The reply's acknowledgement is written a moment after the reply is taken; a runtime gone
    by then is simply not answered."""

    async def scenario() -> RawResponse:
        async with api_server() as server:
            async with raw_connection(server) as (reader, writer):
                first = asyncio.create_task(invoke(server, {"n": 1}, request_id="req-1"))
                await take_event(reader, writer)
                writer.write(http_request("POST", response_path("req-1"), b'"one"'))
                await writer.drain()
                writer.transport.abort()
                assert (await first).body == b'"one"'
            async with raw_connection(server) as (reader, writer):
                second = asyncio.create_task(invoke(server, {"n": 2}, request_id="req-2"))
                event = await take_event(reader, writer)
                writer.write(http_request("POST", response_path("req-2"), b'"two"'))
                accepted = await read_response(reader)
                assert (await second).body == b'"two"'
                assert accepted.status == 202
                return event

    event = run(scenario())

    assert event.json() == {"n": 2}


@pytest.mark.usefixtures("event_loop_kind")
def test_requests_pipelined_behind_a_long_poll_wait_for_its_answer() -> None:
    async def scenario() -> None:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            writer.write(http_request("GET", NEXT) + http_request("GET", PING))
            await wait_init(server)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.2)

            pending = asyncio.create_task(invoke(server, {"n": 1}, request_id="req-1"))
            event = await read_response(reader)
            behind = await read_response(reader)
            pending.cancel()

        assert event.status == 200
        assert event.json() == {"n": 1}
        assert behind.status == 404

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_malformed_request_is_answered_400_and_the_connection_closed() -> None:
    async def scenario() -> tuple[RawResponse, bytes]:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            writer.write(f"GET {NEXT} HTTP/1.1\r\nHost runtime\r\n\r\n".encode())
            return await read_response(reader), await read_to_end(reader)

    answer, rest = run(scenario())

    assert answer.status == 400
    assert answer.json()["errorType"] == "InvalidRequest"
    assert answer.headers["connection"] == "close"
    assert rest == b""


@pytest.mark.usefixtures("event_loop_kind")
def test_oversized_headers_are_refused_and_the_connection_closed() -> None:
    async def scenario() -> tuple[RawResponse, bytes]:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            # No end to the headers: the server must give up without waiting for one.
            writer.write(f"GET {NEXT} HTTP/1.1\r\nX-Padding: {'a' * 200_000}".encode())
            return await read_response(reader), await read_to_end(reader)

    answer, rest = run(scenario())

    assert answer.status == 431
    assert answer.json()["errorType"] == "RequestHeaderFieldsTooLarge"
    assert rest == b""


@pytest.mark.usefixtures("event_loop_kind")
@pytest.mark.parametrize(
    ("version", "headers"),
    [("HTTP/1.0", ""), ("HTTP/1.1", "Connection: close\r\n")],
    ids=["http-1.0", "connection-close"],
)
def test_connection_is_closed_after_the_answer_when_the_client_asks(
    version: str, headers: str
) -> None:
    async def scenario() -> tuple[RawResponse, bytes]:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            writer.write(http_request("GET", PING, headers=headers, version=version))
            return await read_response(reader), await read_to_end(reader)

    answer, rest = run(scenario())

    assert answer.status == 404
    assert answer.headers["connection"] == "close"
    assert rest == b""


@pytest.mark.usefixtures("event_loop_kind")
def test_http_1_0_keep_alive_is_honoured() -> None:
    async def scenario() -> list[RawResponse]:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            answers = []
            for _ in range(2):
                headers = "Connection: keep-alive\r\n"
                writer.write(http_request("GET", PING, headers=headers, version="HTTP/1.0"))
                answers.append(await read_response(reader))
            return answers

    answers = run(scenario())

    assert [answer.status for answer in answers] == [404, 404]
    assert answers[0].headers["connection"] == "keep-alive"


@pytest.mark.usefixtures("event_loop_kind")
def test_head_request_is_answered_without_a_body() -> None:
    async def scenario() -> tuple[RawResponse, RawResponse]:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            writer.write(http_request("HEAD", NEXT) + http_request("GET", PING))
            # A body after the HEAD answer would be read as the start of the next answer.
            return await read_response(reader, head=True), await read_response(reader)

    head, after = run(scenario())

    assert head.status == 404
    assert int(head.headers["content-length"]) > 0
    assert after.status == 404
    assert after.json()["errorMessage"] == f"No route for GET {PING}"


@pytest.mark.usefixtures("event_loop_kind")
def test_expect_100_continue_is_answered_before_the_body() -> None:
    async def scenario() -> None:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            await take_event(reader, writer)
            head = "Expect: 100-continue\r\nContent-Length: 4\r\n"
            writer.write(http_request("POST", response_path("req-1"), headers=head))
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
            writer.write(b'"ok"')
            answer = await read_response(reader)
            reply = await pending

        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert answer.status == 202
        assert reply.body == b'"ok"'

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_chunked_reply_over_the_limit_fails_the_invocation_before_its_body_ends() -> None:
    async def scenario() -> None:
        async with (
            api_server(max_response_bytes=1024) as server,
            raw_connection(server) as (reader, writer),
        ):
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            await take_event(reader, writer)
            head = "Transfer-Encoding: chunked\r\n"
            writer.write(http_request("POST", response_path("req-1"), headers=head))
            writer.write(b"800\r\n" + b"x" * 0x800 + b"\r\n")
            with pytest.raises(ResponseTooLarge):
                await asyncio.wait_for(pending, WAIT_S)

            # The rest of the body is dropped as it comes, and the connection stays usable.
            for _ in range(64):
                writer.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
            writer.write(b"0\r\n\r\n")
            answer = await read_response(reader)
            following = asyncio.create_task(invoke(server, {"n": 2}, request_id="req-2"))
            event = await take_event(reader, writer)
            following.cancel()

        assert answer.status == 413
        assert answer.json()["errorType"] == "RequestEntityTooLarge"
        assert event.headers["lambda-runtime-aws-request-id"] == "req-2"

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_declared_length_over_the_limit_fails_the_invocation_on_the_headers() -> None:
    async def scenario() -> None:
        async with (
            api_server(max_response_bytes=1024) as server,
            raw_connection(server) as (reader, writer),
        ):
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            await take_event(reader, writer)
            head = "Content-Length: 4096\r\n"
            writer.write(http_request("POST", response_path("req-1"), headers=head))
            with pytest.raises(ResponseTooLarge):
                await asyncio.wait_for(pending, WAIT_S)
            writer.write(b"x" * 4096)
            answer = await read_response(reader)

        assert answer.status == 413

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_duration_ends_when_the_reply_headers_arrive() -> None:
    async def scenario() -> InvocationReply:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            pending = asyncio.create_task(invoke(server, {}, request_id="req-1"))
            await take_event(reader, writer)
            await asyncio.sleep(0.05)
            head = "Content-Length: 4\r\n"
            writer.write(http_request("POST", response_path("req-1"), headers=head))
            await asyncio.sleep(0.5)
            writer.write(b'"ok"')
            await read_response(reader)
            return await pending

    reply = run(scenario())

    assert 0.05 <= (reply.completed_ns - reply.dispatched_ns) / 1e9 < 0.5


@pytest.mark.usefixtures("event_loop_kind")
def test_event_of_an_invocation_given_up_on_is_skipped() -> None:
    async def scenario() -> RawResponse:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            abandoned = server.invoke(
                request_id="req-1",
                payload=b"{}",
                deadline_ms=0,
                function_arn=FUNCTION_ARN,
                trace_id=TRACE_ID,
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(abandoned, 0.01)
            pending = asyncio.create_task(invoke(server, {}, request_id="req-2"))
            event = await take_event(reader, writer)
            pending.cancel()
            return event

    event = run(scenario())

    assert event.headers["lambda-runtime-aws-request-id"] == "req-2"


@pytest.mark.usefixtures("event_loop_kind")
def test_an_invocation_past_its_timeout_fails_and_its_late_reply_is_refused() -> None:
    async def scenario() -> tuple[RawResponse, RawResponse]:
        async with api_server() as server, raw_connection(server) as (reader, writer):
            timed = server.invoke(
                request_id="req-1",
                payload=b"{}",
                deadline_ms=0,
                function_arn=FUNCTION_ARN,
                trace_id=TRACE_ID,
                timeout_s=0.05,
            )
            pending = asyncio.create_task(timed)
            await take_event(reader, writer)
            with pytest.raises(TimeoutError):
                await pending
            writer.write(http_request("POST", response_path("req-1"), body=b'"late"'))
            late = await read_response(reader)
            # The server goes on: the next invocation is served on the same connection.
            following = asyncio.create_task(invoke(server, {"n": 2}, request_id="req-2"))
            writer.write(http_request("GET", NEXT))
            event = await read_response(reader)
            following.cancel()
            return late, event

    late, event = run(scenario())

    assert late.status == 400
    assert event.headers["lambda-runtime-aws-request-id"] == "req-2"


@pytest.mark.usefixtures("event_loop_kind")
def test_poll_of_a_connection_that_hung_up_is_withdrawn() -> None:
    async def scenario() -> None:
        async with (
            api_server() as server,
            raw_connection(server) as (_, gone),
            raw_connection(server) as (reader, writer),
        ):
            gone.write(http_request("GET", NEXT))
            await wait_init(server)
            writer.write(http_request("GET", NEXT))
            gone.close()
            await gone.wait_closed()
            await asyncio.sleep(0.1)

            pending = asyncio.create_task(invoke(server, {"kept": True}, request_id="req-1"))
            event = await read_response(reader)
            pending.cancel()

        assert event.json() == {"kept": True}

    run(scenario())


@pytest.mark.usefixtures("event_loop_kind")
def test_event_that_cannot_be_written_to_a_polling_connection_goes_to_the_next_poll() -> None:
    async def scenario() -> RawResponse:
        async with api_server() as server, raw_connection(server) as (_, gone):
            # What is pipelined behind the poll stops the server reading, so it does not see
            # the hang-up until it writes the event.
            gone.write(http_request("GET", NEXT) + http_request("GET", PING))
            await wait_init(server)
            await asyncio.sleep(0.1)
            gone.close()
            await gone.wait_closed()

            pending = asyncio.create_task(invoke(server, {"kept": True}, request_id="req-1"))
            async with raw_connection(server) as (reader, writer):
                event = await take_event(reader, writer)
            pending.cancel()
            return event

    assert run(scenario()).json() == {"kept": True}


@pytest.mark.usefixtures("event_loop_kind")
def test_assignment_poll_of_a_connection_that_hung_up_is_withdrawn() -> None:
    async def scenario() -> None:
        async with api_server(prestarted=True) as server, raw_connection(server) as (_, writer):
            writer.write(http_request("GET", ASSIGNMENT_PATH))
            await wait_for_assignment_poll(server)
            assert server.awaiting_assignment
            writer.close()
            await writer.wait_closed()

            await eventually(lambda: not server.awaiting_assignment)
            assert server.assign({"A": "1"}) is False

    run(scenario())


def load_relay() -> ModuleType:
    # The runtime files are copied into sandboxes rather than installed, so not importable by name.
    spec = importlib.util.spec_from_file_location("relay_under_test", RELAY)
    assert spec is not None and spec.loader is not None
    relay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(relay)
    return relay


def serve_one_reply(socket_path: str) -> threading.Thread:
    """A Unix socket server that reads a request to its end, then answers and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen()

    def serve() -> None:
        with listener, listener.accept()[0] as peer:
            request = b""
            while data := peer.recv(1024):
                request += data
            peer.sendall(b"got " + request)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def exchange(port: int, request: bytes) -> bytes:
    """Send a request through the relay, end it, and return whatever comes back."""
    reply = b""
    # A relay that cannot reach its socket drops the connection at any point of this.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn,
        contextlib.suppress(OSError),
    ):
        conn.sendall(request)
        conn.shutdown(socket.SHUT_WR)
        while data := conn.recv(1024):
            reply += data
    return reply


def test_relay_passes_a_half_close_through() -> None:
    directory = tempfile.mkdtemp(prefix="lambent-relay-")
    socket_path = os.path.join(directory, "runtime.sock")
    server = serve_one_reply(socket_path)
    port = free_port()
    load_relay().start_relay("127.0.0.1", port, socket_path)

    try:
        # The server answers only once it has seen the end of the request.
        assert exchange(port, b"hello") == b"got hello"
        server.join(WAIT_S)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_relay_keeps_serving_after_the_socket_was_unreachable() -> None:
    directory = tempfile.mkdtemp(prefix="lambent-relay-")
    socket_path = os.path.join(directory, "runtime.sock")
    port = free_port()
    load_relay().start_relay("127.0.0.1", port, socket_path)

    try:
        assert exchange(port, b"early") == b""
        serve_one_reply(socket_path)
        assert exchange(port, b"later") == b"got later"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


PROVIDED_PYTHON_BOOTSTRAP = """
    import json, os, sys, urllib.request

    api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation"
    while True:
        with urllib.request.urlopen(api + "/next") as answer:
            request_id = answer.headers["Lambda-Runtime-Aws-Request-Id"]
            event = json.loads(answer.read())
        body = json.dumps({"echo": event, "request_id": request_id}).encode()
        post = urllib.request.Request(api + "/" + request_id + "/response", data=body)
        urllib.request.urlopen(post).read()
        if "exit_status" in event:
            sys.exit(event["exit_status"])
"""


def test_relay_serves_a_provided_python_runtime_and_passes_on_its_exit_status(
    tmp_path: Path,
) -> None:
    command = [SYSTEM_PYTHON, str(RELAY), "--", SYSTEM_PYTHON, "provided_bootstrap.py"]

    async def scenario() -> None:
        files = {"provided_bootstrap.py": PROVIDED_PYTHON_BOOTSTRAP}
        async with function_process(tmp_path, files, command=command) as function:
            assert await wait_init(function.server) is None
            first = await invoke(function.server, {"n": 1}, request_id="a")
            last = await invoke(function.server, {"exit_status": 3}, request_id="b")
            status = await function.exit_status()

        assert json.loads(first.body) == {"echo": {"n": 1}, "request_id": "a"}
        assert last.ok
        assert status == 3

    run(scenario())


PROVIDED_SHELL_BOOTSTRAP = """\
    #!/bin/sh
    set -eu
    api="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/invocation"
    headers=./headers.txt
    while true; do
        event="$(curl -sS -D "$headers" "$api/next")"
        request_id="$(grep -i '^lambda-runtime-aws-request-id:' "$headers" | tr -d '\\r')"
        request_id="${request_id#*: }"
        curl -sS -o /dev/null -d "{\\"shell\\": $event}" "$api/$request_id/response"
    done
"""


def test_relay_serves_a_provided_shell_runtime_and_forwards_sigterm(tmp_path: Path) -> None:
    command = [SYSTEM_PYTHON, str(RELAY), "--", "./bootstrap"]

    async def scenario() -> None:
        files = {"bootstrap": PROVIDED_SHELL_BOOTSTRAP}
        async with function_process(tmp_path, files, command=command) as function:
            reply = await invoke(function.server, {"n": 1})
            function.process.send_signal(signal.SIGTERM)
            status = await function.exit_status()

        assert json.loads(reply.body) == {"shell": {"n": 1}}
        assert status == 128 + signal.SIGTERM

    run(scenario())


ASSIGNMENT = "/2018-06-01/lambent/assignment"

ENVIRONMENT_HANDLER = """
    import os

    print("module loaded")

    def handler(event, context):
        return {
            "function_name": context.function_name,
            "memory_limit_in_mb": context.memory_limit_in_mb,
            "environ": dict(os.environ),
        }
"""


async def wait_for_assignment_poll(server: RuntimeApiServer) -> None:
    await asyncio.wait_for(server.wait_for_assignment_poll(), WAIT_S)


# Differ between any two runtimes here by construction (paths, ports, the event's trace).
PER_PROCESS_VARIABLES = (
    "LAMBDA_TASK_ROOT",
    "LAMBENT_RUNTIME_SOCKET",
    "AWS_LAMBDA_RUNTIME_API",
    "_X_AMZN_TRACE_ID",
)


async def invoke_once(
    tmp_path: Path, files: dict[str, str], *, prestarted: bool, **options: Any
) -> tuple[dict[str, Any], str]:
    """Invoke a runtime once; its JSON answer and its logs.

    Pre-started, the files are written only once the runtime waits for its assignment.
    """
    tmp_path.mkdir()
    async with function_process(
        tmp_path, {} if prestarted else files, prestarted=prestarted, **options
    ) as function:
        if prestarted:
            await wait_for_assignment_poll(function.server)
            assert function.server.awaiting_assignment
            for name, source in files.items():
                (function.task_root / name).write_text(textwrap.dedent(source))
            assert function.server.assign(function.environment)
        assert await wait_init(function.server) is None
        result = json.loads((await invoke(function.server, {})).body)
        logs = function.logs()
    return result, logs


def test_prestarted_bootstrap_runs_its_assignment_as_a_fresh_start_would(tmp_path: Path) -> None:
    files = {"app.py": ENVIRONMENT_HANDLER}

    async def scenario() -> None:
        fresh, _ = await invoke_once(tmp_path / "fresh", files, prestarted=False)
        prestarted, logs = await invoke_once(tmp_path / "pre", files, prestarted=True)

        for result in (fresh, prestarted):
            for name in PER_PROCESS_VARIABLES:
                result["environ"].pop(name)
        assert prestarted == fresh
        assert prestarted["function_name"] == "greeter"
        assert prestarted["memory_limit_in_mb"] == "256"
        assert "LAMBENT_PRESTARTED" not in prestarted["environ"]
        assert logs.count("module loaded") == 1

    run(scenario())


def test_prestarted_bootstrap_reports_an_init_failure_after_its_assignment(
    tmp_path: Path,
) -> None:
    files = {"app.py": "import not_a_module\n"}

    async def scenario() -> None:
        async with function_process(tmp_path, files, prestarted=True) as function:
            await wait_for_assignment_poll(function.server)
            assert function.server.assign(function.environment)
            failure = await wait_init(function.server)
            status = await function.exit_status()

        assert failure is not None
        assert failure.error_type == "Runtime.ImportModuleError"
        assert status == 1

    run(scenario())


def test_prestarted_relay_runs_its_command_as_a_fresh_start_would(tmp_path: Path) -> None:
    bootstrap = """
        import json, os, urllib.request

        api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation"
        with urllib.request.urlopen(api + "/next") as answer:
            request_id = answer.headers["Lambda-Runtime-Aws-Request-Id"]
        body = json.dumps(dict(os.environ)).encode()
        urllib.request.urlopen(urllib.request.Request(api + "/" + request_id + "/response", body))
    """
    files = {"provided_bootstrap.py": bootstrap}
    command = [SYSTEM_PYTHON, str(RELAY), "--", SYSTEM_PYTHON, "provided_bootstrap.py"]

    async def scenario() -> None:
        fresh, _ = await invoke_once(tmp_path / "fresh", files, prestarted=False, command=command)
        prestarted, _ = await invoke_once(tmp_path / "pre", files, prestarted=True, command=command)

        for environ in (fresh, prestarted):
            for name in PER_PROCESS_VARIABLES:
                environ.pop(name, None)
        assert prestarted == fresh
        assert prestarted["AWS_LAMBDA_FUNCTION_NAME"] == "greeter"
        assert "LAMBENT_PRESTARTED" not in prestarted

    run(scenario())


def test_assign_is_refused_when_no_runtime_polls_for_it() -> None:
    async def scenario() -> None:
        async with api_server(prestarted=True) as server:
            assert not server.awaiting_assignment
            assert server.assign({"A": "1"}) is False

    run(scenario())


def test_an_assignment_is_handed_out_once() -> None:
    async def scenario() -> None:
        async with api_server(prestarted=True) as server, runtime_client(server) as api:

            async def poll() -> tuple[int, dict[str, Any]]:
                async with api.get(ASSIGNMENT) as answer:
                    return answer.status, await answer.json()

            first = asyncio.create_task(poll())
            await wait_for_assignment_poll(server)
            assert server.assign({"A": "1"})

            assert await first == (200, {"environment": {"A": "1"}})
            status, body = await poll()
            assert status == 403
            assert body["errorType"] == "InvalidStateTransition"
            assert server.assign({"A": "2"}) is False

    run(scenario())


def test_assignment_endpoint_is_not_found_on_a_runtime_that_was_not_prestarted() -> None:
    async def scenario() -> int:
        async with (
            api_server() as server,
            runtime_client(server) as api,
            api.get(ASSIGNMENT) as answer,
        ):
            return answer.status

    assert run(scenario()) == 404


def test_stop_answers_a_runtime_waiting_for_its_assignment() -> None:
    async def scenario() -> None:
        async with api_server(prestarted=True) as server, runtime_client(server) as api:

            async def poll() -> int:
                async with api.get(ASSIGNMENT) as answer:
                    return answer.status

            polling = asyncio.create_task(poll())
            await wait_for_assignment_poll(server)
            await server.stop()

            assert await asyncio.wait_for(polling, WAIT_S) == 503
            assert server.assign({"A": "1"}) is False

    run(scenario())
