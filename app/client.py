"""A small HTTP client for Lambent's API, used by the CLI."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(f"{type_}: {message}")
        self.status = status
        self.type = type_
        self.message = message


def zip_directory(path: Path) -> bytes:
    """Zip a directory's contents (not the directory itself), keeping execute bits."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            zf.write(file, file.relative_to(path).as_posix())
    return buf.getvalue()


def read_package(zip_path: Path | None, directory: Path | None) -> bytes:
    if (zip_path is None) == (directory is None):
        raise ValueError("give exactly one of --zip and --dir")
    if zip_path is not None:
        return zip_path.read_bytes()
    assert directory is not None
    return zip_directory(directory)


class LambentClient:
    def __init__(self, url: str | None = None, key: str | None = None) -> None:
        self.url = url or os.environ.get("LAMBENT_URL", DEFAULT_URL)
        key = key or os.environ.get("LAMBENT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=960)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
                raise ApiError(response.status_code, body["type"], body["message"])
            except (ValueError, KeyError):
                raise ApiError(response.status_code, "HTTPError", response.text) from None
        return response

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._check(self.http.request(method, path, **kwargs))

    def create_function(self, fields: dict[str, str], package: bytes) -> dict[str, Any]:
        files = {"code": ("package.zip", package, "application/zip")}
        return self.request("POST", "/v1/functions", data=fields, files=files).json()

    def update_code(self, name: str, package: bytes) -> dict[str, Any]:
        return self.request(
            "PUT",
            f"/v1/functions/{name}/code",
            content=package,
            headers={"content-type": "application/zip"},
        ).json()

    def invoke(self, name: str, payload: bytes) -> httpx.Response:
        return self.request(
            "POST",
            f"/v1/functions/{name}/invocations",
            content=payload,
            headers={"content-type": "application/json"},
        )
