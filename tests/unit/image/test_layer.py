from __future__ import annotations

import gzip
import hashlib
import tarfile
from pathlib import Path

import pytest

from packager.image.layer import (
    TarEntry,
    normalize_path,
    parent_dirs,
    tree_entries,
    with_parents,
    write_layer,
)


def _entries(tmp_path: Path) -> list[TarEntry]:
    big = tmp_path / "big.bin"
    # Larger than the 1 MiB copy chunk, so the streaming path is exercised.
    big.write_bytes(bytes(range(256)) * 12_000)
    return [
        TarEntry("opt/app/z.txt", "file", 0o644, size=3, data=b"zzz"),
        TarEntry("opt/app/model.bin", "file", 0o640, 10001, 10001, size=big.stat().st_size,
                 data=big),
        TarEntry("opt/app/link", "symlink", 0o777, linkname="z.txt"),
        TarEntry("tmp", "dir", 0o1777),
        TarEntry("opt/app/run", "file", 0o755, size=len(b"#!/bin/sh\n"),
                 data=lambda: open(big.parent / "run.sh", "rb")),
    ]


@pytest.fixture()
def entries(tmp_path: Path) -> list[TarEntry]:
    (tmp_path / "run.sh").write_bytes(b"#!/bin/sh\n")
    return _entries(tmp_path)


def test_same_entries_in_any_order_give_the_same_bytes(tmp_path: Path,
                                                        entries: list[TarEntry]) -> None:
    a = write_layer(with_parents(entries), tmp_path / "a.tgz", mtime=1_700_000_000)
    b = write_layer(with_parents(list(reversed(entries))), tmp_path / "b.tgz",
                    mtime=1_700_000_000)
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()
    assert (a.digest, a.diff_id, a.size) == (b.digest, b.diff_id, b.size)
    c = write_layer(with_parents(entries), tmp_path / "c.tgz", mtime=1_700_000_001)
    assert c.digest != a.digest  # the mtime is really in the bytes


def test_digest_and_diff_id_match_hashlib_on_the_written_file(tmp_path: Path,
                                                              entries: list[TarEntry]) -> None:
    blob = write_layer(with_parents(entries), tmp_path / "l.tgz", mtime=5)
    raw = (tmp_path / "l.tgz").read_bytes()
    plain = gzip.decompress(raw)
    assert blob.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert blob.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert (blob.size, blob.uncompressed_size) == (len(raw), len(plain))


def test_gzip_header_has_no_time_and_no_name(tmp_path: Path, entries: list[TarEntry]) -> None:
    write_layer(entries, tmp_path / "l.tgz", mtime=5)
    header = (tmp_path / "l.tgz").read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] & 0x08 == 0  # FNAME flag clear
    assert header[4:8] == b"\0\0\0\0"  # MTIME


def test_members_sorted_with_fixed_metadata(tmp_path: Path, entries: list[TarEntry]) -> None:
    write_layer(with_parents(entries), tmp_path / "l.tgz", mtime=1234)
    with tarfile.open(tmp_path / "l.tgz") as tf:
        members = tf.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert names[:2] == ["opt", "opt/app"]  # parents were added and come first
        assert {m.mtime for m in members} == {1234}
        assert {(m.uname, m.gname) for m in members} == {("", "")}
        by_name = {m.name: m for m in members}
        assert (by_name["opt/app/model.bin"].uid, by_name["opt/app/model.bin"].mode) == (
            10001, 0o640)
        assert by_name["tmp"].mode == 0o1777
        assert by_name["opt/app/link"].issym() and by_name["opt/app/link"].linkname == "z.txt"
        data = tf.extractfile("opt/app/model.bin")
        assert data is not None and data.read() == bytes(range(256)) * 12_000


def test_duplicate_paths_are_refused(tmp_path: Path) -> None:
    dup = [TarEntry("a", "dir", 0o755), TarEntry("a", "dir", 0o700)]
    with pytest.raises(ValueError, match="duplicate"):
        write_layer(dup, tmp_path / "l.tgz", mtime=0)


def test_paths_are_normalized_and_cannot_escape() -> None:
    assert normalize_path("/usr/bin/x") == "usr/bin/x"
    assert normalize_path("./usr//bin/x/") == "usr/bin/x"
    assert parent_dirs("a/b/c") == ["a", "a/b"]
    with pytest.raises(ValueError):
        normalize_path("/opt/../../etc/passwd")


def test_tree_entries_ignore_the_host_umask(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o700)
    (root / "bin" / "data").write_text("x")
    (root / "bin" / "data").chmod(0o600)
    (root / "bin" / "alias").symlink_to("tool")
    found = {e.path: e for e in tree_entries(root)}
    assert found["bin"].kind == "dir" and found["bin"].mode == 0o755
    assert found["bin/tool"].mode == 0o755
    assert found["bin/data"].mode == 0o644
    assert found["bin/alias"].kind == "symlink" and found["bin/alias"].linkname == "tool"
