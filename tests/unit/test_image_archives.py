"""Reading `docker save` archives: what is refused, and the nameless copy that is stored."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from app.packages.images import InvalidImageArchive, read_archive

CONFIG = json.dumps(
    {
        "os": "linux",
        "architecture": "amd64",
        "config": {"Entrypoint": ["/runtime"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
    }
).encode()


def archive(tmp_path: Path, members: list[tuple[str, Any]]) -> Path:
    """A tar of (name, bytes) files, (name, ("symlink"|"hardlink", target)) links."""
    path = tmp_path / "upload.tar"
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                kind, target = content
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = target
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def manifest(layers: list[str], names: list[str] | None = None) -> bytes:
    return json.dumps([{"Config": "config.json", "RepoTags": names, "Layers": layers}]).encode()


def members_of(path: Path) -> dict[str, bytes | None]:
    with tarfile.open(path) as tar:
        return {
            m.name: tar.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            for m in tar
        }


def test_the_stored_copy_carries_no_names(tmp_path: Path) -> None:
    index = {
        "manifests": [
            {"digest": "sha256:" + "2" * 64, "annotations": {"io.containerd.image.name": "x:1"}}
        ]
    }
    source = archive(
        tmp_path,
        [
            ("layer/layer.tar", b"layer bytes"),
            ("config.json", CONFIG),
            ("repositories", b'{"lambent/runtime-python3.11": {"latest": "layer"}}'),
            ("index.json", json.dumps(index).encode()),
            ("manifest.json", manifest(["layer/layer.tar"], ["lambent/runtime-python3.11:latest"])),
        ],
    )

    read = read_archive(source, tmp_path)

    copy = members_of(read.path)
    assert "repositories" not in copy
    assert json.loads(copy["manifest.json"] or b"")[0]["RepoTags"] is None
    assert "annotations" not in json.loads(copy["index.json"] or b"")["manifests"][0]
    assert copy["layer/layer.tar"] == b"layer bytes"
    assert read.image_id == "sha256:" + hashlib.sha256(CONFIG).hexdigest()
    assert read.sha256 == hashlib.sha256(read.path.read_bytes()).hexdigest()
    assert read.size == read.path.stat().st_size


def test_a_layer_reached_through_a_link_inside_the_archive_is_accepted(tmp_path: Path) -> None:
    source = archive(
        tmp_path,
        [
            ("a/layer.tar", b"layer"),
            ("b/layer.tar", ("symlink", "../a/layer.tar")),
            ("config.json", CONFIG),
            ("manifest.json", manifest(["b/layer.tar"])),
        ],
    )

    assert read_archive(source, tmp_path).image_id.startswith("sha256:")


WITH_CONFIG = ("config.json", CONFIG)
BAD = {
    "manifest-not-json": ([("manifest.json", b"not json")], "not JSON"),
    "no-image": ([("manifest.json", b"[]")], "holds 0 images"),
    "missing-layer": ([("manifest.json", manifest(["gone.tar"])), WITH_CONFIG], "lacks"),
    "hardlink-out": (
        [("manifest.json", manifest(["x"])), WITH_CONFIG, ("x", ("hardlink", "/etc/passwd"))],
        "outside",
    ),
    "layer-count": ([("manifest.json", manifest([])), WITH_CONFIG], "match its layers"),
    "absolute": ([("/abs", b"x"), ("manifest.json", manifest([]))], "outside"),
}


@pytest.mark.parametrize(("members", "message"), list(BAD.values()), ids=list(BAD))
def test_a_bad_archive_is_refused_with_a_reason(
    tmp_path: Path, members: list[tuple[str, Any]], message: str
) -> None:
    with pytest.raises(InvalidImageArchive) as refused:
        read_archive(archive(tmp_path, members), tmp_path)

    assert message in refused.value.message
    assert [p.name for p in tmp_path.iterdir()] == ["upload.tar"]  # no copy left behind
