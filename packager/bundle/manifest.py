"""``manifest.json``: every bundle file's sha256 and size, plus what was built, for what.

The manifest is written last, over the finished staging directory, and is byte-identical for the
same inputs: keys sorted, files sorted, no timestamps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager import __version__
from packager.digest import sha256_path
from packager.errors import InputError, VerifyError

MANIFEST = "manifest.json"
# The same checksums in coreutils' format, so a field tech can run `sha256sum -c SHA256SUMS`
# on a device that has no edgepack.
SUMS = "SHA256SUMS"
SCHEMA = "edgepack.bundle/v1"


def sha256_file(path: Path) -> str:
    return sha256_path(path)[0]


@dataclass(frozen=True)
class FileRecord:
    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST:
            yield path


def record_files(root: Path) -> list[FileRecord]:
    return [
        FileRecord(p.relative_to(root).as_posix(), sha256_file(p), p.stat().st_size)
        for p in _walk(root)
    ]


def write_sums(root: Path, records: list[FileRecord]) -> None:
    lines = [f"{r.sha256}  {r.path}\n" for r in records if r.path != SUMS]
    (root / SUMS).write_text("".join(lines), encoding="utf-8")


def write_manifest(root: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``SHA256SUMS`` and ``manifest.json``."""
    records = [r for r in record_files(root) if r.path != SUMS]
    write_sums(root, records)
    sums = root / SUMS
    records.append(FileRecord(SUMS, sha256_file(sums), sums.stat().st_size))
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "edgepack_version": __version__,
        **meta,
        "files": [r.to_json() for r in sorted(records, key=lambda r: r.path)],
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    (root / MANIFEST).write_text(text, encoding="utf-8")
    return document


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise InputError(f"{root}: not a bundle directory", hint="pass the directory build wrote")
    if not path.is_file():
        raise VerifyError(f"{path}: missing", hint="rebuild the bundle with 'edgepack build'")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise VerifyError(f"{path}: schema: expected '{SCHEMA}'")
    return document


def check_files(root: Path, document: Mapping[str, Any]) -> list[str]:
    """Problems with the listed files, one line each, naming the file; empty when all is well."""
    problems: list[str] = []
    listed: set[str] = set()
    for entry in document.get("files", []):
        rel = str(entry["path"])
        listed.add(rel)
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel}: size {size} bytes, manifest says {entry['size']}")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(
                f"{rel}: sha256 {actual[:16]}..., manifest says {entry['sha256'][:16]}..."
            )
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in manifest.json (unexpected file)")
    return problems
