"""Checking a function's zip package, and unpacking it where a sandbox can read it.

A package comes from a tenant and is hostile until it has been read to the end: names may try
to leave the root, symlinks may point at the host, declared sizes may lie and a few kilobytes
may inflate to gigabytes. Both entry points therefore decompress every entry and count the
bytes that really come out, in chunks, and judge the archive on those.

``inspect_zip`` runs when a package is uploaded; ``extract_zip`` repeats every check while it
writes, because the blob it unpacks may come from an older release or another store. Both do
blocking file I/O and CPU work: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import enum
import errno
import fnmatch
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.errors import InvalidParameterValue
from app.packages.errors import HandlerNotInPackage, InvalidZipFile, PackageTooLarge

_CHUNK_BYTES = 64 * 1024

# Ratios are only judged past this many bytes: a small file of zeros or whitespace compresses
# extremely well and is no threat.
_RATIO_FLOOR_BYTES = 1024 * 1024

# Linux limits a path component to 255 bytes. A whole name is held to far less than the 4096
# bytes of PATH_MAX so that it still fits once joined to the directory it is unpacked into.
_NAME_MAX_BYTES = 255
_PATH_MAX_BYTES = 1024
_SYMLINK_TARGET_MAX_BYTES = 1024

# The kernel gives up resolving after 40 symlinks; so do we, and call it a loop.
_MAX_SYMLINK_HOPS = 40

# zipfile bounds the output of a deflate read by the size asked for, but decompresses bzip2 and
# LZMA input in whole blocks of unbounded output, so only these two methods are accepted. Every
# common zip tool writes deflate.
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)

_ENCRYPTED_FLAG = 0x1
_DRIVE = re.compile(r"[A-Za-z]:")

# What zipfile and zlib raise on a damaged archive. OSError is here because a corrupt offset
# can send a seek before the start of the file; it is only caught around reads of the archive,
# never around writes of the output.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    ValueError,
    struct.error,
    OSError,
)


@dataclass(frozen=True)
class PackageLimits:
    max_zipped_bytes: int = 50 * 1024 * 1024  # Lambda's limit for a direct upload
    max_unzipped_bytes: int = 250 * 1024 * 1024  # Lambda's unzipped limit (262,144,000)
    max_entries: int = 20_000
    max_compression_ratio: int = 200  # per entry, and for the whole archive


@dataclass(frozen=True)
class PackageInfo:
    unzipped_bytes: int
    entries: int


def handler_candidates(runtime: str, handler: str) -> list[str]:
    """Return the paths, relative to the package root, one of which must hold the handler.

    A path's last component may contain ``*`` (as in ``fnmatch``) for the platform tag of a
    compiled Python extension.
    """
    if runtime.startswith("python3."):
        return _python_candidates(handler)
    if runtime.startswith("nodejs"):
        return _node_candidates(handler)
    if runtime == "provided" or runtime.startswith("provided."):
        # The handler of a custom runtime is free text that only its bootstrap reads.
        return ["bootstrap"]
    raise InvalidParameterValue(f"Runtime {runtime!r} is not supported.", runtime=runtime)


def _python_candidates(handler: str) -> list[str]:
    # The Python runtime splits at the last dot, turns slashes into dots and imports the rest.
    module, dot, function = handler.rpartition(".")
    parts = module.replace("/", ".").split(".")
    if not dot or not function or not all(parts):
        raise HandlerNotInPackage(
            f"Handler {handler!r} is malformed: it must look like module.function.",
            handler=handler,
        )

    base = "/".join(parts)
    return [f"{base}.py", f"{base}/__init__.py", f"{base}.pyc", f"{base}.so", f"{base}.*.so"]


def _node_candidates(handler: str) -> list[str]:
    # The Node.js runtime splits the last path component at its first dot: `src/app.handler`
    # loads src/app with the usual extensions and calls its `handler` export.
    folder, _, base = handler.rpartition("/")
    module, dot, function = base.partition(".")
    dirs = [part for part in folder.split("/") if part not in ("", ".")]
    if not dot or not module or not function or ".." in dirs:
        raise HandlerNotInPackage(
            f"Handler {handler!r} is malformed: it must look like file.function.",
            handler=handler,
        )

    base_path = "/".join([*dirs, module])
    return [f"{base_path}.js", f"{base_path}.mjs", f"{base_path}.cjs"]


def inspect_zip(
    path: Path, *, runtime: str, handler: str, limits: PackageLimits = PackageLimits()
) -> PackageInfo:
    """Read the whole package and raise if Lambent would refuse to run it."""
    candidates = handler_candidates(runtime, handler)

    with _open_zip(path, limits) as (zf, archive_bytes):
        tree = _plan(zf, limits)
        unzipped_bytes = _unpack(zf, tree, archive_bytes, limits, root=None)

    if any(_holds_file(tree, candidate) for candidate in candidates):
        return PackageInfo(unzipped_bytes=unzipped_bytes, entries=tree.entry_count)

    if candidates == ["bootstrap"]:
        message = f"The package has no bootstrap file at its root, which {runtime} needs."
    else:
        message = (
            f"Handler {handler!r} needs {_or_list(candidates)} in the package, and none of "
            "them is there."
        )
    raise HandlerNotInPackage(message, handler=handler, runtime=runtime)


def extract_zip(path: Path, dest: Path, *, limits: PackageLimits = PackageLimits()) -> None:
    """Unpack the package into ``dest``, which appears complete or not at all.

    Everything is written to a private sibling directory first and renamed into place. If
    another process got ``dest`` there first, its copy is kept and ours is discarded.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))

    try:
        with _open_zip(path, limits) as (zf, archive_bytes):
            tree = _plan(zf, limits)
            _unpack(zf, tree, archive_bytes, limits, root=tmp)
        # mkdtemp made it 0o700; the sandbox runs as another uid and must be able to enter it.
        os.chmod(tmp, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    try:
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise


class _Kind(enum.Enum):
    FILE = "file"
    DIR = "directory"
    SYMLINK = "symlink"


@dataclass
class _Entry:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    kind: _Kind
    executable: bool

    @property
    def name(self) -> str:
        return self.info.orig_filename


@dataclass
class _Tree:
    """What the archive will create, known before any entry is decompressed."""

    entries: list[_Entry]
    entry_count: int
    # Every path the archive creates, including directories only implied by deeper names.
    kinds: dict[tuple[str, ...], _Kind]
    # Symlink targets, filled in as the symlink entries are read.
    links: dict[tuple[str, ...], str]


@contextmanager
def _open_zip(path: Path, limits: PackageLimits) -> Iterator[tuple[zipfile.ZipFile, int]]:
    archive_bytes = path.stat().st_size
    if archive_bytes > limits.max_zipped_bytes:
        raise PackageTooLarge(
            f"The zip file is {archive_bytes} bytes, over the limit of "
            f"{limits.max_zipped_bytes} bytes.",
            limit_bytes=limits.max_zipped_bytes,
        )

    with path.open("rb") as fp:
        # zipfile builds an object per entry before we can count them, and a 50 MB archive of
        # empty entries would cost it hundreds of megabytes; count the records ourselves first.
        try:
            too_many = _has_more_entries_than(fp, archive_bytes, limits.max_entries)
        except _ZIP_ERRORS:
            too_many = False  # left for zipfile to diagnose
        if too_many:
            raise _too_many_entries(limits)

        try:
            zf = zipfile.ZipFile(fp)
        except _ZIP_ERRORS as exc:
            raise InvalidZipFile(f"The package is not a valid zip file ({exc}).") from exc
        with zf:
            yield zf, archive_bytes


_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")


def _has_more_entries_than(fp: BinaryIO, archive_bytes: int, max_entries: int) -> bool:
    """Walk the central directory's records without decoding them, stopping past the limit.

    Only a guard for memory: it answers False whenever the layout is not what it expects, and
    the count zipfile arrives at is checked again afterwards.
    """
    tail_bytes = min(archive_bytes, _EOCD.size + 0xFFFF)  # the record plus its longest comment
    fp.seek(archive_bytes - tail_bytes)
    tail = fp.read(tail_bytes)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        return False
    eocd_offset = archive_bytes - tail_bytes + at
    directory_end = eocd_offset
    directory_bytes = _EOCD.unpack_from(tail, at)[5]

    if eocd_offset >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
        fp.seek(eocd_offset - _ZIP64_LOCATOR.size)
        if fp.read(4) == b"PK\x06\x07":
            directory_end = eocd_offset - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
            fp.seek(directory_end)
            record = fp.read(_ZIP64_EOCD.size)
            if len(record) < _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
                return False
            directory_bytes = _ZIP64_EOCD.unpack(record)[8]

    fp.seek(max(directory_end - directory_bytes, 0))
    for _ in range(max_entries + 1):
        header = fp.read(_CENTRAL_HEADER.size)
        if len(header) < _CENTRAL_HEADER.size or header[:4] != b"PK\x01\x02":
            return False
        name_len, extra_len, comment_len = _CENTRAL_HEADER.unpack(header)[12:15]
        fp.seek(name_len + extra_len + comment_len, os.SEEK_CUR)
    return True


def _too_many_entries(limits: PackageLimits) -> PackageTooLarge:
    return PackageTooLarge(
        f"The zip file has more than {limits.max_entries} entries, the limit.",
        limit_entries=limits.max_entries,
    )


def _plan(zf: zipfile.ZipFile, limits: PackageLimits) -> _Tree:
    """Check everything the central directory tells without decompressing anything."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise _too_many_entries(limits)

    entries: list[_Entry] = []
    kinds: dict[tuple[str, ...], _Kind] = {}
    for info in infos:
        entry = _entry(info)
        if entry is None:
            continue
        if entry.parts in kinds:
            raise InvalidZipFile(
                f"Entry {entry.name!r} appears more than once in the zip file.",
                entry=entry.name,
            )
        kinds[entry.parts] = entry.kind
        entries.append(entry)

    # Only now that every explicit entry is known can a file or symlink be told from a parent
    # directory: a name below either would make the extraction write through it.
    for entry in entries:
        for depth in range(1, len(entry.parts)):
            parent = entry.parts[:depth]
            kind = kinds.setdefault(parent, _Kind.DIR)
            if kind is not _Kind.DIR:
                raise InvalidZipFile(
                    f"Entry {entry.name!r} lies below {'/'.join(parent)!r}, which is a "
                    f"{kind.value}.",
                    entry=entry.name,
                )

    if not any(entry.kind is _Kind.FILE for entry in entries):
        raise InvalidZipFile("The zip file contains no files.")
    return _Tree(entries=entries, entry_count=len(infos), kinds=kinds, links={})


def _entry(info: zipfile.ZipInfo) -> _Entry | None:
    """Classify one entry, or return None for a name that only denotes the root itself."""
    name = info.orig_filename
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise InvalidZipFile(
            f"Entry {name!r} is encrypted; packages must be plain zip files.", entry=name
        )
    if info.compress_type not in _METHODS:
        raise InvalidZipFile(
            f"Entry {name!r} uses compression method {info.compress_type}; only stored and "
            "deflated entries are supported.",
            entry=name,
        )

    mode = info.external_attr >> 16
    file_type = stat.S_IFMT(mode)
    # Zips made on Windows may use backslashes, and the runtimes expect real directories.
    normalized = name.replace("\\", "/")
    is_dir_name = normalized.endswith("/")
    if file_type == stat.S_IFLNK:
        if is_dir_name:
            raise InvalidZipFile(f"Symlink {name!r} has a directory's name.", entry=name)
        kind = _Kind.SYMLINK
    elif file_type == stat.S_IFDIR or (file_type in (0, stat.S_IFREG) and is_dir_name):
        kind = _Kind.DIR
    elif file_type in (0, stat.S_IFREG):
        kind = _Kind.FILE
    else:
        raise InvalidZipFile(
            f"Entry {name!r} is a device, fifo or socket; a package holds only files, "
            "directories and symlinks.",
            entry=name,
        )

    parts = _safe_parts(name, normalized)
    if not parts:
        if kind is _Kind.DIR:
            return None
        raise InvalidZipFile(f"Entry {name!r} has no name.", entry=name)
    return _Entry(info=info, parts=parts, kind=kind, executable=bool(mode & 0o111))


def _safe_parts(name: str, normalized: str) -> tuple[str, ...]:
    # zipfile cuts a name at a NUL byte but keeps the original, which is what extraction
    # tools elsewhere might honour.
    if "\0" in name:
        raise InvalidZipFile(f"Entry {name!r} contains a NUL byte.", entry=name)
    if len(os.fsencode(normalized)) > _PATH_MAX_BYTES:
        raise InvalidZipFile(
            f"Entry {name[:64]!r}... has a name longer than {_PATH_MAX_BYTES} bytes.", entry=name
        )

    parts = tuple(part for part in normalized.split("/") if part not in ("", "."))
    if normalized.startswith("/") or (parts and _DRIVE.fullmatch(parts[0])):
        raise InvalidZipFile(f"Entry {name!r} has an absolute path.", entry=name)
    if ".." in parts:
        raise InvalidZipFile(
            f"Entry {name!r} has a '..' component, which could leave the package root.",
            entry=name,
        )
    if any(len(os.fsencode(part)) > _NAME_MAX_BYTES for part in parts):
        raise InvalidZipFile(
            f"Entry {name!r} has a path component longer than {_NAME_MAX_BYTES} bytes.",
            entry=name,
        )
    return parts


class _Meter:
    """Counts decompressed bytes and stops at the size and compression-ratio limits."""

    def __init__(self, archive_bytes: int, limits: PackageLimits) -> None:
        self.archive_bytes = archive_bytes
        self.limits = limits
        self.total_bytes = 0

    def count(self, entry: _Entry, entry_bytes: int, chunk_bytes: int) -> None:
        limits = self.limits
        self.total_bytes += chunk_bytes
        if self.total_bytes > limits.max_unzipped_bytes:
            raise PackageTooLarge(
                f"The package unzips to more than {limits.max_unzipped_bytes} bytes, the limit.",
                limit_bytes=limits.max_unzipped_bytes,
            )

        # Judged while reading, so that a bomb is stopped long before it has inflated. The
        # entry's compressed size is as declared, but zipfile never reads past it; the
        # archive's size is the real one.
        ratio = limits.max_compression_ratio
        compressed_bytes = max(entry.info.compress_size, 1)
        if entry_bytes >= _RATIO_FLOOR_BYTES and entry_bytes > ratio * compressed_bytes:
            raise InvalidZipFile(
                f"Entry {entry.name!r} has a compression ratio over {ratio}:1, which looks like "
                "a zip bomb.",
                entry=entry.name,
            )
        if self.total_bytes >= _RATIO_FLOOR_BYTES and self.total_bytes > ratio * self.archive_bytes:
            raise InvalidZipFile(
                f"The zip file has a compression ratio over {ratio}:1, which looks like a zip bomb."
            )


def _chunks(zf: zipfile.ZipFile, entry: _Entry, meter: _Meter) -> Iterator[bytes]:
    """Yield an entry's decompressed bytes, counted, with zip damage turned into our error."""
    entry_bytes = 0
    try:
        stream = zf.open(entry.info)
    except _ZIP_ERRORS as exc:
        raise _corrupt(entry, exc) from exc

    with stream:
        while True:
            try:
                chunk = stream.read(_CHUNK_BYTES)
            except _ZIP_ERRORS as exc:
                raise _corrupt(entry, exc) from exc
            if not chunk:
                break
            entry_bytes += len(chunk)
            meter.count(entry, entry_bytes, len(chunk))
            yield chunk

    # zipfile stops at the declared size but accepts a stream that ends early.
    if entry_bytes != entry.info.file_size:
        raise InvalidZipFile(
            f"Entry {entry.name!r} declares {entry.info.file_size} bytes but holds {entry_bytes}.",
            entry=entry.name,
        )


def _corrupt(entry: _Entry, exc: BaseException) -> InvalidZipFile:
    return InvalidZipFile(f"Entry {entry.name!r} is corrupt ({exc}).", entry=entry.name)


def _unpack(
    zf: zipfile.ZipFile,
    tree: _Tree,
    archive_bytes: int,
    limits: PackageLimits,
    *,
    root: Path | None,
) -> int:
    """Decompress every entry, writing below ``root`` unless it is None; return the bytes.

    Symlinks are created last, after every check has passed. Until then the output holds only
    directories and files, so no write can pass through a link; files are also opened with
    O_NOFOLLOW and O_EXCL in case that ever stops being true.
    """
    meter = _Meter(archive_bytes, limits)
    made_dirs: set[tuple[str, ...]] = set()

    for entry in tree.entries:
        if entry.kind is _Kind.SYMLINK:
            tree.links[entry.parts] = _read_link_target(zf, entry, meter)
        elif entry.kind is _Kind.DIR:
            if root is not None:
                _make_dirs(root, entry.parts, made_dirs)
        elif root is None:
            for _ in _chunks(zf, entry, meter):
                pass
        else:
            _make_dirs(root, entry.parts[:-1], made_dirs)
            _write_file(root, entry, _chunks(zf, entry, meter))

    for parts, target in tree.links.items():
        _check_link(tree, parts, target)
    if root is not None:
        for parts, target in tree.links.items():
            _make_dirs(root, parts[:-1], made_dirs)
            os.symlink(target, root.joinpath(*parts))
    return meter.total_bytes


def _read_link_target(zf: zipfile.ZipFile, entry: _Entry, meter: _Meter) -> str:
    data = b""
    for chunk in _chunks(zf, entry, meter):
        data += chunk
        if len(data) > _SYMLINK_TARGET_MAX_BYTES:
            raise InvalidZipFile(
                f"Symlink {entry.name!r} has a target longer than "
                f"{_SYMLINK_TARGET_MAX_BYTES} bytes.",
                entry=entry.name,
            )
    if not data or b"\0" in data:
        raise InvalidZipFile(
            f"Symlink {entry.name!r} has an empty or malformed target.", entry=entry.name
        )
    return os.fsdecode(data)


def _check_link(tree: _Tree, parts: tuple[str, ...], target: str) -> None:
    name = "/".join(parts)
    try:
        _resolve(tree, parts[:-1], target, hops=0)
    except _Escapes as exc:
        raise InvalidZipFile(
            f"Symlink {name!r} points to {target!r}, outside the package.", entry=name
        ) from exc
    except _Loops as exc:
        raise InvalidZipFile(f"Symlink {name!r} is part of a symlink loop.", entry=name) from exc


class _Escapes(Exception):
    pass


class _Loops(Exception):
    pass


def _resolve(
    tree: _Tree, base: tuple[str, ...], target: str, *, hops: int
) -> tuple[tuple[str, ...], int]:
    """Resolve ``target`` from directory ``base`` as the kernel would inside the unpacked tree.

    Symlinks met on the way are followed, so `..` after one climbs from where it points,
    not from where it sits: a purely textual check would pass `sub/up/..` when `sub/up`
    points at the root. Names the archive does not create cannot be links, and are taken
    as they are.
    """
    if target.startswith("/"):
        raise _Escapes
    path = list(base)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not path:
                raise _Escapes
            path.pop()
            continue

        path.append(part)
        link_target = tree.links.get(tuple(path))
        if link_target is not None:
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise _Loops
            resolved, hops = _resolve(tree, tuple(path[:-1]), link_target, hops=hops)
            path = list(resolved)
    return tuple(path), hops


def _make_dirs(root: Path, parts: tuple[str, ...], made: set[tuple[str, ...]]) -> None:
    for depth in range(1, len(parts) + 1):
        prefix = parts[:depth]
        if prefix in made:
            continue
        path = root.joinpath(*prefix)
        try:
            os.mkdir(path)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise
        os.chmod(path, 0o755)  # whatever the umask or the zip says: the sandbox must enter it
        made.add(prefix)


def _write_file(root: Path, entry: _Entry, chunks: Iterator[bytes]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root.joinpath(*entry.parts), flags, 0o600)
    with open(fd, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
        # Readable by the sandbox's uid whatever the zip recorded. Lambda runs `bootstrap` as
        # the runtime, and zips made on Windows carry no execute bits at all.
        executable = entry.executable or entry.parts == ("bootstrap",)
        os.fchmod(fd, 0o755 if executable else 0o644)


def _holds_file(tree: _Tree, candidate: str) -> bool:
    *folder, last = candidate.split("/")
    if "*" not in last:
        return _resolves_to_file(tree, candidate)
    return any(
        len(parts) == len(folder) + 1
        and list(parts[:-1]) == folder
        and fnmatch.fnmatchcase(parts[-1], last)
        and _resolves_to_file(tree, "/".join(parts))
        for parts in tree.kinds
    )


def _resolves_to_file(tree: _Tree, candidate: str) -> bool:
    try:
        resolved, _ = _resolve(tree, (), candidate, hops=0)
    except (_Escapes, _Loops):
        return False
    return tree.kinds.get(resolved) is _Kind.FILE


def _or_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
