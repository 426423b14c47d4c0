"""Functions made from container images: uploaded `docker save` archives, and images named by
reference. The images under test are built FROM scratch around a runtime client in C
(tests/images/echo_runtime.c), so nothing of Lambent's is inside them."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    TEST_IMAGES,
    Server,
    Tenant,
    container_of,
    create_tenant,
    docker_client,
    require_docker,
    start_server,
)
from workers.images import runtime_image

RUNTIME_SOURCE = Path(__file__).resolve().parent.parent / "images" / "echo_runtime.c"
SANDBOX_UID = 61000


@dataclass(frozen=True)
class EchoImage:
    image_id: str
    archive: bytes  # `docker save` output, names included
    tag: str | None = None  # set while the image is on the engine under a name


ImageFactory = Callable[..., EchoImage]


@pytest.fixture(scope="module")
def echo_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageFactory]:
    """Builds echo images: each with a CMD of its own, hence a distinct image id.

    ``keep_tag`` leaves the image on the engine under its name (for references); otherwise it
    is removed once saved, so that a worker has to load its archive.
    """
    require_docker()
    client = docker_client()
    context = tmp_path_factory.mktemp("echo-image")
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(context / "runtime"), str(RUNTIME_SOURCE)], check=True
    )
    built: set[str] = set()

    def build(cmd: str = "echo.handler", *, keep_tag: str | None = None) -> EchoImage:
        (context / "Dockerfile").write_text(
            "FROM scratch\nCOPY runtime /runtime\nWORKDIR /srv\n"
            f'ENTRYPOINT ["/runtime"]\nCMD {json.dumps([cmd])}\n'
        )
        tag = keep_tag or f"lambent-test/echo-{uuid.uuid4().hex[:8]}:1"
        image, _ = client.images.build(path=str(context), tag=tag, network_mode="none", rm=True)
        built.add(image.id)
        if keep_tag is not None:
            built.add(keep_tag)
        archive = b"".join(client.api.get_image(tag))
        if keep_tag is None:
            client.images.remove(tag, force=True)
        return EchoImage(image.id, archive, keep_tag)

    yield build
    # Removed at the end of the session: the warm instances of the tests' functions still run
    # them, and the engine removes no image a container uses.
    TEST_IMAGES.update(built)


def create_image_function(
    tenant: Tenant,
    name: str,
    *,
    archive: bytes | None = None,
    reference: str | None = None,
    expect: int = 201,
    **config: Any,
) -> dict[str, Any]:
    image = (
        {"reference": reference}
        if reference is not None
        else {"archive_base64": base64.b64encode(archive or b"").decode()}
    )
    body = {"name": name, "package_type": "Image", "image": image, **config}
    response = tenant.http.post("/v1/functions", json=body)
    assert response.status_code == expect, response.text
    return response.json()


def with_names(archive: bytes, names: list[str]) -> bytes:
    """The archive with its image claiming ``names``, in manifest.json and `repositories`."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive)) as source,
        tarfile.open(fileobj=out, mode="w") as copy,
    ):
        for member in source:
            data = source.extractfile(member) if member.isfile() else None
            if member.name == "manifest.json":
                manifest = json.load(data)  # type: ignore[arg-type]
                manifest[0]["RepoTags"] = names
                content = json.dumps(manifest).encode()
                member.size = len(content)
                data = io.BytesIO(content)
            copy.addfile(member, data)
        layer_id = next(m.name.split("/")[0] for m in source if m.name.endswith("layer.tar"))
        repositories = {name.split(":")[0]: {name.split(":")[1]: layer_id} for name in names}
        content = json.dumps(repositories).encode()
        info = tarfile.TarInfo("repositories")
        info.size = len(content)
        copy.addfile(info, io.BytesIO(content))
    return out.getvalue()


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return out.getvalue()


def config_archive(config: dict[str, Any]) -> bytes:
    raw = json.dumps(config).encode()
    manifest = [{"Config": "config.json", "RepoTags": None, "Layers": []}]
    return tar_of({"config.json": raw, "manifest.json": json.dumps(manifest).encode()})


# Serving.


@pytest.mark.docker_only
def test_function_from_an_image_archive_serves_invocations(
    tenant: Tenant, echo_images: ImageFactory
) -> None:
    image = echo_images()

    created = create_image_function(tenant, "echo", archive=image.archive, memory_mb=256)
    first = tenant.invoke("echo", {"n": 1})
    second = tenant.invoke("echo", {"n": 2})

    assert created["package_type"] == "Image" and created["runtime"] is None
    assert created["image_uri"] == image.image_id and len(created["code_sha256"]) == 64
    assert first.status_code == 200, first.text
    assert first.json() == {
        "runtime": "image",
        "handler": "echo.handler",  # the image's CMD, as Lambda sets it
        "uid": SANDBOX_UID,
        "cwd": "/srv",
        "function": "echo",
        "event": {"n": 1},
    }
    assert second.json()["event"] == {"n": 2}
    cold = tenant.invocation(first.headers["x-request-id"])
    warm = tenant.invocation(second.headers["x-request-id"])
    assert cold["cold_start"] is True and cold["start_kind"] == "fresh"
    assert warm["cold_start"] is False
    assert "echo runtime starting: handler=echo.handler argv1=echo.handler" in cold["logs"]
    assert f"handling {first.headers['x-request-id']}" in cold["logs"]
    # Loaded from the archive, under no name at all.
    assert docker_client().images.get(image.image_id).tags == []


@pytest.mark.docker_only
def test_image_container_is_locked_down_like_any_sandbox(
    server: Server, tenant: Tenant, echo_images: ImageFactory
) -> None:
    image = echo_images("locked.handler")
    create_image_function(tenant, "locked", archive=image.archive, memory_mb=512)
    tenant.invoke("locked")
    instance = tenant.http.get("/v1/functions/locked/instances").json()["instances"][0]["id"]

    container = container_of(instance)

    host = container["HostConfig"]
    assert container["Config"]["User"] == f"{SANDBOX_UID}:{SANDBOX_UID}"
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == host["MemorySwap"] == 512 * 1024 * 1024
    # Only Lambent's socket directory and lambent-init are mounted; the image keeps its own
    # /var/task and /var/runtime.
    targets = sorted(bind.split(":")[1] for bind in host["Binds"])
    assert targets == ["/var/lambent/api", "/var/lambent/init"]
    assert all(bind.endswith(":ro") for bind in host["Binds"])
    assert container["Config"]["Labels"]["lambent.worker"] == server.worker_id


@pytest.mark.docker_only
def test_functions_of_two_tenants_share_one_loaded_image(
    tenant: Tenant, other_tenant: Tenant, echo_images: ImageFactory
) -> None:
    image = echo_images("shared.handler")

    create_image_function(tenant, "mine", archive=image.archive)
    create_image_function(other_tenant, "theirs", archive=image.archive)

    assert tenant.invoke("mine").json()["function"] == "mine"
    assert other_tenant.invoke("theirs").json()["function"] == "theirs"


@pytest.mark.docker_only
def test_an_archive_cannot_take_the_platforms_image_names(
    tenant: Tenant, echo_images: ImageFactory
) -> None:
    python_runtime = docker_client().images.get(runtime_image("python3.11")).id
    impostor = echo_images("impostor.handler")
    archive = with_names(impostor.archive, [runtime_image("python3.11")])

    create_image_function(tenant, "impostor", archive=archive)
    assert tenant.invoke("impostor").json()["handler"] == "impostor.handler"

    assert docker_client().images.get(runtime_image("python3.11")).id == python_runtime
    assert docker_client().images.get(impostor.image_id).tags == []
    tenant.deploy("genuine", "def handler(event, context):\n    return 'python'\n")
    assert tenant.invoke("genuine").json() == "python"


@pytest.mark.docker_only
def test_function_from_an_image_reference(tenant: Tenant, echo_images: ImageFactory) -> None:
    reference = f"lambent-functions/echo-{uuid.uuid4().hex[:8]}:v1"
    echo_images("referenced.handler", keep_tag=reference)

    created = create_image_function(tenant, "named", reference=reference)
    response = tenant.invoke("named", {"by": "reference"})

    assert created["image_uri"] == reference and created["code_sha256"] == ""
    assert response.json()["handler"] == "referenced.handler"
    assert response.json()["event"] == {"by": "reference"}


@pytest.mark.docker_only
def test_a_handler_given_at_creation_overrides_the_images_command(
    tenant: Tenant, echo_images: ImageFactory
) -> None:
    image = echo_images("default.handler")

    create_image_function(tenant, "chosen", archive=image.archive, handler="chosen.handler")

    assert tenant.invoke("chosen").json()["handler"] == "chosen.handler"


@pytest.mark.docker_only
def test_an_image_runtimes_init_error_is_reported(
    tenant: Tenant, echo_images: ImageFactory
) -> None:
    image = echo_images("failing.handler")
    create_image_function(tenant, "fails", archive=image.archive, environment={"FAIL_INIT": "1"})

    response = tenant.invoke("fails")

    assert response.headers["x-function-error"] == "Unhandled"
    assert response.json()["errorType"] == "Runtime.EchoInitError"


@pytest.mark.docker_only
def test_new_image_takes_effect_on_the_next_invocation(
    tenant: Tenant, echo_images: ImageFactory
) -> None:
    create_image_function(tenant, "changing", archive=echo_images("one.handler").archive)
    assert tenant.invoke("changing").json()["handler"] == "one.handler"
    two = echo_images("two.handler")

    response = tenant.http.put(
        "/v1/functions/changing/code",
        content=two.archive,
        headers={"content-type": "application/x-tar"},
    )

    assert response.status_code == 200, response.text
    assert response.json()["image_uri"] == two.image_id
    assert tenant.invoke("changing").json()["handler"] == "two.handler"


@pytest.mark.docker_only
def test_an_archive_uploads_as_a_multipart_file(tenant: Tenant, echo_images: ImageFactory) -> None:
    image = echo_images("multipart.handler")

    response = tenant.http.post(
        "/v1/functions",
        data={"name": "parts", "package_type": "Image", "memory_mb": "256"},
        files={"image": ("image.tar", image.archive, "application/x-tar")},
    )

    assert response.status_code == 201, response.text
    assert response.json()["image_uri"] == image.image_id
    assert tenant.invoke("parts").json()["handler"] == "multipart.handler"


# Refusals.


def blobs(server: Server) -> set[str]:
    return {path.name for path in (server.data_dir / "packages").rglob("*") if path.is_file()}


def uploads(server: Server) -> list[str]:
    return [path.name for path in (server.data_dir / "uploads").glob("*")]


BAD_ARCHIVES: dict[str, Callable[[bytes], bytes]] = {
    "not-a-tar": lambda _: b"this is not a tar archive at all\n" * 64,
    "no-manifest": lambda _: tar_of({"hello.txt": b"hello"}),
    "two-images": lambda good: tar_of(
        {
            "manifest.json": json.dumps(
                [
                    {"Config": "a.json", "Layers": []},
                    {"Config": "b.json", "Layers": []},
                ]
            ).encode(),
            "a.json": b"{}",
            "b.json": b"{}",
        }
    ),
    "missing-layer": lambda _: tar_of(
        {
            "manifest.json": json.dumps(
                [{"Config": "c.json", "Layers": ["nope/layer.tar"]}]
            ).encode(),
            "c.json": b"{}",
        }
    ),
    "escaping-entry": lambda _: tar_of({"../escape": b"x", "manifest.json": b"[]"}),
    "escaping-link": lambda _: tar_of(
        {"manifest.json": json.dumps([{"Config": "c.json", "Layers": []}]).encode()},
        links={"c.json": "../../etc/passwd"},
    ),
    "no-entrypoint": lambda _: config_archive(
        {"os": "linux", "architecture": "amd64", "config": {}, "rootfs": {"diff_ids": []}}
    ),
    "wrong-architecture": lambda _: config_archive(
        {
            "os": "linux",
            "architecture": "arm64",
            "config": {"Cmd": ["x"]},
            "rootfs": {"diff_ids": []},
        }
    ),
}


@pytest.mark.docker_only
@pytest.mark.parametrize("kind", list(BAD_ARCHIVES))
def test_a_bad_archive_is_refused_and_leaves_nothing_behind(
    server: Server, tenant: Tenant, echo_images: ImageFactory, kind: str
) -> None:
    before = blobs(server)
    archive = BAD_ARCHIVES[kind](b"")

    response = tenant.http.post(
        "/v1/functions",
        json={
            "name": "bad",
            "package_type": "Image",
            "image": {"archive_base64": base64.b64encode(archive).decode()},
        },
    )

    assert response.status_code == 400, response.text
    assert response.json()["type"] == "InvalidImageArchiveException"
    assert tenant.http.get("/v1/functions/bad").status_code == 404
    assert blobs(server) == before
    assert uploads(server) == []


@pytest.mark.docker_only
@pytest.mark.parametrize(
    ("reference", "status"),
    [
        ("lambent/runtime-python3.11:latest", 400),  # not a name functions may use
        ("lambent-functions/not-there:1", 400),
        ("sha256:" + "0" * 64, 422),  # ids and digests are refused outright
    ],
)
def test_a_reference_outside_what_the_operator_allows_is_refused(
    tenant: Tenant, reference: str, status: int
) -> None:
    response = tenant.http.post(
        "/v1/functions",
        json={"name": "ref", "package_type": "Image", "image": {"reference": reference}},
    )

    assert response.status_code == status, response.text
    assert tenant.http.get("/v1/functions/ref").status_code == 404


@pytest.mark.docker_only
def test_image_fields_are_checked(tenant: Tenant) -> None:
    reference = {"reference": "lambent-functions/x:1"}
    cases = [
        {"name": "a", "package_type": "Image", "runtime": "python3.11", "image": reference},
        {"name": "b", "package_type": "Image"},
        {"name": "c", "package_type": "Image", "image": {}},
        {"name": "d", "package_type": "Image", "image": {**reference, "archive_base64": ""}},
        {"name": "e", "runtime": "python3.11", "handler": "app.handler", "image": reference},
    ]

    for body in cases:
        response = tenant.http.post("/v1/functions", json=body)
        assert response.status_code == 422, (body, response.text)


@pytest.fixture(scope="module")
def small_image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_docker()
    server = start_server(
        tmp_path_factory.mktemp("small-images") / "data",
        admin_key="small-image-server-operator-key",
        env={"LAMBENT_MAX_IMAGE_BYTES": "100000", "LAMBENT_PRESTART_POOL_SIZE": "0"},
        sandbox="docker",
    )
    yield server
    server.stop()


def test_an_archive_over_the_size_limit_is_413_and_leaves_nothing_behind(
    small_image_server: Server, echo_images: ImageFactory
) -> None:
    tenant = create_tenant(small_image_server)
    archive = echo_images("big.handler").archive
    assert len(archive) > 100_000

    as_json = tenant.http.post(
        "/v1/functions",
        json={
            "name": "big",
            "package_type": "Image",
            "image": {"archive_base64": base64.b64encode(archive).decode()},
        },
    )
    as_file = tenant.http.post(
        "/v1/functions",
        data={"name": "big", "package_type": "Image"},
        files={"image": ("image.tar", archive, "application/x-tar")},
    )

    for response in (as_json, as_file):
        assert response.status_code == 413, response.text
        assert response.json()["type"] == "PackageTooLargeException"
    assert tenant.http.get("/v1/functions/big").status_code == 404
    assert blobs(small_image_server) == set()
    assert uploads(small_image_server) == []


def test_image_functions_need_a_docker_worker(server: Server, tenant: Tenant) -> None:
    assert server.sandbox == "process"

    response = tenant.http.post(
        "/v1/functions",
        json={
            "name": "nowhere",
            "package_type": "Image",
            "image": {"reference": "lambent-functions/anything:1"},
        },
    )

    assert response.status_code == 400, response.text
    assert "LAMBENT_SANDBOX=docker" in response.json()["message"]
    assert tenant.http.get("/v1/functions/nowhere").status_code == 404
