"""Relays TCP connections on the sandbox's loopback to the worker's Runtime API socket.

The sandbox has no network, only its own loopback, and the Runtime API is a Unix socket mounted
at /var/runtime/api/runtime.sock. Runtimes and SDKs expect it at the TCP address in
AWS_LAMBDA_RUNTIME_API, so this relay listens there and copies bytes both ways.

Two uses:

* imported: ``start_relay(host, port, socket_path)`` binds before returning and relays from a
  daemon thread (the built-in Python runtime does this);
* as a program: ``python3 relay.py -- CMD ARGS...`` binds, runs CMD as its child, forwards
  SIGTERM and SIGINT to it and exits with its status (the entry point of ``provided``
  functions, whose CMD is /var/task/bootstrap). Started with LAMBENT_PRESTARTED set, it first
  waits for the function it is assigned and runs CMD with that function's environment.

It runs inside the sandbox under Debian's python3, so it uses only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

DEFAULT_SOCKET = "/var/runtime/api/runtime.sock"
DEFAULT_ADDRESS = "127.0.0.1:9001"
ASSIGNMENT_PATH = "/2018-06-01/lambent/assignment"

_CHUNK_BYTES = 64 * 1024


def start_relay(listen_host: str, listen_port: int, socket_path: str) -> threading.Thread:
    """Listen on listen_host:listen_port and relay each connection to socket_path."""
    listener = socket.create_server((listen_host, listen_port), backlog=64)
    thread = threading.Thread(
        target=_accept_forever, args=(listener, socket_path), name="lambent-relay", daemon=True
    )
    thread.start()
    return thread


def _accept_forever(listener: socket.socket, socket_path: str) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            if listener.fileno() == -1:
                return
            # Usually out of file descriptors. Spinning would only burn the function's CPU;
            # a short pause lets the handler's own connections close first.
            time.sleep(0.05)
            continue

        try:
            threading.Thread(target=_relay, args=(client, socket_path), daemon=True).start()
        except RuntimeError:
            client.close()


def _relay(client: socket.socket, socket_path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # HTTP clients write a request and wait for the answer; Nagle's algorithm would hold
        # back small writes on loopback for tens of milliseconds.
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream.connect(socket_path)
    except OSError as error:
        print(f"lambent relay: cannot reach {socket_path}: {error}", file=sys.stderr)
        client.close()
        upstream.close()
        return

    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    try:
        back.start()
    except RuntimeError:
        client.close()
        upstream.close()
        return

    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy one direction until its end, then pass the end on and leave the other open."""
    try:
        while data := source.recv(_CHUNK_BYTES):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        # A reset on either side ends the whole connection; shutting both sockets down also
        # wakes the thread copying the other direction.
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def wait_for_assignment(socket_path: str) -> dict[str, str]:
    """Long-poll the worker for the environment of the function this sandbox is given."""
    # Imported here: only a pre-started sandbox needs them, and every fresh start would pay
    # for importing them.
    import http.client
    import json

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(socket_path)

    connection = UnixConnection("localhost")
    try:
        connection.request("GET", ASSIGNMENT_PATH)
        response = connection.getresponse()
        body = response.read()
    except http.client.HTTPException as error:
        raise OSError(f"{ASSIGNMENT_PATH} failed: {error!r}") from error
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"{ASSIGNMENT_PATH} answered {response.status}: {body[:200]!r}")
    environment = json.loads(body).get("environment")
    if not isinstance(environment, dict):
        raise ValueError(f"{ASSIGNMENT_PATH} answered no environment: {body[:200]!r}")
    return environment


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str]) -> int:
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        print("usage: relay.py -- COMMAND [ARGS...]", file=sys.stderr)
        return 2

    socket_path = os.environ.get("LAMBENT_RUNTIME_SOCKET", DEFAULT_SOCKET)
    address = os.environ.get("AWS_LAMBDA_RUNTIME_API", DEFAULT_ADDRESS)
    try:
        start_relay(*_split_address(address), socket_path)
    except (OSError, ValueError) as error:
        print(f"lambent relay: cannot listen on {address}: {error}", file=sys.stderr)
        return 1

    if os.environ.get("LAMBENT_PRESTARTED"):
        try:
            environment = wait_for_assignment(socket_path)
        except (OSError, ValueError) as error:
            # The worker stops the API when it tears the sandbox down; nobody to report to.
            print(f"lambent relay: no assignment: {error}", file=sys.stderr)
            return 1
        # Updated rather than replaced, as a fresh start would have what the interpreter set
        # itself while starting (LC_CTYPE, when it coerces the C locale).
        os.environ.update(environment)
        os.environ.pop("LAMBENT_PRESTARTED", None)

    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            raise SystemExit(128 + signum)
        child.send_signal(signum)

    # Installed before the child starts so that a stop request can never be lost in between.
    # SIGINT is forwarded too: in the sandbox there is no terminal to deliver it to the child.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        child = subprocess.Popen(command)
    except OSError as error:
        print(f"lambent relay: cannot run {command[0]}: {error}", file=sys.stderr)
        # The shell's conventions: 127 for a missing command, 126 for one that cannot run.
        return 127 if isinstance(error, FileNotFoundError) else 126

    status = child.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
