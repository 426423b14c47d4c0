"""Container image archives (`docker save` output) uploaded as functions' packages.

An archive comes from a tenant and is hostile until it has been read. It must be a tar that
holds exactly one image: a ``manifest.json`` listing one image whose config and layers are
members of the archive, a config for linux/amd64 whose entry point or command says what to run.
Members must stay inside the archive: no absolute names, no ``..``, no devices, and links only to
other members. The image's id is the SHA-256 of its config, as the engine computes it.

Names. ``docker load`` gives an image the names (repository:tag) its archive carries, taking
each from whatever image held it: an archive calling itself ``lambent/runtime-python3.11`` would
replace the platform's runtime on every worker that loads it. So the archive is stored rewritten
without names (``manifest.json``'s RepoTags emptied, the legacy ``repositories`` file and the
OCI index's reference annotations dropped), and workers run the image by its id.

``read_archive`` does blocking file I/O: call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.errors import InvalidParameterValue

MAX_MEMBERS = 100_000
# manifest.json, index.json and an image config are a few kilobytes; these bounds only stop a
# tenant from making the platform parse a huge document.
MAX_METADATA_BYTES = 8 * 1024 * 1024
MAX_LINK_HOPS = 40
_CHUNK_BYTES = 1024 * 1024


class InvalidImageArchive(InvalidParameterValue):
    """The upload is not a `docker save` archive of one image Lambent can run."""

    type = "InvalidImageArchiveException"


@dataclass(frozen=True)
class ImageArchive:
    """An archive as stored: rewritten without names, hashed, and what it holds."""

    path: Path
    sha256: str
    size: int
    image_id: str  # "sha256:<hex>", the engine's id of the image

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def read_archive(source: Path, tmp_dir: Path) -> ImageArchive:
    """Check the archive at ``source`` and write its nameless copy to a file in ``tmp_dir``."""
    try:
        with tarfile.open(source, "r:*") as tar:
            members = _members(tar)
            manifest = _manifest(tar, members)
            config_member = _resolve(members, manifest.get("Config"))
            layers = [_resolve(members, layer) for layer in manifest["Layers"]]
            config_bytes = _read(tar, config_member)
            _check_config(config_bytes, len(layers))
            image_id = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
            index = members.get("index.json")
            index_bytes = _read(tar, index) if index is not None else None
            return _write_nameless(tar, members, manifest, index_bytes, image_id, tmp_dir)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InvalidImageArchive(
            f"The upload is not a tar file, or a damaged one: {exc}"
        ) from None


def _members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise InvalidImageArchive(f"The image archive has over {MAX_MEMBERS} entries.")
        name = _clean_name(member.name)
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise InvalidImageArchive(f"The image archive entry {name!r} is not a file.")
        if member.issym() or member.islnk():
            target = member.linkname
            if member.issym():
                target = posixpath.join(posixpath.dirname(name), target)
            _clean_name(target)
        members[name] = member
    return members


def _clean_name(name: str) -> str:
    normal = posixpath.normpath(name)
    if name.startswith("/") or normal == ".." or normal.startswith("../"):
        raise InvalidImageArchive(f"The image archive entry {name!r} points outside the archive.")
    return normal.removeprefix("./")


def _resolve(members: dict[str, tarfile.TarInfo], name: Any) -> tarfile.TarInfo:
    """The regular file a manifest entry names, through links."""
    if not isinstance(name, str):
        raise InvalidImageArchive("The image archive's manifest.json names a file wrongly.")
    current = _clean_name(name)
    for _ in range(MAX_LINK_HOPS):
        member = members.get(current)
        if member is None:
            raise InvalidImageArchive(
                f"The image archive lacks {name!r}, which its manifest names."
            )
        if member.isfile():
            return member
        if member.issym():
            current = _clean_name(posixpath.join(posixpath.dirname(current), member.linkname))
        elif member.islnk():
            current = _clean_name(member.linkname)
        else:
            raise InvalidImageArchive(f"The image archive entry {name!r} is not a file.")
    raise InvalidImageArchive(f"The image archive entry {name!r} is a loop of links.")


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_METADATA_BYTES:
        raise InvalidImageArchive(f"The image archive's {member.name} is too large.")
    source = tar.extractfile(member)
    if source is None:
        raise InvalidImageArchive(f"The image archive's {member.name} cannot be read.")
    with source:
        return source.read()


def _manifest(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> dict[str, Any]:
    member = members.get("manifest.json")
    if member is None or not member.isfile():
        raise InvalidImageArchive(
            "The upload has no manifest.json: it is not `docker save` output."
        )
    try:
        manifest = json.loads(_read(tar, member))
    except ValueError:
        raise InvalidImageArchive("The image archive's manifest.json is not JSON.") from None
    if not isinstance(manifest, list) or len(manifest) != 1:
        count = len(manifest) if isinstance(manifest, list) else "no list of"
        raise InvalidImageArchive(
            f"The image archive holds {count} images; a function is made from exactly one."
        )
    entry = manifest[0]
    if not isinstance(entry, dict) or not isinstance(entry.get("Layers"), list):
        raise InvalidImageArchive("The image archive's manifest.json lacks Config or Layers.")
    return entry


def _check_config(raw: bytes, layer_count: int) -> None:
    try:
        config = json.loads(raw)
    except ValueError:
        raise InvalidImageArchive("The image's config is not JSON.") from None
    if not isinstance(config, dict):
        raise InvalidImageArchive("The image's config is not a JSON object.")
    platform = (config.get("os", "linux"), config.get("architecture", "amd64"))
    if platform != ("linux", "amd64"):
        raise InvalidImageArchive(
            f"The image is for {'/'.join(map(str, platform))}; the workers run linux/amd64."
        )
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != layer_count:
        raise InvalidImageArchive("The image's config does not match its layers.")
    run = config.get("config") or {}
    if not run.get("Entrypoint") and not run.get("Cmd"):
        raise InvalidImageArchive(
            "The image has neither ENTRYPOINT nor CMD: nothing would start its runtime."
        )


def _write_nameless(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    manifest: dict[str, Any],
    index_bytes: bytes | None,
    image_id: str,
    tmp_dir: Path,
) -> ImageArchive:
    replaced = {"manifest.json": json.dumps([{**manifest, "RepoTags": None}]).encode()}
    if index_bytes is not None:
        replaced["index.json"] = _nameless_index(index_bytes)

    with tempfile.NamedTemporaryFile(
        dir=tmp_dir, prefix="image-", suffix=".tar", delete=False
    ) as out:
        path = Path(out.name)
        try:
            hashing = _HashingWriter(out)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.PAX_FORMAT) as copy:
                for name, member in members.items():
                    if name == "repositories":
                        continue
                    if name in replaced:
                        info = tarfile.TarInfo(member.name)
                        info.size, info.mode, info.mtime = len(replaced[name]), 0o644, member.mtime
                        copy.addfile(info, _BytesReader(replaced[name]))
                    elif member.isfile():
                        with tar.extractfile(member) as data:  # type: ignore[union-attr]
                            copy.addfile(member, data)
                    else:
                        copy.addfile(member)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return ImageArchive(path, hashing.digest.hexdigest(), hashing.size, image_id)


def _nameless_index(raw: bytes) -> bytes:
    try:
        index = json.loads(raw)
    except ValueError:
        raise InvalidImageArchive("The image archive's index.json is not JSON.") from None
    entries = index.get("manifests") if isinstance(index, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            entry.pop("annotations", None)
    return json.dumps(index).encode()


class _HashingWriter:
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.out.write(data)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk = self.data[self.offset : end]
        self.offset += len(chunk)
        return chunk
