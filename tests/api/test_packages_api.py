"""Function packages through the HTTP API: refused uploads leave nothing behind; blobs are shared.

Every refused package must leave no function, no blob in the object store and no spooled upload.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Server, Tenant, make_zip

HANDLER = "def handler(event, context):\n    return 'ok'\n"
MB = 1024 * 1024


def files_below(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()} if path.exists() else set()


def blob_path(server: Server, sha256: str) -> Path:
    return server.data_dir / "packages" / sha256[:2] / sha256


def unique_package() -> bytes:
    # Packages are stored by content: a unique one is shared with no other test's function.
    return make_zip({"app.py": HANDLER + f"# {uuid.uuid4()}\n"})


def json_upload(tenant: Tenant, name: str, package: bytes, **config: Any) -> httpx.Response:
    body = {
        "name": name,
        "runtime": "python3.11",
        "handler": "app.handler",
        "code": {"zip_base64": base64.b64encode(package).decode()},
        **config,
    }
    return tenant.http.post("/v1/functions", json=body)


def multipart_upload(tenant: Tenant, name: str, package: bytes, **config: Any) -> httpx.Response:
    fields = {"name": name, "runtime": "python3.11", "handler": "app.handler", **config}
    return tenant.http.post(
        "/v1/functions", data=fields, files={"code": ("code.zip", package, "application/zip")}
    )


UPLOADS: dict[str, Callable[..., httpx.Response]] = {
    "json": json_upload,
    "multipart": multipart_upload,
}


# Package builders. The large ones are built once per session: they take a second or so.


def not_a_zip() -> bytes:
    return b"this is a text file, not a zip archive\n" * 10


def empty_zip() -> bytes:
    return make_zip({})


def parent_entry() -> bytes:
    return make_zip({"app.py": HANDLER, "../escape.py": "print('out')\n"})


def absolute_entry() -> bytes:
    return make_zip({"app.py": HANDLER, "/etc/cron.d/lambent": "* * * * * root true\n"})


def symlink_out() -> bytes:
    return make_zip(
        {"app.py": HANDLER, "passwd": "../../../../etc/passwd"}, modes={"passwd": 0o120777}
    )


@functools.cache
def zip_bomb() -> bytes:
    # 100 MB of zeros deflates to about 100 KB: a ratio near 1000:1.
    buffer = io.BytesIO()
    zeros = bytes(MB)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("app.py", HANDLER)
        with zf.open("zeros.bin", "w") as entry:
            for _ in range(100):
                entry.write(zeros)
    return buffer.getvalue()


@functools.cache
def unzips_past_250_mb() -> bytes:
    # Each 64 KB block is 1 KB of noise and zeros: it deflates about 60:1, under the zip bomb
    # ratio, so only the unzipped size is over a limit. The noise repeats further back than
    # deflate's 32 KB window, so it is not compressed away.
    block = os.urandom(1024) + bytes(63 * 1024)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("app.py", HANDLER)
        with zf.open("big.bin", "w", force_zip64=True) as entry:
            for _ in range(260 * MB // len(block)):
                entry.write(block)
    return buffer.getvalue()


@functools.cache
def zipped_past_50_mb() -> bytes:
    # Random bytes, stored: the archive is as large as its content.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("app.py", HANDLER)
        zf.writestr("noise.bin", os.urandom(51 * MB))
    return buffer.getvalue()


def handler_file_missing() -> bytes:
    return make_zip({"main.py": HANDLER})


@dataclass(frozen=True)
class Refusal:
    build: Callable[[], bytes]
    status: int
    type: str
    message: str
    config: tuple[tuple[str, str], ...] = ()


REFUSALS: dict[str, Refusal] = {
    "not a zip": Refusal(not_a_zip, 400, "InvalidZipFileException", "not a valid zip file"),
    "empty zip": Refusal(empty_zip, 400, "InvalidZipFileException", "contains no files"),
    "parent entry": Refusal(parent_entry, 400, "InvalidZipFileException", "'..' component"),
    "absolute entry": Refusal(absolute_entry, 400, "InvalidZipFileException", "absolute path"),
    "symlink out": Refusal(symlink_out, 400, "InvalidZipFileException", "outside the package"),
    "zip bomb": Refusal(zip_bomb, 400, "InvalidZipFileException", "zip bomb"),
    "unzips past 250 MB": Refusal(
        unzips_past_250_mb, 413, "PackageTooLargeException", "unzips to more than 262144000"
    ),
    "handler file missing": Refusal(
        handler_file_missing, 400, "InvalidParameterValueException", "app.py"
    ),
    "provided without bootstrap": Refusal(
        handler_file_missing,
        400,
        "InvalidParameterValueException",
        "no bootstrap",
        config=(("runtime", "provided"), ("handler", "anything")),
    ),
}


@pytest.fixture
def leftovers(server: Server) -> Callable[[], tuple[set[Path], set[Path]]]:
    """What a test added below packages/ and uploads/: (new blobs, new spooled uploads)."""
    packages, uploads = server.data_dir / "packages", server.data_dir / "uploads"
    blobs_before, uploads_before = files_below(packages), files_below(uploads)

    def added() -> tuple[set[Path], set[Path]]:
        return files_below(packages) - blobs_before, files_below(uploads) - uploads_before

    return added


def assert_refused_without_trace(
    response: httpx.Response,
    tenant: Tenant,
    name: str,
    leftovers: Callable[[], tuple[set[Path], set[Path]]],
    *,
    status: int,
    type_: str,
    message: str,
) -> None:
    assert response.status_code == status, response.text
    assert response.json()["type"] == type_
    assert message in response.json()["message"]
    assert tenant.http.get(f"/v1/functions/{name}").status_code == 404
    assert leftovers() == (set(), set())


@pytest.mark.parametrize("upload", sorted(UPLOADS))
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_package_leaves_nothing_behind(
    tenant: Tenant, leftovers: Callable[[], tuple[set[Path], set[Path]]], case: str, upload: str
) -> None:
    refusal = REFUSALS[case]

    response = UPLOADS[upload](tenant, "refused", refusal.build(), **dict(refusal.config))

    assert_refused_without_trace(
        response,
        tenant,
        "refused",
        leftovers,
        status=refusal.status,
        type_=refusal.type,
        message=refusal.message,
    )


@pytest.mark.parametrize("upload", sorted(UPLOADS))
def test_package_over_50_mb_zipped_is_too_large(
    tenant: Tenant, leftovers: Callable[[], tuple[set[Path], set[Path]]], upload: str
) -> None:
    response = UPLOADS[upload](tenant, "huge", zipped_past_50_mb())

    assert_refused_without_trace(
        response,
        tenant,
        "huge",
        leftovers,
        status=413,
        type_="PackageTooLargeException",
        message="52428800",
    )


def test_invalid_base64_is_an_invalid_parameter(
    tenant: Tenant, leftovers: Callable[[], tuple[set[Path], set[Path]]]
) -> None:
    body = {
        "name": "garbled",
        "runtime": "python3.11",
        "handler": "app.handler",
        "code": {"zip_base64": "UEsDBBQ!!not base64$$"},
    }

    response = tenant.http.post("/v1/functions", json=body)

    assert_refused_without_trace(
        response,
        tenant,
        "garbled",
        leftovers,
        status=400,
        type_="InvalidParameterValueException",
        message="base64",
    )


@pytest.mark.parametrize("case", ["not a zip", "zip bomb", "handler file missing"])
def test_refused_code_update_keeps_the_previous_package(
    tenant: Tenant, leftovers: Callable[[], tuple[set[Path], set[Path]]], case: str
) -> None:
    created = json_upload(tenant, "kept", unique_package()).json()
    refusal = REFUSALS[case]

    response = tenant.http.put(
        "/v1/functions/kept/code",
        content=refusal.build(),
        headers={"content-type": "application/zip"},
    )

    assert response.status_code == refusal.status
    assert response.json()["type"] == refusal.type
    assert tenant.http.get("/v1/functions/kept").json() == created
    blobs, uploads = leftovers()
    assert blobs == {blob_path(tenant.server, created["code_sha256"])}
    assert uploads == set()
    assert tenant.invoke("kept").json() == "ok"


def test_code_update_over_50_mb_is_too_large_and_keeps_the_previous_package(
    tenant: Tenant, leftovers: Callable[[], tuple[set[Path], set[Path]]]
) -> None:
    created = json_upload(tenant, "kept", unique_package()).json()

    response = tenant.http.put(
        "/v1/functions/kept/code",
        files={"code": ("code.zip", zipped_past_50_mb(), "application/zip")},
    )

    assert response.status_code == 413
    assert response.json()["type"] == "PackageTooLargeException"
    assert tenant.http.get("/v1/functions/kept").json() == created
    assert leftovers() == ({blob_path(tenant.server, created["code_sha256"])}, set())


def test_identical_packages_are_stored_once(
    tenant: Tenant, leftovers: Callable[[], tuple[set[Path], set[Path]]]
) -> None:
    package = unique_package()

    first = json_upload(tenant, "first", package).json()
    second = multipart_upload(tenant, "second", package).json()

    sha256 = hashlib.sha256(package).hexdigest()
    assert first["code_sha256"] == second["code_sha256"] == sha256
    assert leftovers() == ({blob_path(tenant.server, sha256)}, set())
    assert blob_path(tenant.server, sha256).read_bytes() == package


def test_deleting_one_of_two_functions_keeps_their_shared_package(tenant: Tenant) -> None:
    package = unique_package()
    json_upload(tenant, "first", package)
    json_upload(tenant, "second", package)
    blob = blob_path(tenant.server, hashlib.sha256(package).hexdigest())

    tenant.http.delete("/v1/functions/first")

    assert blob.is_file()
    assert tenant.invoke("second").json() == "ok"


def test_deleting_the_last_function_of_a_package_removes_it(tenant: Tenant) -> None:
    package = unique_package()
    json_upload(tenant, "first", package)
    json_upload(tenant, "second", package)
    blob = blob_path(tenant.server, hashlib.sha256(package).hexdigest())

    tenant.http.delete("/v1/functions/first")
    tenant.http.delete("/v1/functions/second")

    assert not blob.exists()


def test_replacing_code_removes_the_previous_package_when_unused(tenant: Tenant) -> None:
    old, new = unique_package(), unique_package()
    json_upload(tenant, "replaced", old)

    response = tenant.http.put(
        "/v1/functions/replaced/code", content=new, headers={"content-type": "application/zip"}
    )

    assert response.status_code == 200, response.text
    assert not blob_path(tenant.server, hashlib.sha256(old).hexdigest()).exists()
    assert blob_path(tenant.server, hashlib.sha256(new).hexdigest()).is_file()
