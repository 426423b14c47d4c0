"""The images of the Docker sandbox, and how a worker checks that it has them.

Every runtime runs in an image of its own, ``lambent/runtime-<runtime>``, built on
``lambent/base:bookworm``: a minimal Debian root made with debootstrap and imported into the
engine. ``lambent/init:<digest>`` holds lambent-init, the static helper that starts every
container (see ``lambent-init.c``); its tag is a digest of the source, so a worker never runs an
init built from other source than its own. No registry is involved anywhere: ``lambent images
build`` (``workers/images/build.py``) makes them all from Debian packages, on air-gapped sites
too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker

HERE = Path(__file__).resolve().parent
DOCKERFILES = HERE / "dockerfiles"
INIT_SOURCE = HERE / "lambent-init.c"
# Where lambent-init sits in its image.
INIT_PATH_IN_IMAGE = "/lambent-init"

BASE_IMAGE = "lambent/base:bookworm"
BUILD_HINT = "build them with `lambent images build` (as root, on the Docker host)"


def runtime_image(runtime: str) -> str:
    return f"lambent/runtime-{runtime}:latest"


@cache
def init_image() -> str:
    digest = hashlib.sha256(INIT_SOURCE.read_bytes()).hexdigest()[:12]
    return f"lambent/init:{digest}"


def required_images(runtimes: Iterable[str]) -> list[str]:
    """The images a Docker worker serving these runtimes needs."""
    return [init_image(), *(runtime_image(runtime) for runtime in runtimes)]


def missing_images(client: docker.DockerClient, images: Iterable[str]) -> list[str]:
    import docker.errors

    missing = []
    for image in images:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    return missing
