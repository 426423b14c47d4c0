"""Lambent's built-in python3.11 runtime.

The sandbox runs it as ``/usr/bin/python3 -u /var/runtime/python/bootstrap.py`` with the
function's code in /var/task as the working directory. Only the standard library is available.

It loads the handler named by _HANDLER, reports a failure to load on /init/error, then loops:
take an event from /next, call the handler, post its result to /response or its exception to
/error. It speaks the Runtime API directly on the Unix socket mounted into the sandbox, over
one keep-alive connection, and starts the TCP relay so that user code and SDKs find the same
API at AWS_LAMBDA_RUNTIME_API.

Started with LAMBENT_PRESTARTED set, it belongs to no function yet: /var/task is empty and the
environment generic. It waits on Lambent's assignment endpoint for its function's environment,
takes it as its own, and then loads the handler exactly as above.
"""

from __future__ import annotations

import contextlib
import decimal
import importlib
import importlib.util
import io
import json
import logging
import os
import socket
import sys
import time
import traceback

DEFAULT_SOCKET = "/var/runtime/api/runtime.sock"

_API = "/2018-06-01/runtime"
_ASSIGNMENT = "/2018-06-01/lambent/assignment"
_THIS_FILE = os.path.abspath(__file__)
# /var/runtime in the sandbox, which holds relay.py; this file sits in its python/ folder.
_RUNTIME_DIR = os.path.dirname(os.path.dirname(_THIS_FILE))
# Enough for a reply's head and a typical event in one recv; larger bodies are read straight
# into their own buffer.
_READ_BUFFER_BYTES = 64 * 1024


class RuntimeApiError(Exception):
    """The Runtime API refused to hand out events: the worker is tearing the sandbox down."""


class RuntimeApiProtocolError(Exception):
    """A reply from the Runtime API was not HTTP this client can read."""


class ReplyHeaders:
    """A reply's headers; names match in any case, as HTTP has it."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str]) -> None:
        # Keyed by lower-case name.
        self._values = values

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)


def _size(text: str | bytes, base: int = 10) -> int:
    """A Content-Length or chunk size; RuntimeApiProtocolError unless a whole number."""
    try:
        size = int(text, base)
    except ValueError:
        size = -1
    if size < 0:
        raise RuntimeApiProtocolError(f"bad body size {text[:100]!r}")
    return size


class RuntimeApi:
    """A client for the Runtime API over the worker's Unix socket.

    It speaks just enough HTTP/1.1 for the worker's server, on one keep-alive connection. It is
    written on the socket rather than with http.client, whose reply parsing (the email package,
    a message object per reply) was most of the runtime's own time per invocation.
    """

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._sock: socket.socket | None = None
        self._reader: io.BufferedReader | None = None

    def next_invocation(self) -> tuple[bytes, ReplyHeaders]:
        status, headers, body = self._request("GET", f"{_API}/invocation/next")
        if status != 200:
            raise RuntimeApiError(f"/next answered {status}: {body[:200]!r}")
        return body, headers

    def assignment(self) -> dict[str, str]:
        """Wait for the function this pre-started runtime is given; that function's environment."""
        status, _, body = self._request("GET", _ASSIGNMENT)
        if status != 200:
            raise RuntimeApiError(f"/assignment answered {status}: {body[:200]!r}")
        return json.loads(body)["environment"]

    def post_response(self, request_id: str, body: bytes) -> None:
        self._request("POST", f"{_API}/invocation/{request_id}/response", body)

    def post_error(self, request_id: str, failure: FunctionError) -> None:
        path = f"{_API}/invocation/{request_id}/error"
        self._request("POST", path, failure.to_json(), failure.error_type)

    def post_init_error(self, failure: FunctionError) -> None:
        self._request("POST", f"{_API}/init/error", failure.to_json(), failure.error_type)

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
        self._sock = None
        self._reader = None

    def _request(
        self, method: str, path: str, body: bytes | None = None, error_type: str | None = None
    ) -> tuple[int, ReplyHeaders, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        # The error type is also in the body, where the worker looks when the header is missing;
        # a name that cannot travel in a header (an exception class named in Unicode, or one
        # with a line break) is left to the body.
        if error_type is not None and error_type.isascii() and error_type.isprintable():
            head += f"Lambda-Runtime-Function-Error-Type: {error_type}\r\n"
        message = (head + "\r\n").encode("latin-1")
        if body is not None:
            message += body

        # A connection can be dropped while a long handler runs; one retry on a new connection
        # covers that. A retried post the worker had already taken is refused with a harmless
        # 400, and replies other than /next are not acted upon.
        try:
            return self._exchange(message)
        except (ConnectionError, RuntimeApiProtocolError):
            self.close()
        return self._exchange(message)

    def _exchange(self, message: bytes) -> tuple[int, ReplyHeaders, bytes]:
        if self._sock is None:
            self._connect()
        # One write for the whole request, so that the worker reads it with one wake-up.
        self._sock.sendall(message)

        reader = self._reader
        status_line = reader.readline()
        if not status_line:
            raise ConnectionResetError("the Runtime API closed the connection")
        try:
            status = int(status_line.split(None, 2)[1])
        except (IndexError, ValueError):
            raise RuntimeApiProtocolError(f"bad status line {status_line[:100]!r}") from None

        values: dict[str, str] = {}
        while True:
            line = reader.readline()
            if line == b"\r\n" or line == b"\n":
                break
            if not line:
                raise ConnectionResetError("the Runtime API closed the connection mid-reply")
            # The worker's server writes its headers in UTF-8.
            name, _, value = line.decode("utf-8", "replace").partition(":")
            values[name.strip().lower()] = value.strip()

        length = values.get("content-length")
        if "chunked" in values.get("transfer-encoding", "").lower():
            body = self._read_chunked()
        elif length is not None:
            body = self._read_exactly(_size(length))
        else:
            # Without a length, the reply ends where the worker closes the connection.
            body = reader.read()
            values["connection"] = "close"

        if "close" in values.get("connection", "").lower():
            self.close()
        return status, ReplyHeaders(values), body

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        # Buffered, so that a reply's status line, headers and a small body take one recv.
        self._reader = sock.makefile("rb", buffering=_READ_BUFFER_BYTES)

    def _read_exactly(self, size: int) -> bytes:
        data = self._reader.read(size)
        if len(data) < size:
            raise ConnectionResetError("the Runtime API closed the connection mid-body")
        return data

    def _read_chunked(self) -> bytes:
        reader = self._reader
        chunks = []
        while True:
            size_line = reader.readline()
            if not size_line:
                raise ConnectionResetError("the Runtime API closed the connection mid-body")
            size = _size(size_line.split(b";", 1)[0], 16)
            if size == 0:
                break
            chunk = self._read_exactly(size + 2)
            if not chunk.endswith(b"\r\n"):
                raise RuntimeApiProtocolError("a chunk does not end with CRLF")
            chunks.append(chunk[:-2])

        # Trailer fields, which nothing here needs, end with an empty line.
        while True:
            line = reader.readline()
            if line == b"\r\n" or line == b"\n":
                return b"".join(chunks)
            if not line:
                raise ConnectionResetError("the Runtime API closed the connection mid-body")


class FunctionError(Exception):
    """A failure reported to the Runtime API, in Lambda's error shape."""

    def __init__(self, error_type: str, message: str, stack_trace: list[str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.stack_trace = stack_trace or []

    def to_json(self) -> bytes:
        payload = {
            "errorMessage": self.message,
            "errorType": self.error_type,
            "stackTrace": self.stack_trace,
        }
        return json.dumps(payload).encode()

    def log(self) -> None:
        lines = [f"[ERROR] {self.error_type}: {self.message}\n"]
        if self.stack_trace:
            lines.append("Traceback (most recent call last):\n")
            lines.extend(self.stack_trace)
        sys.stderr.write("".join(lines))


class CognitoIdentity:
    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self, data: dict | None = None) -> None:
        data = data or {}
        self.cognito_identity_id = data.get("cognitoIdentityId")
        self.cognito_identity_pool_id = data.get("cognitoIdentityPoolId")


class Client:
    __slots__ = (
        "installation_id",
        "app_title",
        "app_version_name",
        "app_version_code",
        "app_package_name",
    )

    def __init__(self, data: dict) -> None:
        for name in self.__slots__:
            setattr(self, name, data.get(name))


class ClientContext:
    __slots__ = ("client", "custom", "env")

    def __init__(self, data: dict) -> None:
        client = data.get("client")
        self.client = Client(client) if isinstance(client, dict) else None
        self.custom = data.get("custom")
        self.env = data.get("env")


class LambdaContext:
    """The handler's second argument, with the attributes Lambda's Python runtime provides."""

    def __init__(
        self,
        function: dict[str, str | None],
        request_id: str,
        deadline_ms: int,
        invoked_function_arn: str | None,
        client_context: ClientContext | None,
        identity: CognitoIdentity,
    ) -> None:
        self.aws_request_id = request_id
        self.invoked_function_arn = invoked_function_arn
        self.client_context = client_context
        self.identity = identity
        self.function_name = function["function_name"]
        self.function_version = function["function_version"]
        # A string, as in Lambda's Python runtime, which passes the environment value through.
        self.memory_limit_in_mb = function["memory_limit_in_mb"]
        self.log_group_name = function["log_group_name"]
        self.log_stream_name = function["log_stream_name"]
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(self._deadline_ms - int(time.time() * 1000), 0)

    def log(self, message: str) -> None:
        sys.stdout.write(str(message))


class _RequestIdFilter(logging.Filter):
    """Stamps each log record with the id of the invocation that is running."""

    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.request_id
        return True


_REQUEST_ID_FILTER = _RequestIdFilter()


def _install_logging() -> None:
    # Lambda's Python runtime puts a handler on the root logger, so that the common
    # `logging.getLogger().setLevel(logging.INFO)` is all a function needs to log.
    formatter = logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S",
    )
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    handler.addFilter(_REQUEST_ID_FILTER)
    logging.getLogger().addHandler(handler)


def _function_from_env() -> dict[str, str | None]:
    # Read once, before user code runs and can change os.environ.
    env = os.environ
    return {
        "function_name": env.get("AWS_LAMBDA_FUNCTION_NAME"),
        "function_version": env.get("AWS_LAMBDA_FUNCTION_VERSION"),
        "memory_limit_in_mb": env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"),
        "log_group_name": env.get("AWS_LAMBDA_LOG_GROUP_NAME"),
        "log_stream_name": env.get("AWS_LAMBDA_LOG_STREAM_NAME"),
    }


def _start_relay(socket_path: str) -> None:
    address = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    if not address:
        return

    # relay.py is loaded from its file under a private module name rather than through
    # sys.path: a user module called "relay" must still import the user's own file.
    spec = importlib.util.spec_from_file_location(
        "_lambent_relay", os.path.join(_RUNTIME_DIR, "relay.py")
    )
    relay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(relay)
    host, _, port = address.rpartition(":")
    try:
        relay.start_relay(host.strip("[]"), int(port), socket_path)
    except (OSError, ValueError) as error:
        # This runtime does not need the relay itself; only user code calling the API over TCP
        # is affected, so the function still starts.
        sys.stderr.write(f"[WARNING] Runtime API relay not started on {address}: {error}\n")


def _adopt_environment(environment: dict[str, str]) -> None:
    """Take the assigned function's environment in place of the generic one started with."""
    # Updated rather than replaced: what the interpreter set itself while starting (LC_CTYPE,
    # when it coerces the C locale) a fresh start of the function has as well.
    os.environ.update(environment)
    os.environ.pop("LAMBENT_PRESTARTED", None)
    # /var/task was empty until the assignment; import finders may have cached that.
    importlib.invalidate_caches()


def _use_task_root_for_imports() -> None:
    task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
    runtime_dirs = {_RUNTIME_DIR, os.path.dirname(_THIS_FILE)}
    rest = [
        entry
        for entry in sys.path
        if entry != task_root and os.path.abspath(entry or ".") not in runtime_dirs
    ]
    sys.path[:] = [task_root, *rest]


def _user_frames(error: BaseException) -> list[str]:
    """Format the traceback of error without this runtime's frames or importlib's."""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith((_RUNTIME_DIR + os.sep, "<frozen importlib"))
    ]
    return traceback.format_list(frames)


def load_handler(handler: str):
    """Import the handler named "module.function"; the module part may use "/" or "."."""
    module_name, _, function_name = handler.rpartition(".")
    if not module_name or not function_name:
        raise FunctionError(
            "Runtime.MalformedHandlerName",
            f"Bad handler '{handler}': expected the form <module>.<function>",
        )

    try:
        module = importlib.import_module(module_name.replace("/", "."))
    except ImportError as error:
        raise FunctionError(
            "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {error}"
        ) from None
    except SyntaxError as error:
        location = f'  File "{error.filename}", line {error.lineno}\n'
        if error.text:
            location += f"    {error.text.strip()}\n"
        raise FunctionError(
            "Runtime.UserCodeSyntaxError",
            f"Syntax error in module '{module_name}': {error}",
            [location],
        ) from None
    except Exception as error:
        raise FunctionError(type(error).__name__, str(error), _user_frames(error)) from None

    try:
        return getattr(module, function_name)
    except AttributeError:
        raise FunctionError(
            "Runtime.HandlerNotFound",
            f"Handler '{function_name}' missing on module '{module_name}'",
        ) from None


def _json_default(value: object) -> object:
    # DynamoDB hands numbers to handlers as Decimal; Lambda's runtime returns them as floats.
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _decode_event(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def _parse_json_header(value: str | None) -> dict | None:
    if not value:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _flush_output() -> None:
    # The worker attributes output to the invocation that is running, and reads it once the
    # reply has arrived, so everything the handler printed must be in the pipe before that.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def invoke(api: RuntimeApi, handler, function: dict[str, str | None]) -> None:
    """Take one event from the Runtime API, run the handler on it and post the outcome."""
    body, headers = api.next_invocation()
    request_id = headers.get("Lambda-Runtime-Aws-Request-Id", "")
    _REQUEST_ID_FILTER.request_id = request_id
    trace_id = headers.get("Lambda-Runtime-Trace-Id")
    if trace_id:
        os.environ["_X_AMZN_TRACE_ID"] = trace_id
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)

    client_context = _parse_json_header(headers.get("Lambda-Runtime-Client-Context"))
    context = LambdaContext(
        function,
        request_id,
        int(headers.get("Lambda-Runtime-Deadline-Ms") or 0),
        headers.get("Lambda-Runtime-Invoked-Function-Arn"),
        ClientContext(client_context) if client_context is not None else None,
        CognitoIdentity(_parse_json_header(headers.get("Lambda-Runtime-Cognito-Identity"))),
    )

    try:
        result = handler(_decode_event(body), context)
    except Exception as error:
        failure = FunctionError(type(error).__name__, str(error), _user_frames(error))
    else:
        try:
            response = json.dumps(result, default=_json_default).encode()
        except Exception as error:
            failure = FunctionError("Runtime.MarshalError", f"Unable to marshal response: {error}")
        else:
            _flush_output()
            api.post_response(request_id, response)
            return

    failure.log()
    _flush_output()
    api.post_error(request_id, failure)


def main() -> int:
    socket_path = os.environ.get("LAMBENT_RUNTIME_SOCKET", DEFAULT_SOCKET)
    api = RuntimeApi(socket_path)
    _start_relay(socket_path)
    _install_logging()

    try:
        if os.environ.get("LAMBENT_PRESTARTED"):
            _adopt_environment(api.assignment())
        _use_task_root_for_imports()
        function = _function_from_env()
        try:
            handler = load_handler(os.environ.get("_HANDLER", ""))
        except FunctionError as failure:
            failure.log()
            _flush_output()
            api.post_init_error(failure)
            return 1

        while True:
            invoke(api, handler, function)
    except (OSError, RuntimeApiProtocolError, RuntimeApiError) as error:
        # The worker closes the API when it tears the sandbox down; there is nobody to report to.
        sys.stderr.write(f"[ERROR] Runtime API unavailable: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
