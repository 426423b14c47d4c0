"""Hostile functions: each attempt fails inside its sandbox and the platform keeps serving.

Every test deploys a function that tries one thing a tenant must not be able to do, asserts on
what the function saw (or on the Lambda error type that ended it), and then checks that a
healthy function of another tenant still answers. Where the attempt targets something real on
the host (a listening port, a file, another instance's secret), the test first confirms from the
host side that the target exists, so a pass cannot come from attacking nothing.

Every test runs against both sandboxes. Where they differ by design (the uid seen inside, what
the root filesystem is, where an instance's control groups sit), the expectation is that
backend's, never a looser one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support import Server, Tenant
from workers import cgroups
from workers.agent import resolve_sandbox_dir
from workers.sandbox import docker as docker_sandbox
from workers.sandbox.bubblewrap import ETC_FILES, SANDBOX_INNER_ID

pytestmark = pytest.mark.both_sandboxes

# The host uid every sandbox runs as (the default of LAMBENT_SANDBOX_UID, which the test server
# does not override).
SANDBOX_UID = 61000
# The defaults of LAMBENT_TMP_MB and LAMBENT_PIDS_MAX.
TMP_CAP_MB = 512
PIDS_MAX = 1024
SANDBOX_MOUNT_POINTS = [
    "/", "/usr", "/etc", "/proc", "/dev", "/tmp", "/var/task", "/var/runtime", "/var/runtime/api"
]  # fmt: skip
# A container's mounts below /dev, /proc and /sys are the engine's own (devices, masked kernel
# files, its cgroups); the rest must be exactly these. The three files in /etc are the engine's,
# written for this container alone.
CONTAINER_MOUNT_POINTS = [
    "/", "/proc", "/dev", "/sys", "/tmp", "/var/task", "/var/runtime", "/var/runtime/api",
    docker_sandbox.INIT_DIR, "/usr/sbin/docker-init",
    "/etc/resolv.conf", "/etc/hostname", "/etc/hosts",
]  # fmt: skip


def inner_uid(server: Server) -> int:
    """The uid function code runs as: mapped from the host's by bubblewrap, the same in Docker."""
    return SANDBOX_INNER_ID if server.sandbox == "process" else SANDBOX_UID


def instance_group(server: Server, controller: str, instance_id: str) -> Path:
    if server.sandbox == "docker":
        return docker_sandbox.instance_cgroup(controller, instance_id)
    return cgroups.CGROUP_ROOT / controller / cgroups.PARENT / instance_id


# Shared by the hostile handlers below: run one action and report its value or its errno, so
# that the test, not the function, decides what counts as a failure.
PRELUDE = """
import errno
import os
import os
import socket
import time


def attempt(action):
    try:
        return {"value": action()}
    except OSError as exc:
        return {"errno": exc.errno, "error": repr(exc)}


def mounts():
    # (mount point, source directory within its filesystem, options), in mount order.
    with open("/proc/self/mountinfo") as f:
        return [(v[4], v[3], v[5].split(",")) for v in (line.split() for line in f)]


def mount_options(target):
    # The options of the mount the path lives on: the deepest mount point above it, and of
    # several on the same point the last, which hides the earlier ones.
    above = [m for m in mounts() if target == m[0] or target.startswith(m[0].rstrip("/") + "/")]
    deepest = max(len(point) for point, _, _ in above)
    return [options for point, _, options in above if len(point) == deepest][-1]
"""

HEALTHY = """
import uuid

INSTANCE = uuid.uuid4().hex
CALLS = {"n": 0}


def handler(event, context):
    CALLS["n"] += 1
    return {"echo": event, "calls": CALLS["n"], "instance": INSTANCE}
"""


def assert_platform_serves(tenant: Tenant) -> None:
    """A fresh function of an uninvolved tenant deploys, cold-starts and answers correctly."""
    tenant.deploy("healthy", HEALTHY)
    token = uuid.uuid4().hex

    response = tenant.invoke("healthy", {"token": token})

    assert response.status_code == 200, response.text
    assert "x-function-error" not in response.headers, response.text
    assert response.json()["echo"] == {"token": token}


def assert_failed(result: dict, *errnos: int) -> None:
    assert "value" not in result, f"the attempt succeeded: {result}"
    assert result["errno"] in errnos, result


def function_error(response: httpx.Response) -> str:
    assert response.headers.get("x-function-error") == "Unhandled", response.text
    return response.json()["errorType"]


# -- 1. network -------------------------------------------------------------------------------

NETWORK = (
    PRELUDE
    + """

def connect(host, port):
    with socket.create_connection((host, port), timeout=3):
        return "connected"


def handler(event, context):
    relay_host, _, relay_port = os.environ["AWS_LAMBDA_RUNTIME_API"].partition(":")
    return {
        "interfaces": [name for _, name in socket.if_nameindex()],
        "relay": attempt(lambda: connect(relay_host, int(relay_port))),
        "loopback": {
            str(port): attempt(lambda port=port: connect("127.0.0.1", port))
            for port in event["ports"]
        },
        "outside": attempt(lambda: connect(event["outside"], 53)),
    }
"""
)


def test_network_reaches_neither_the_api_nor_host_ports_nor_outside(
    server: Server, tenant: Tenant, other_tenant: Tenant
) -> None:
    api_port = urlsplit(server.base_url).port
    # The API listens on the host's loopback (PostgreSQL usually does too); a shared network
    # namespace would let the function connect to it.
    ports = [api_port, 5432, 22, 80, 8080]
    with socket.create_connection(("127.0.0.1", api_port), timeout=3):
        pass
    tenant.deploy("net", NETWORK)

    seen = tenant.invoke("net", {"ports": ports, "outside": "1.1.1.1"}).json()

    assert seen["interfaces"] == ["lo"]
    # The sandbox's loopback works (the Runtime API relay listens on it), so a refusal means
    # nothing listens there in this namespace, not that networking is broken altogether.
    assert seen["relay"] == {"value": "connected"}
    for port in ports:
        assert_failed(seen["loopback"][str(port)], errno.ECONNREFUSED)
    assert_failed(seen["outside"], errno.ENETUNREACH, errno.EHOSTUNREACH)
    assert_platform_serves(other_tenant)


# -- 2. host files ----------------------------------------------------------------------------

HOST_FILES = (
    PRELUDE
    + """

def look(path):
    if os.path.isdir(path):
        return sorted(os.listdir(path))
    with open(path, "rb") as f:
        return f.read(4096).decode(errors="replace")


def write(path):
    with open(path, "w") as f:
        f.write("planted")


def every_environ():
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            found[name] = attempt(lambda name=name: look(f"/proc/{name}/environ"))
    return found


def handler(event, context):
    return {
        "hidden": {path: attempt(lambda path=path: look(path)) for path in event["hidden"]},
        "etc": sorted(os.listdir("/etc")),
        "pid1_uid": os.stat("/proc/1").st_uid,
        "environs": every_environ(),
        "usr_python": attempt(lambda: open("/usr/bin/python3", "rb").read(4).hex()),
        "usr_new_file": attempt(lambda: write("/usr/planted")),
        "usr_existing_file": attempt(lambda: open("/usr/bin/python3", "r+b").close()),
        "usr_mount": mount_options("/usr"),
        "etc_mount": mount_options("/etc"),
        "root_mount": mount_options("/"),
        "mount_points": [point for point, _, _ in mounts()],
    }
"""
)


def test_host_files_are_absent_and_usr_is_read_only(
    server: Server, tenant: Tenant, other_tenant: Tenant
) -> None:
    database_file = server.data_dir / "lambent.db"
    sandbox_dir = resolve_sandbox_dir(server.data_dir, None)
    hidden = [str(server.data_dir), str(database_file), str(sandbox_dir)]
    if server.sandbox == "process":
        hidden += ["/etc/shadow", "/root", "/home", "/var/lib"]
    else:
        # The root filesystem is the runtime's image: it has an /etc/shadow and a /var/lib of
        # its own, so the host's private places are named by paths only the host has.
        hidden += ["/var/lib/docker", "/var/lib/lambent", "/var/lib/postgresql"]
    assert server.data_dir.is_dir() and sandbox_dir.is_dir() and Path("/etc/shadow").exists()
    tenant.deploy("files", HOST_FILES)

    seen = tenant.invoke("files", {"hidden": hidden}).json()

    # Not "permission denied": the paths do not exist in the sandbox's mount namespace at all.
    for path in hidden:
        assert_failed(seen["hidden"][path], errno.ENOENT)
    if server.sandbox == "process":
        assert set(seen["etc"]) <= {*ETC_FILES, "localtime"}
        # Nothing else of the host is mounted (devices and /proc are the sandbox's own).
        mount_points = [p for p in seen["mount_points"] if not p.startswith(("/dev/", "/proc/"))]
        assert sorted(mount_points) == sorted(SANDBOX_MOUNT_POINTS)
    else:
        prefixes = ("/dev/", "/proc/", "/sys/")
        mount_points = [p for p in seen["mount_points"] if not p.startswith(prefixes)]
        assert sorted(mount_points) == sorted(CONTAINER_MOUNT_POINTS)
        assert "ro" in seen["root_mount"]
    # PID 1 is the sandbox's own init, running as the sandbox user; the host's init is root.
    assert seen["pid1_uid"] == inner_uid(server)
    pid1_environ = seen["environs"]["1"]["value"]
    assert server.admin_key not in pid1_environ
    # No platform setting: only the Runtime API socket and, where PID 1 holds the container's
    # first environment (Docker) and the sandbox was pre-started, the flag that made the
    # runtime wait for its function.
    settings = [v for v in pid1_environ.split("\0") if v.startswith("LAMBENT_")]
    allowed = ("LAMBENT_RUNTIME_SOCKET=", "LAMBENT_PRESTARTED=1")
    assert all(v.startswith(allowed) for v in settings), settings
    assert server.admin_key not in json.dumps(seen["environs"])
    assert seen["usr_python"] == {"value": "7f454c46"}  # readable: an ELF header
    assert_failed(seen["usr_new_file"], errno.EROFS)
    # An existing root-owned file is refused by its permissions before the mount is consulted.
    assert_failed(seen["usr_existing_file"], errno.EROFS, errno.EACCES)
    assert "ro" in seen["usr_mount"] and "ro" in seen["etc_mount"]
    assert_platform_serves(other_tenant)


# -- 3. other instances' environment ----------------------------------------------------------

KEEPER = """
import os
import subprocess

# A process that holds the secret in the environment it started with, which is what /proc shows.
# (The runtime itself may have been given its environment only after it started: a pre-started
# sandbox's.)
subprocess.Popen(["sleep", "600"])


def handler(event, context):
    return os.environ["KEEPER_SECRET"]
"""

SNOOP = (
    PRELUDE
    + """

def read(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def handler(event, context):
    pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    return {
        "pids": pids,
        "uids": [attempt(lambda pid=pid: os.stat(f"/proc/{pid}").st_uid) for pid in pids],
        "environs": [attempt(lambda pid=pid: read(f"/proc/{pid}/environ")) for pid in pids],
        "cmdlines": [attempt(lambda pid=pid: read(f"/proc/{pid}/cmdline")) for pid in pids],
    }
"""
)


def host_environs_containing(secret: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if secret.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # the process ended while being read
    return found


def test_another_instances_environment_is_invisible(
    server: Server, tenant: Tenant, other_tenant: Tenant
) -> None:
    secret = f"keeper-{uuid.uuid4().hex}"
    other_tenant.deploy("keeper", KEEPER, environment={"KEEPER_SECRET": secret})
    assert other_tenant.invoke("keeper").json() == secret
    # The keeper's instance stays warm, so a process of its holds the secret in its
    # environment on this host while the snoop runs.
    assert host_environs_containing(secret)
    tenant.deploy("snoop", SNOOP)

    seen = tenant.invoke("snoop").json()

    assert secret not in json.dumps(seen)
    # Only the sandbox's init and the runtime: a shared PID namespace would show every host
    # process, most of them root's (unmapped, so not the sandbox uid).
    assert len(seen["pids"]) <= 3, seen["pids"]
    assert all(uid == {"value": inner_uid(server)} for uid in seen["uids"]), seen["uids"]
    assert other_tenant.invoke("keeper").json() == secret
    assert_platform_serves(other_tenant)


# -- 4. the code directory --------------------------------------------------------------------

TASK_WRITER = (
    PRELUDE
    + """
import hashlib


def overwrite():
    with open("/var/task/app.py", "w") as f:
        f.write("def handler(event, context):\\n    return 'tampered'\\n")


def plant():
    with open("/var/task/planted.py", "w") as f:
        f.write("x = 1\\n")


def code_digest():
    with open("/var/task/app.py", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def handler(event, context):
    if event.get("tamper"):
        tampering = {
            "overwrite": attempt(overwrite),
            "plant": attempt(plant),
            "chmod": attempt(lambda: os.chmod("/var/task/app.py", 0o777)),
            "remove": attempt(lambda: os.remove("/var/task/app.py")),
        }
    else:
        tampering = {}
    return {
        "tampering": tampering,
        "mount": mount_options("/var/task"),
        "files": os.listdir("/var/task"),
        "digest": code_digest(),
    }
"""
)


def test_code_directory_is_read_only(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("task", TASK_WRITER)
    deployed_digest = hashlib.sha256(TASK_WRITER.encode()).hexdigest()

    tampering = tenant.invoke("task", {"tamper": True}).json()["tampering"]
    after = tenant.invoke("task").json()

    for action in ("overwrite", "plant", "chmod", "remove"):
        assert_failed(tampering[action], errno.EROFS, errno.EACCES)
    assert "ro" in after["mount"]
    assert after["files"] == ["app.py"]
    assert after["digest"] == deployed_digest
    assert_platform_serves(other_tenant)


# -- 5. memory --------------------------------------------------------------------------------

HOG = """
def handler(event, context):
    blocks = []
    for _ in range(64):  # 64 blocks of 16 MB, every page written: 1 GB
        blocks.append(b"x" * (16 * 1024 * 1024))
    return f"allocated {len(blocks) * 16} MB"
"""


def test_out_of_memory_spares_a_concurrent_warm_function(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("hog", HOG, memory_mb=128, timeout_s=30)
    other_tenant.deploy("steady", HEALTHY)
    warm = other_tenant.invoke("steady", {"n": 0}).json()

    with ThreadPoolExecutor(max_workers=1) as pool, tenant.server.client(tenant.key) as client:
        hog = pool.submit(client.post, "/v1/functions/hog/invocations")
        answers = []
        while not hog.done() or not answers:
            answers.append(other_tenant.invoke("steady", {"n": len(answers) + 1}))
            time.sleep(0.05)
        hog_response = hog.result()

    assert function_error(hog_response) == "Runtime.OutOfMemory"
    for n, answer in enumerate(answers, start=1):
        assert answer.status_code == 200 and "x-function-error" not in answer.headers
        # The same instance, counting on: the neighbour was neither killed nor restarted.
        assert answer.json() == {"echo": {"n": n}, "calls": n + 1, "instance": warm["instance"]}
    last = other_tenant.invoke("steady", {"n": "last"}).json()
    assert last["instance"] == warm["instance"]


# -- 6. fork and thread bombs -----------------------------------------------------------------

BOMB = (
    PRELUDE
    + """
import threading


def fork_bomb():
    while True:
        try:
            if os.fork() == 0:
                while True:  # every child forks on and never returns to the runtime
                    try:
                        os.fork()
                    except OSError:
                        time.sleep(0.1)
        except OSError as exc:
            return f"fork refused: errno {exc.errno}"


def thread_bomb():
    forever = threading.Event()
    started = 0
    while True:
        try:
            threading.Thread(target=forever.wait, daemon=True).start()
        except RuntimeError as exc:
            return f"thread refused after {started}: {exc}"
        started += 1


def handler(event, context):
    instance = os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rpartition("/")[2]
    if event.get("bomb") == "fork":
        print(fork_bomb(), flush=True)
    elif event.get("bomb") == "threads":
        print(thread_bomb(), flush=True)
    else:
        return instance
    time.sleep(3600)  # hold on to everything until the platform ends it
"""
)


BOMB_TIMEOUT_S = 15

# What each bomb prints when the pids limit stops it.
BOMB_REFUSALS = {"fork": f"fork refused: errno {errno.EAGAIN}", "threads": "thread refused"}


def cgroup_tasks(server: Server, instance_id: str) -> int:
    path = instance_group(server, "pids", instance_id) / "pids.current"
    try:
        return int(path.read_text())
    except FileNotFoundError:
        return 0


def host_processes_of(server: Server, instance_id: str) -> list[int]:
    """Host processes running as the sandbox uid inside the instance's control groups."""
    group = instance_group(server, "pids", instance_id).relative_to(cgroups.CGROUP_ROOT / "pids")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != SANDBOX_UID:
                continue
            # The instance's own group, or (Docker) its container's group inside it.
            lines = (entry / "cgroup").read_text().splitlines()
            if any(line.endswith(f"/{group}") or f"/{group}/" in line for line in lines):
                found.append(int(entry.name))
        except OSError:
            continue  # the process ended while being read
    return found


@pytest.mark.parametrize("bomb", ["fork", "threads"])
def test_bomb_is_capped_and_leaves_no_process_behind(
    server: Server, tenant: Tenant, other_tenant: Tenant, bomb: str
) -> None:
    # Memory is generous so that the pids limit, not the memory limit, is what stops the bomb;
    # the time limit leaves a loaded machine room to reach the pids limit first.
    tenant.deploy("bomb", BOMB, memory_mb=1024, timeout_s=BOMB_TIMEOUT_S)
    instance_id = tenant.invoke("bomb").json()
    assert host_processes_of(server, instance_id)

    peak_tasks = 0
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool, tenant.server.client(tenant.key) as client:
        invocation = pool.submit(client.post, "/v1/functions/bomb/invocations", json={"bomb": bomb})
        while not invocation.done():
            peak_tasks = max(peak_tasks, cgroup_tasks(server, instance_id))
            time.sleep(0.05)
        response = invocation.result()
    elapsed = time.monotonic() - started

    assert function_error(response) == "Sandbox.Timedout"
    assert elapsed < BOMB_TIMEOUT_S + 20  # generous: a shared machine, but not "never"
    logs = tenant.invocation(response.headers["x-request-id"])["logs"]
    assert BOMB_REFUSALS[bomb] in logs
    # The bomb really ran in the instance being watched, and the limit held it.
    assert 500 < peak_tasks <= PIDS_MAX, peak_tasks

    deadline = time.monotonic() + 15
    while host_processes_of(server, instance_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert host_processes_of(server, instance_id) == []
    assert_platform_serves(other_tenant)


# -- 7. filling /tmp --------------------------------------------------------------------------

TMP_FILLER = """
import os


def handler(event, context):
    chunk = b"x" * (1024 * 1024)
    written_mb = 0
    try:
        with open("/tmp/fill", "wb") as f:
            while True:
                f.write(chunk)
                f.flush()
                written_mb += 1
    except OSError as exc:
        return {"errno": exc.errno, "written_mb": written_mb}
    finally:
        if event.get("clean"):
            os.remove("/tmp/fill")
"""


def test_filling_tmp_hits_its_size_cap(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("fill", TMP_FILLER, memory_mb=1024, timeout_s=30)

    seen = tenant.invoke("fill", {"clean": True}).json()

    assert seen["errno"] == errno.ENOSPC
    assert TMP_CAP_MB // 2 < seen["written_mb"] <= TMP_CAP_MB
    assert_platform_serves(other_tenant)


def test_filling_tmp_counts_against_memory(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("fill", TMP_FILLER, memory_mb=128, timeout_s=30)

    response = tenant.invoke("fill")

    assert function_error(response) == "Runtime.OutOfMemory"
    assert_platform_serves(other_tenant)


# -- 8. endless output ------------------------------------------------------------------------

PRINTER = """
def handler(event, context):
    while True:
        print("x" * 99)
"""


def test_endless_printing_times_out_with_capped_logs(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("printer", PRINTER, timeout_s=2)

    response = tenant.invoke("printer")

    assert function_error(response) == "Sandbox.Timedout"
    logs = tenant.invocation(response.headers["x-request-id"])["logs"]
    assert len(logs.encode()) < 300 * 1024
    assert "log output truncated" in logs
    assert_platform_serves(other_tenant)


# -- 9. privileges, namespaces, identity ------------------------------------------------------

PRIVILEGES = (
    PRELUDE
    + """

def capabilities():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: fields[k].strip() for k in ("CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")}


def handler(event, context):
    return {
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()],
        "setuid": attempt(lambda: os.setuid(0)),
        "setgid": attempt(lambda: os.setgid(0)),
        "setresuid": attempt(lambda: os.setresuid(0, 0, 0)),
        "capabilities": capabilities(),
    }
"""
)


def test_function_is_not_root_and_cannot_become_root(
    server: Server, tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("privileges", PRIVILEGES)

    seen = tenant.invoke("privileges").json()

    assert seen["ids"] == [inner_uid(server)] * 4
    for call in ("setuid", "setgid", "setresuid"):
        assert_failed(seen[call], errno.EPERM, errno.EINVAL)
    no_capabilities = "0000000000000000"
    capabilities = seen["capabilities"]
    assert capabilities["CapPrm"] == capabilities["CapEff"] == no_capabilities
    assert capabilities["CapBnd"] == capabilities["CapAmb"] == no_capabilities
    assert capabilities["NoNewPrivs"] == "1"
    assert_platform_serves(other_tenant)


NAMESPACES = (
    PRELUDE
    + """
import ctypes
import subprocess

LIBC = ctypes.CDLL(None, use_errno=True)
FLAGS = {"user": 0x10000000, "user+mount": 0x10000000 | 0x00020000, "net": 0x40000000}


def unshare_in_child(flags):
    # Tried in a child so that a success could not change the runtime's own namespaces.
    pid = os.fork()
    if pid == 0:
        result = LIBC.unshare(flags)
        os._exit(0 if result == 0 else ctypes.get_errno())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def handler(event, context):
    tool = subprocess.run(
        ["unshare", "--user", "--map-root-user", "id", "-u"], capture_output=True, text=True
    )
    return {
        "unshare": {name: unshare_in_child(flags) for name, flags in FLAGS.items()},
        "tool": [tool.returncode, tool.stdout.strip()],
    }
"""
)


def test_function_cannot_create_namespaces(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("namespaces", NAMESPACES)

    seen = tenant.invoke("namespaces").json()

    # 0 would mean the call succeeded; otherwise the child exits with the errno it got.
    assert seen["unshare"]["user"] in (errno.ENOSPC, errno.EPERM, errno.EUSERS)
    assert seen["unshare"]["user+mount"] in (errno.ENOSPC, errno.EPERM, errno.EUSERS)
    assert seen["unshare"]["net"] == errno.EPERM
    returncode, uid = seen["tool"]
    assert returncode != 0 and uid != "0"
    assert_platform_serves(other_tenant)


IDENTITY = """
import socket


def handler(event, context):
    return {"hostname": socket.gethostname()}
"""


def test_hostname_is_not_the_hosts(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("identity", IDENTITY)

    seen = tenant.invoke("identity").json()

    assert seen["hostname"] != socket.gethostname()
    assert_platform_serves(other_tenant)


RUNTIME_WRITER = (
    PRELUDE
    + """

def write(path):
    with open(path, "w") as f:
        f.write("planted")


def handler(event, context):
    return {
        "new_file": attempt(lambda: write("/var/runtime/planted.py")),
        "bootstrap": attempt(lambda: open("/var/runtime/python/bootstrap.py", "r+b").close()),
        "relay": attempt(lambda: os.remove("/var/runtime/relay.py")),
        "api_dir": attempt(lambda: write("/var/runtime/api/planted")),
        "socket": attempt(lambda: os.remove("/var/runtime/api/runtime.sock")),
        "mount": mount_options("/var/runtime"),
    }
"""
)


def test_runtime_directory_is_read_only(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("runtime", RUNTIME_WRITER)

    seen = tenant.invoke("runtime").json()

    assert "ro" in seen["mount"]
    for action in ("new_file", "relay"):
        assert_failed(seen[action], errno.EROFS)
    assert_failed(seen["bootstrap"], errno.EROFS, errno.EACCES)
    # The socket directory is the worker's (writable by it alone), so the runtime cannot
    # replace its own socket with one of its choosing.
    for action in ("api_dir", "socket"):
        assert_failed(seen[action], errno.EROFS, errno.EACCES)
    assert tenant.invoke("runtime").status_code == 200  # the socket is still there
    assert_platform_serves(other_tenant)


SOCKET_FINDER = (
    PRELUDE
    + """
import stat


def connect(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(path)
        return "connected"


def sockets_under(top):
    found = []
    for root, dirs, files in os.walk(top):
        if root == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "usr")]
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                found.append(path)
    return sorted(found)


def handler(event, context):
    return {
        "instance": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rpartition("/")[2],
        "mounts": mounts(),
        "sockets": sockets_under("/"),
        "own": attempt(lambda: connect("/var/runtime/api/runtime.sock")),
        "others": {path: attempt(lambda path=path: connect(path)) for path in event["paths"]},
    }
"""
)

INSTANCE_REPORTER = """
import os


def handler(event, context):
    return os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rpartition("/")[2]
"""


def test_only_its_own_runtime_api_socket_is_reachable(
    server: Server, tenant: Tenant, other_tenant: Tenant
) -> None:
    other_tenant.deploy("neighbour", INSTANCE_REPORTER)
    neighbour = other_tenant.invoke("neighbour").json()
    instances = resolve_sandbox_dir(server.data_dir, None) / "instances"
    neighbour_socket = instances / neighbour / "runtime.sock"
    assert neighbour_socket.is_socket()
    tenant.deploy("finder", SOCKET_FINDER)

    seen = tenant.invoke("finder", {"paths": [str(neighbour_socket), str(instances)]}).json()

    assert seen["sockets"] == ["/var/runtime/api/runtime.sock"]
    # The socket directory mounted is this instance's own, and no other is mounted anywhere.
    api_sources = [source for point, source, _ in seen["mounts"] if point == "/var/runtime/api"]
    assert [Path(source).name for source in api_sources] == [seen["instance"]]
    assert neighbour not in json.dumps(seen["mounts"])
    assert seen["own"] == {"value": "connected"}
    for path in (str(neighbour_socket), str(instances)):
        assert_failed(seen["others"][path], errno.ENOENT)
    assert other_tenant.invoke("neighbour").json() == neighbour
    assert_platform_serves(other_tenant)


def test_function_environment_is_not_on_any_host_command_line(tenant: Tenant) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    tenant.deploy("quiet", "def handler(e, c):\n    return 'ok'\n", environment={"TOKEN": secret})
    assert tenant.invoke("quiet").json() == "ok"  # the instance is now alive and idle

    exposed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if secret.encode() in f.read():
                    exposed.append(pid)
        except OSError:
            continue

    assert exposed == []
