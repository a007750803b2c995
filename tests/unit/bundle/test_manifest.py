from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from packager.bundle.manifest import SUMS, check_files, read_manifest, write_manifest
from packager.errors import VerifyError


def _bundle(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)))
    return root


def test_manifest_lists_every_file_with_sha256(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    doc = write_manifest(root, {"name": "x", "version": "1"})
    files = {f["path"]: f for f in doc["files"]}
    assert set(files) == {"a.txt", "sub/b.bin", SUMS}
    assert files["sub/b.bin"]["sha256"] == hashlib.sha256(bytes(range(256))).hexdigest()
    assert files["a.txt"]["size"] == 6
    assert read_manifest(root) == json.loads((root / "manifest.json").read_text())
    assert check_files(root, doc) == []


def test_sha256sums_is_coreutils_format(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    write_manifest(root, {})
    lines = (root / SUMS).read_text().splitlines()
    assert lines == [
        f"{hashlib.sha256(b'alpha' + bytes([10])).hexdigest()}  a.txt",
        f"{hashlib.sha256(bytes(range(256))).hexdigest()}  sub/b.bin",
    ]


def test_manifest_is_byte_identical_for_same_inputs(tmp_path: Path) -> None:
    a = _bundle(tmp_path / "a")
    b = _bundle(tmp_path / "b")
    write_manifest(a, {"k": 1})
    write_manifest(b, {"k": 1})
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_check_files_names_each_damaged_file(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    doc = write_manifest(root, {})
    data = bytearray((root / "sub" / "b.bin").read_bytes())
    data[7] ^= 0xFF
    (root / "sub" / "b.bin").write_bytes(bytes(data))
    (root / "a.txt").unlink()
    (root / "extra").write_text("?")
    problems = check_files(root, doc)
    assert any(p.startswith("sub/b.bin: sha256") for p in problems)
    assert "a.txt: missing" in problems
    assert any(p.startswith("extra: not listed") for p in problems)


def test_read_manifest_rejects_missing_and_foreign(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match=r"manifest\.json: missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema": "other"}')
    with pytest.raises(VerifyError, match="schema"):
        read_manifest(tmp_path)
