"""`lambent images build`: the Docker sandbox's images, from Debian packages and no registry.

1. ``lambent/base:bookworm``: ``debootstrap --variant=minbase`` of Debian bookworm with python3
   and curl into a temporary directory, imported with ``docker import`` (about a minute and a
   half, once; 250 MB).
2. ``lambent/init:<digest>``: lambent-init compiled statically with the host's gcc, alone in an
   image of its own.
3. ``lambent/runtime-<runtime>``: ``docker build`` on the base, one per runtime, with no network
   (the Dockerfiles are in ``dockerfiles/``). The Node.js image gets the host's Node.js binary.

What exists already is skipped, so running it again is cheap; ``force`` rebuilds. Rebuilding the
base rebuilds the runtime images on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import docker
import docker.errors

from workers.images import (
    BASE_IMAGE,
    DOCKERFILES,
    INIT_SOURCE,
    init_image,
    missing_images,
    runtime_image,
)

DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# What the base holds beyond minbase: the interpreter of the python3.11 runtime and of the relay
# of `provided`, and curl for bootstraps written in shell.
BASE_PACKAGES = ("python3", "curl")
# Where temporary roots are made: debootstrap needs a filesystem without nodev/noexec, which
# /tmp sometimes is not.
WORK_DIR = Path("/var/tmp")

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    pass


def build_images(
    client: docker.DockerClient,
    runtimes: Iterable[str],
    *,
    force: bool = False,
    mirror: str = DEFAULT_MIRROR,
    sandbox_uid: int = 61000,
    sandbox_gid: int = 61000,
    node_binary: Path = Path("/usr/bin/node"),
    progress: Progress = print,
) -> list[str]:
    """Build what is missing (everything, with ``force``); the names of the images built."""
    runtimes = list(runtimes)
    built: list[str] = []

    if force or missing_images(client, [BASE_IMAGE]):
        _build_base(client, mirror, progress)
        built.append(BASE_IMAGE)
    if force or missing_images(client, [init_image()]):
        _build_init(client, progress)
        built.append(init_image())
    for runtime in runtimes:
        image = runtime_image(runtime)
        if force or BASE_IMAGE in built or missing_images(client, [image]):
            _build_runtime(client, runtime, sandbox_uid, sandbox_gid, node_binary, progress)
            built.append(image)
        else:
            progress(f"{image} exists; skipped (--force rebuilds it)")
    return built


def _build_base(client: docker.DockerClient, mirror: str, progress: Progress) -> None:
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageBuildError("debootstrap is missing: apt-get install -y debootstrap")
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap must run as root")

    progress(f"debootstrap {SUITE} from {mirror} (about a minute)")
    root = Path(tempfile.mkdtemp(prefix="lambent-rootfs-", dir=WORK_DIR))
    try:
        _run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            "debootstrap",
        )
        # Downloaded packages and indexes are of no use in a sandbox; leaving them out keeps
        # the image small.
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()

        progress(f"docker import {BASE_IMAGE}")
        repository, _, tag = BASE_IMAGE.rpartition(":")
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-c", "."],
            stdout=subprocess.PIPE,
        )
        assert tar.stdout is not None
        try:
            client.api.import_image_from_stream(
                tar.stdout, repository=repository, tag=tag, changes=["ENV LANG=C.UTF-8"]
            )
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise ImageBuildError(f"tar of the debootstrap root failed ({tar.returncode})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _build_init(client: docker.DockerClient, progress: Progress) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageBuildError(
            "gcc is missing; lambent-init is compiled statically: apt-get install -y gcc libc6-dev"
        )
    image = init_image()
    progress(f"compiling lambent-init into {image}")
    with tempfile.TemporaryDirectory(prefix="lambent-init-") as context:
        _run(
            [
                gcc,
                "-static",
                "-O2",
                "-s",
                "-Wall",
                "-o",
                f"{context}/lambent-init",
                str(INIT_SOURCE),
            ],
            "gcc",
        )
        shutil.copy(DOCKERFILES / "init.Dockerfile", f"{context}/Dockerfile")
        _docker_build(client, context, image, {})


def _build_runtime(
    client: docker.DockerClient,
    runtime: str,
    sandbox_uid: int,
    sandbox_gid: int,
    node_binary: Path,
    progress: Progress,
) -> None:
    dockerfile = DOCKERFILES / f"{runtime}.Dockerfile"
    if not dockerfile.is_file():
        raise ImageBuildError(f"no Dockerfile for runtime {runtime!r} in {DOCKERFILES}")
    image = runtime_image(runtime)
    progress(f"docker build {image}")
    with tempfile.TemporaryDirectory(prefix="lambent-build-") as context:
        shutil.copy(dockerfile, f"{context}/Dockerfile")
        if runtime.startswith("nodejs"):
            _copy_node(node_binary, runtime, Path(context) / "node")
        buildargs = {"SANDBOX_UID": str(sandbox_uid), "SANDBOX_GID": str(sandbox_gid)}
        _docker_build(client, context, image, buildargs)


def _copy_node(node_binary: Path, runtime: str, dest: Path) -> None:
    wanted = runtime.removeprefix("nodejs").split(".")[0]
    try:
        version = subprocess.run(
            [str(node_binary), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageBuildError(f"{node_binary} cannot run ({exc}); {runtime} needs it") from exc
    if version.lstrip("v").split(".")[0] != wanted:
        raise ImageBuildError(f"{node_binary} is Node.js {version}; {runtime} needs {wanted}")
    shutil.copy(node_binary, dest)


def _docker_build(
    client: docker.DockerClient, context: str, image: str, buildargs: dict[str, str]
) -> None:
    try:
        client.images.build(
            path=context,
            tag=image,
            buildargs=buildargs,
            # Everything the builds need is in the base or the context.
            network_mode="none",
            pull=False,
            rm=True,
            forcerm=True,
        )
    except docker.errors.BuildError as exc:
        output = "".join(str(line.get("stream", line.get("error", ""))) for line in exc.build_log)
        raise ImageBuildError(f"docker build of {image} failed: {exc}\n{output[-2000:]}") from exc


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-2000:]
        raise ImageBuildError(f"{what} failed ({result.returncode}):\n{output}")
