"""Package validation, safe extraction and upload spooling, against real crafted archives."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
import warnings
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from app.errors import InvalidParameterValue
from app.packages.errors import (
    BlobNotFound,
    HandlerNotInPackage,
    InvalidZipFile,
    PackageTooLarge,
)
from app.packages.spool import spool_bytes, spool_stream
from app.packages.validation import (
    PackageInfo,
    PackageLimits,
    extract_zip,
    handler_candidates,
    inspect_zip,
)

MiB = 1024 * 1024
Entry = tuple[zipfile.ZipInfo, bytes]


# Builders ---------------------------------------------------------------------------------


def file(
    name: str, data: bytes = b"x = 1\n", *, mode: int = 0o644, method: int = zipfile.ZIP_DEFLATED
) -> Entry:
    return _entry(name, data, stat.S_IFREG | mode, method)


def directory(name: str) -> Entry:
    return _entry(name.rstrip("/") + "/", b"", stat.S_IFDIR | 0o755, zipfile.ZIP_STORED)


def symlink(name: str, target: str) -> Entry:
    return _entry(name, target.encode(), stat.S_IFLNK | 0o777, zipfile.ZIP_STORED)


def special(name: str, file_type: int) -> Entry:
    return _entry(name, b"", file_type | 0o644, zipfile.ZIP_STORED)


def _entry(name: str, data: bytes, mode: int, method: int) -> Entry:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.compress_type = method
    return info, data


def build_zip(path: Path, *entries: Entry) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, one of our cases
        with zipfile.ZipFile(path, "w") as zf:
            for info, data in entries:
                zf.writestr(info, data)
    return path


def zeros_zip(path: Path, name: str, size: int) -> Path:
    """One deflated entry of ``size`` zero bytes, written in chunks to keep memory flat."""
    chunk = bytes(MiB)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w") as out:
        for _ in range(size // MiB):
            out.write(chunk)
    return path


def patch(path: Path, offset: int, data: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def first_data_offset(path: Path) -> int:
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack_from("<2H", raw, 26)
    return 30 + name_len + extra_len


def central_header_offset(path: Path) -> int:
    return path.read_bytes().index(b"PK\x01\x02")


def inspect(path: Path, *, runtime: str = "python3.11", handler: str = "app.handler", **kw):
    return inspect_zip(path, runtime=runtime, handler=handler, **kw)


@pytest.fixture(scope="module")
def big_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 300 MB of zeros deflates to about 300 KB: over the unzipped limit and the ratio limit.
    return zeros_zip(tmp_path_factory.mktemp("bomb") / "bomb.zip", "app.py", 300 * MiB)


# Accepted packages ------------------------------------------------------------------------


def test_python_handler_in_a_subfolder_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("src/app.py", b"def handler(e, c): pass\n"))

    assert inspect(path, handler="src/app.handler") == PackageInfo(unzipped_bytes=24, entries=1)


def test_python_handler_with_a_dotted_module_path_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("src/app.py"))

    inspect(path, handler="src.app.handler")


def test_python_package_module_with_init_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", directory("pkg"), file("pkg/__init__.py"))

    inspect(path, handler="pkg.handler")


def test_python_compiled_extension_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("fast.cpython-311-x86_64-linux-gnu.so", b"\x7fELF"))

    inspect(path, handler="fast.handler")


def test_python_handler_reached_through_an_inside_symlink_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("lib/v1/app.py"), symlink("app.py", "lib/v1/app.py"))

    inspect(path, handler="app.handler")


def test_provided_runtime_with_bootstrap_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("bootstrap", b"#!/bin/sh\n", mode=0o755))

    inspect(path, runtime="provided.al2023", handler="anything goes here")


def test_node_handler_with_an_mjs_file_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("src/index.mjs", b"export const handler = 1;\n"))

    inspect(path, runtime="nodejs20.x", handler="src/index.handler")


def test_package_info_counts_decompressed_bytes_and_all_entries(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        directory("lib"),
        file("app.py", b"a" * 1000),
        file("lib/data.txt", b"b" * 500, method=zipfile.ZIP_STORED),
    )

    assert inspect(path) == PackageInfo(unzipped_bytes=1500, entries=3)


def test_small_highly_compressible_file_is_accepted(tmp_path: Path) -> None:
    # Alone, the zeros compress about a thousandfold, but they stay under the 1 MiB floor.
    path = build_zip(
        tmp_path / "p.zip", file("app.py", os.urandom(200_000)), file("blank.txt", bytes(MiB - 1))
    )

    inspect(path)


def test_backslash_separators_are_read_as_directories(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("src\\app.py", b"pass\n"))

    inspect(path, handler="src/app.handler")
    extract_zip(path, tmp_path / "out")
    assert (tmp_path / "out" / "src" / "app.py").read_bytes() == b"pass\n"


# The handler -------------------------------------------------------------------------------


def test_missing_python_handler_file_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("main.py"))

    with pytest.raises(HandlerNotInPackage, match=r"app\.py, app/__init__\.py"):
        inspect(path, handler="app.handler")


def test_python_handler_without_a_dot_is_malformed(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"))

    with pytest.raises(HandlerNotInPackage, match=r"module\.function"):
        inspect(path, handler="handler")


@pytest.mark.parametrize("handler", ["app.", ".handler", "src//app.handler", "a..b.handler"])
def test_python_handler_with_an_empty_component_is_malformed(handler: str) -> None:
    with pytest.raises(HandlerNotInPackage, match=r"module\.function"):
        handler_candidates("python3.12", handler)


def test_provided_runtime_without_bootstrap_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("bin/bootstrap", mode=0o755))

    with pytest.raises(HandlerNotInPackage, match="bootstrap"):
        inspect(path, runtime="provided", handler="x")


def test_missing_node_handler_file_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("index.ts"))

    with pytest.raises(HandlerNotInPackage, match=r"index\.js"):
        inspect(path, runtime="nodejs20.x", handler="index.handler")


def test_handler_naming_a_directory_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", directory("app.py"), file("app.py/x.txt"))

    with pytest.raises(HandlerNotInPackage):
        inspect(path, handler="app.handler")


def test_unknown_runtime_is_an_invalid_parameter(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"))

    with pytest.raises(InvalidParameterValue, match="ruby3.3") as caught:
        inspect(path, runtime="ruby3.3")
    assert not isinstance(caught.value, HandlerNotInPackage)


def test_python_candidates_cover_modules_packages_and_extensions() -> None:
    assert handler_candidates("python3.11", "src/app.main.handler") == [
        "src/app/main.py",
        "src/app/main/__init__.py",
        "src/app/main.pyc",
        "src/app/main.so",
        "src/app/main.*.so",
    ]


def test_node_candidates_split_the_file_name_at_its_first_dot() -> None:
    assert handler_candidates("nodejs18.x", "lib/index.handlers.main") == [
        "lib/index.js",
        "lib/index.mjs",
        "lib/index.cjs",
    ]


def test_provided_candidates_ignore_the_handler() -> None:
    assert handler_candidates("provided.al2", "whatever it says") == ["bootstrap"]


# Damaged archives ---------------------------------------------------------------------------


def test_garbage_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "p.zip"
    path.write_bytes(b"this is certainly not a zip file\n" * 10)

    with pytest.raises(InvalidZipFile, match="not a valid zip file"):
        inspect(path)


def test_empty_file_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "p.zip"
    path.write_bytes(b"")

    with pytest.raises(InvalidZipFile):
        inspect(path)


def test_truncated_zip_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", os.urandom(4096)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(InvalidZipFile):
        inspect(path)


def test_bad_crc_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", b"a" * 100, method=zipfile.ZIP_STORED))
    patch(path, first_data_offset(path) + 10, b"b")

    with pytest.raises(InvalidZipFile, match="CRC"):
        inspect(path)


def test_corrupt_deflate_stream_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", b"def handler(e, c): pass\n" * 20))
    # 0xFF opens a deflate block of the reserved type 3.
    patch(path, first_data_offset(path), b"\xff\xff")

    with pytest.raises(InvalidZipFile, match="corrupt"):
        inspect(path)


def test_entry_holding_fewer_bytes_than_declared_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", b"x" * 100))
    patch(path, central_header_offset(path) + 24, struct.pack("<L", 100_000))

    with pytest.raises(InvalidZipFile, match="declares 100000 bytes but holds 100"):
        inspect(path)


def test_zip_without_entries_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip")

    with pytest.raises(InvalidZipFile, match="no files"):
        inspect(path)


def test_zip_with_only_directories_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", directory("src"), directory("src/lib"))

    with pytest.raises(InvalidZipFile, match="no files"):
        inspect(path)


def test_encrypted_entry_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"))
    patch(path, 6, struct.pack("<H", 0x1))
    patch(path, central_header_offset(path) + 8, struct.pack("<H", 0x1))

    with pytest.raises(InvalidZipFile, match="encrypted"):
        inspect(path)


def test_bzip2_entry_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", method=zipfile.ZIP_BZIP2))

    with pytest.raises(InvalidZipFile, match="compression method 12"):
        inspect(path)


# Names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../evil.py",
        "src/../../evil.py",
        "src/../app.py",
        "/etc/evil.py",
        "C:\\evil.py",
        "c:/evil.py",
        "\\evil.py",
        "..\\evil.py",
        "src\\..\\..\\evil.py",
    ],
)
def test_name_leaving_the_root_is_rejected(tmp_path: Path, name: str) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), file(name))

    with pytest.raises(InvalidZipFile, match="absolute path|'\\.\\.' component"):
        inspect(path)


def test_name_with_a_nul_byte_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), file("okX../../evil.py"))
    path.write_bytes(path.read_bytes().replace(b"okX../", b"ok\0../"))

    with pytest.raises(InvalidZipFile, match="NUL byte"):
        inspect(path)


def test_name_longer_than_a_path_component_allows_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), file("a" * 256 + ".py"))

    with pytest.raises(InvalidZipFile, match="longer than 255 bytes"):
        inspect(path)


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", b"good"), file("app.py", b"evil"))

    with pytest.raises(InvalidZipFile, match="more than once"):
        inspect(path)


def test_names_equal_after_normalising_are_duplicates(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("src/app.py"), file("./src//app.py"))

    with pytest.raises(InvalidZipFile, match="more than once"):
        inspect(path, handler="src.app.handler")


def test_entry_below_a_file_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py/extra.py"), file("app.py"))

    with pytest.raises(InvalidZipFile, match="which is a file"):
        inspect(path)


def test_entry_below_a_symlink_is_rejected(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        file("app.py"),
        directory("lib"),
        symlink("link", "lib"),
        file("link/mod.py"),
    )

    with pytest.raises(InvalidZipFile, match="which is a symlink"):
        inspect(path)


# Symlinks and special files -----------------------------------------------------------------


def test_symlink_to_a_relative_path_outside_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), symlink("lib/passwd", "../../etc/passwd"))

    with pytest.raises(InvalidZipFile, match="outside the package"):
        inspect(path)


def test_symlink_to_an_absolute_path_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), symlink("passwd", "/etc/passwd"))

    with pytest.raises(InvalidZipFile, match="outside the package"):
        inspect(path)


def test_symlink_escaping_through_another_symlink_is_rejected(tmp_path: Path) -> None:
    # Read as text, `sub/up/..` is `sub`; on disk `sub/up` is the root, and `..` leaves it.
    path = build_zip(
        tmp_path / "p.zip",
        file("app.py"),
        directory("sub"),
        symlink("sub/up", ".."),
        symlink("escape", "sub/up/.."),
    )

    with pytest.raises(InvalidZipFile, match="'escape' points to 'sub/up/..', outside"):
        inspect(path)


def test_symlink_loop_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), symlink("a", "b"), symlink("b", "a"))

    with pytest.raises(InvalidZipFile, match="loop"):
        inspect(path)


@pytest.mark.parametrize(
    "file_type",
    [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK],
    ids=["char-device", "block-device", "fifo", "socket"],
)
def test_device_fifo_and_socket_entries_are_rejected(tmp_path: Path, file_type: int) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), special("dev", file_type))

    with pytest.raises(InvalidZipFile, match="device, fifo or socket"):
        inspect(path)


# Limits -------------------------------------------------------------------------------------


def test_zip_over_the_zipped_limit_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", os.urandom(2000)))

    with pytest.raises(PackageTooLarge, match="over the limit of 1000 bytes"):
        inspect(path, limits=PackageLimits(max_zipped_bytes=1000))


def test_zip_with_too_many_entries_is_rejected(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", *(file(f"m{i}.py") for i in range(6)))

    with pytest.raises(PackageTooLarge, match="more than 5 entries"):
        inspect(path, limits=PackageLimits(max_entries=5))


def test_zip_at_the_entry_limit_is_accepted(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py"), *(file(f"m{i}.py") for i in range(4)))

    inspect(path, limits=PackageLimits(max_entries=5))


def test_unzipped_size_over_the_limit_is_rejected(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip", file("app.py", os.urandom(600_000)), file("b.bin", os.urandom(600_000))
    )

    with pytest.raises(PackageTooLarge, match=f"more than {MiB} bytes"):
        inspect(path, limits=PackageLimits(max_unzipped_bytes=MiB))


def test_300_mb_zip_bomb_is_rejected_as_a_zip_bomb(big_bomb: Path) -> None:
    with pytest.raises(InvalidZipFile, match="compression ratio over 200:1, which looks like"):
        inspect(big_bomb)


def test_300_mb_of_real_bytes_is_too_large_even_when_the_ratio_is_allowed(
    big_bomb: Path,
) -> None:
    with pytest.raises(PackageTooLarge, match=f"more than {250 * MiB} bytes"):
        inspect(big_bomb, limits=PackageLimits(max_compression_ratio=1_000_000))


def test_ratio_bomb_under_the_size_limit_is_rejected(tmp_path: Path) -> None:
    path = zeros_zip(tmp_path / "p.zip", "app.py", 20 * MiB)

    with pytest.raises(InvalidZipFile, match="Entry 'app.py' has a compression ratio over"):
        inspect(path)


def test_many_small_compressible_entries_are_judged_as_one_archive(tmp_path: Path) -> None:
    # Each entry stays under the 1 MiB floor; together they inflate about a thousandfold.
    path = build_zip(
        tmp_path / "p.zip", file("app.py"), *(file(f"z{i}", bytes(900 * 1024)) for i in range(30))
    )

    with pytest.raises(InvalidZipFile, match="The zip file has a compression ratio over"):
        inspect(path)


# Extraction ---------------------------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_extract_writes_the_tree_and_content(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        file("app.py", b"def handler(e, c): pass\n"),
        file("lib/deep/util.py", b"X = 2\n"),
        directory("empty"),
    )

    extract_zip(path, tmp_path / "out")

    out = tmp_path / "out"
    assert (out / "app.py").read_bytes() == b"def handler(e, c): pass\n"
    assert (out / "lib" / "deep" / "util.py").read_bytes() == b"X = 2\n"
    assert (out / "empty").is_dir()


def test_extract_sets_modes_readable_by_any_uid(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        file("app.py", mode=0o600),
        file("bin/tool", mode=0o700),
        file("bin/script.sh", mode=0o744),
        file("lib/data.txt", mode=0o000),
    )

    extract_zip(path, tmp_path / "out")

    out = tmp_path / "out"
    assert mode_of(out) == 0o755
    assert mode_of(out / "app.py") == 0o644
    assert mode_of(out / "bin/tool") == 0o755
    assert mode_of(out / "bin/script.sh") == 0o755
    assert mode_of(out / "lib/data.txt") == 0o644
    assert mode_of(out / "bin") == 0o755


def test_extract_makes_the_root_bootstrap_executable(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        file("bootstrap", b"#!/bin/sh\n", mode=0o644),
        file("lib/bootstrap", mode=0o644),
    )

    extract_zip(path, tmp_path / "out")

    assert mode_of(tmp_path / "out" / "bootstrap") == 0o755
    assert mode_of(tmp_path / "out" / "lib" / "bootstrap") == 0o644


def test_extract_modes_do_not_depend_on_the_umask(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("lib/app.py"), directory("empty"))

    old_umask = os.umask(0o077)
    try:
        extract_zip(path, tmp_path / "out")
    finally:
        os.umask(old_umask)

    assert mode_of(tmp_path / "out") == 0o755
    assert mode_of(tmp_path / "out" / "lib") == 0o755
    assert mode_of(tmp_path / "out" / "empty") == 0o755
    assert mode_of(tmp_path / "out" / "lib" / "app.py") == 0o644


def test_extract_recreates_symlinks_inside_the_package(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        symlink("app.py", "lib/v1/app.py"),
        file("lib/v1/app.py", b"v1\n"),
        symlink("lib/current", "v1"),
    )

    extract_zip(path, tmp_path / "out")

    out = tmp_path / "out"
    assert os.readlink(out / "app.py") == "lib/v1/app.py"
    assert os.readlink(out / "lib" / "current") == "v1"
    assert (out / "app.py").read_bytes() == b"v1\n"
    assert (out / "lib" / "current" / "app.py").read_bytes() == b"v1\n"


def append_ratio_bomb(path: Path) -> None:
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.bin", "w") as out:
        for _ in range(20):
            out.write(bytes(MiB))


def appending(entry: Entry) -> Callable[[Path], None]:
    def append(path: Path) -> None:
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr(*entry)

    return append


@pytest.mark.parametrize(
    "append_bad_part",
    [append_ratio_bomb, appending(symlink("passwd", "../../etc/passwd")), appending(file("../x"))],
    ids=["ratio-bomb", "escaping-symlink", "escaping-name"],
)
def test_rejected_archive_leaves_no_dest_and_no_temp_dir(
    tmp_path: Path, append_bad_part: Callable[[Path], None]
) -> None:
    # The good entries come first, so extraction has written files by the time it refuses.
    path = build_zip(tmp_path / "p.zip", file("app.py"), file("lib/util.py", os.urandom(1000)))
    append_bad_part(path)
    cache = tmp_path / "cache"
    cache.mkdir()

    with pytest.raises(InvalidZipFile):
        extract_zip(path, cache / "pkg")

    assert list(cache.iterdir()) == []
    assert not (tmp_path / "x").exists()


def test_extract_never_writes_through_a_symlink(tmp_path: Path) -> None:
    path = build_zip(
        tmp_path / "p.zip",
        file("app.py"),
        directory("sub"),
        symlink("link", "sub"),
        file("link/planted.py", b"planted\n"),
    )

    with pytest.raises(InvalidZipFile):
        extract_zip(path, tmp_path / "cache" / "pkg")

    assert list((tmp_path / "cache").iterdir()) == []


def test_extract_keeps_a_dest_another_process_finished_first(tmp_path: Path) -> None:
    path = build_zip(tmp_path / "p.zip", file("app.py", b"ours\n"))
    dest = tmp_path / "cache" / "pkg"
    dest.mkdir(parents=True)
    (dest / "app.py").write_bytes(b"theirs\n")

    extract_zip(path, dest)

    assert (dest / "app.py").read_bytes() == b"theirs\n"
    assert [p.name for p in dest.parent.iterdir()] == ["pkg"]


# Spooling uploads ---------------------------------------------------------------------------


async def chunks_of(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def failing_after(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk
    raise ConnectionResetError("client went away")


def test_spool_bytes_records_content_digest_and_size(tmp_path: Path) -> None:
    spooled = spool_bytes(b"hello", tmp_path, max_bytes=10)

    assert spooled.path.parent == tmp_path
    assert spooled.path.read_bytes() == b"hello"
    assert spooled.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert spooled.size == 5


def test_spool_bytes_over_the_limit_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(PackageTooLarge, match="limit of 4 bytes"):
        spool_bytes(b"hello", tmp_path, max_bytes=4)

    assert list(tmp_path.iterdir()) == []


def test_spool_stream_joins_the_chunks(tmp_path: Path) -> None:
    spooled = asyncio.run(spool_stream(chunks_of(b"hel", b"", b"lo"), tmp_path, max_bytes=5))

    assert spooled.path.read_bytes() == b"hello"
    assert spooled.sha256 == spool_bytes(b"hello", tmp_path, max_bytes=5).sha256
    assert spooled.size == 5


def test_spool_stream_over_the_limit_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(PackageTooLarge, match="limit of 5 bytes"):
        asyncio.run(spool_stream(chunks_of(b"hel", b"lo", b"!"), tmp_path, max_bytes=5))

    assert list(tmp_path.iterdir()) == []


def test_spool_stream_whose_source_fails_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ConnectionResetError):
        asyncio.run(spool_stream(failing_after(b"hel"), tmp_path, max_bytes=100))

    assert list(tmp_path.iterdir()) == []


def test_discarding_a_spooled_package_twice_is_harmless(tmp_path: Path) -> None:
    spooled = spool_bytes(b"hello", tmp_path, max_bytes=5)

    spooled.discard()
    spooled.discard()

    assert list(tmp_path.iterdir()) == []


# Errors -------------------------------------------------------------------------------------


def test_package_errors_carry_their_status_and_type() -> None:
    assert (InvalidZipFile.status_code, InvalidZipFile.type) == (400, "InvalidZipFileException")
    assert (PackageTooLarge.status_code, PackageTooLarge.type) == (413, "PackageTooLargeException")
    assert (HandlerNotInPackage.status_code, HandlerNotInPackage.type) == (
        400,
        "InvalidParameterValueException",
    )
    assert (BlobNotFound.status_code, BlobNotFound.type) == (500, "PackageNotFound")
