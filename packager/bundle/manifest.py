"""``manifest.json``: every bundle file's sha256 and size, plus what was built, for what.

The manifest is written last, over the finished staging directory, and is byte-identical for the
same inputs: keys sorted, files sorted, no timestamps.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager import __version__
from packager.agent.paths import (
    PathError,
    check_inside,
    check_relpath,
    mask_mode,
    tree_problems,
)
from packager.agent.signature import SIGNATURE_FILE
from packager.digest import sha256_path
from packager.errors import InputError, VerifyError

MANIFEST = "manifest.json"
# The same checksums in coreutils' format, so a field tech can run `sha256sum -c SHA256SUMS`
# on a device that has no edgepack.
SUMS = "SHA256SUMS"
SCHEMA = "edgepack.bundle/v1"
# The DSSE envelope over manifest.json (packager.agent.signature), beside it, unlisted.
SIGNATURE = SIGNATURE_FILE


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
    """Regular files under ``root`` (never through a symlink), sorted, manifest.json aside."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    for path in sorted(found):
        # The signature covers the manifest, so neither is listed in it.
        if path.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE):
            yield path


def record_files(root: Path) -> list[FileRecord]:
    """Every regular file under ``root``; refuses a tree the path policy refuses
    (:mod:`packager.agent.paths`: a symlink, a special file, a bad name or mode) with
    VerifyError naming the path, so a build never records what verify and devices refuse."""
    problems = tree_problems(root)
    if problems:
        raise VerifyError(f"{root}: {problems[0]}", details=tuple(problems[1:]))
    return [
        FileRecord(p.relative_to(root).as_posix(), sha256_file(p), p.stat().st_size)
        for p in _walk(root)
    ]


def write_sums(root: Path, records: list[FileRecord]) -> None:
    lines = [f"{r.sha256}  {r.path}\n" for r in records if r.path != SUMS]
    (root / SUMS).write_text("".join(lines), encoding="utf-8")


def _mask_modes(root: Path) -> None:
    """Every regular file to 0644 or 0755 (the path policy's only modes), whatever the umask
    the files were written under; links are never followed (the policy then refuses them)."""
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = Path(dirpath) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != mask_mode(info.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, mask_mode(info.st_mode))
                finally:
                    os.close(fd)


def write_manifest(root: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``SHA256SUMS`` and ``manifest.json``.

    File modes are masked to 0644/0755 first; a symlink, special file or a name the path policy
    refuses raises VerifyError naming it."""
    _mask_modes(root)
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


# The largest JSON (or checksum list) a bundle may carry, and the most files its manifest may
# list. A bundle holds tens of files; one manifest entry is ~150 bytes of indented JSON, so
# 65,536 entries need ~10 MiB: 16 MiB leaves room for the rest of the document and bounds what
# verify, ota publish and a device read into memory (json holds ~20x the text size as objects).
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_FILES = 65_536
# JSON nesting a manifest may have: edgepack writes at most 4 levels; anything far deeper is
# crafted (and would make json and every walk of it recurse).
MAX_DEPTH = 32
# Files a bundle carries that edgepack itself reads as documents: each bounded before reading.
BOUNDED_FILES = (MANIFEST, SUMS, SIGNATURE, "confinement.json")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_FILE_SIZE = 2**63 - 1  # off_t: no file can be larger


def check_document_sizes(root: Path) -> None:
    """Refuse (VerifyError) any document :data:`BOUNDED_FILES` names, or any top-level
    ``*.json``, larger than :data:`MAX_DOCUMENT_BYTES` (lstat: never through a link)."""
    names = set(BOUNDED_FILES)
    try:
        names |= {p.name for p in root.iterdir() if p.name.endswith(".json")}
    except OSError:
        pass
    for name in sorted(names):
        try:
            size = os.lstat(root / name).st_size
        except OSError:
            continue
        if size > MAX_DOCUMENT_BYTES:
            raise VerifyError(
                f"{root / name}: {size} bytes, more than the {MAX_DOCUMENT_BYTES} bytes a bundle"
                " document may have", hint="rebuild the bundle with 'edgepack build'")


def _depth(document: Any) -> int:
    """How deeply ``document`` nests (iterative: a crafted document cannot exhaust the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                return depth
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_shape(path: Path, document: Any) -> dict[str, Any]:
    """``document`` when it has a manifest's shape, else VerifyError naming the field: a dict of
    schema :data:`SCHEMA`, at most :data:`MAX_DEPTH` deep, ``files`` a list of at most
    :data:`MAX_FILES` entries each ``{"path": str, "sha256": 64 lower-case hex, "size": int in
    0..2**63-1}``, ``image`` (when present) an object whose ``archive``/``digest``/``ref`` are
    strings."""
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        raise VerifyError(f"{path}: schema: expected '{SCHEMA}'")
    if _depth(document) > MAX_DEPTH:
        raise VerifyError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    files = document.get("files")
    if not isinstance(files, list):
        raise VerifyError(f"{path}: files: expected a list")
    if len(files) > MAX_FILES:
        raise VerifyError(f"{path}: files: {len(files)} entries, at most {MAX_FILES} allowed")
    for i, entry in enumerate(files):
        where = f"{path}: files[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"path", "sha256", "size"}:
            raise VerifyError(f"{where}: expected exactly path, sha256 and size")
        if not isinstance(entry["path"], str):
            raise VerifyError(f"{where}.path: expected a string")
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            raise VerifyError(f"{where}.sha256: expected 64 lower-case hex digits")
        size = entry["size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_SIZE:
            raise VerifyError(f"{where}.size: expected a whole number of bytes")
    image = document.get("image")
    if image is not None:
        if not isinstance(image, dict):
            raise VerifyError(f"{path}: image: expected an object")
        for key in ("archive", "digest", "ref"):
            if key in image and not isinstance(image[key], str):
                raise VerifyError(f"{path}: image.{key}: expected a string")
    return document


def read_manifest(root: Path) -> dict[str, Any]:
    """``root``'s manifest.json, its size, nesting and shape checked (:func:`check_shape`),
    after every bundle document's size (:func:`check_document_sizes`). InputError when ``root``
    is not a directory; VerifyError (exit 8), one line naming the file and field, otherwise."""
    path = root / MANIFEST
    if not root.is_dir():
        raise InputError(f"{root}: not a bundle directory", hint="pass the directory build wrote")
    if path.is_symlink():
        raise VerifyError(f"{path}: is a symbolic link (bundles hold regular files only)")
    if not path.is_file():
        raise VerifyError(f"{path}: missing", hint="rebuild the bundle with 'edgepack build'")
    check_document_sizes(root)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)
        if len(data) > MAX_DOCUMENT_BYTES:
            raise VerifyError(f"{path}: more than {MAX_DOCUMENT_BYTES} bytes")
        document = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an int of 5,000 digits
        raise VerifyError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:200]})"
                          ) from exc
    except RecursionError as exc:
        raise VerifyError(f"{path}: nested deeper than {MAX_DEPTH} levels") from exc
    return check_shape(path, document)


def path_problems(root: Path, document: Mapping[str, Any]) -> list[str]:
    """What the path policy (:mod:`packager.agent.paths`) refuses in a bundle, one line each
    naming the path: a listed path that is absolute, not normalised, holds ``..`` or crosses a
    symlink, a path listed twice, and any symlink, special file or setuid/world-writable file
    in the tree. Empty when the bundle's names are all plain files inside it."""
    problems: list[str] = list(tree_problems(root))
    listed: set[str] = set()
    files = document.get("files", [])
    if not isinstance(files, list):
        return [*problems, f"{MANIFEST}: files: expected a list"]
    for entry in files:
        if not isinstance(entry, Mapping) or "path" not in entry:
            problems.append(f"{MANIFEST}: files: every entry needs a path, sha256 and size")
            continue
        try:
            rel = check_relpath(entry["path"])
            check_inside(root, rel)
        except PathError as exc:
            problems.append(f"{MANIFEST}: files: {exc}")
            continue
        if rel in listed:
            problems.append(f"{MANIFEST}: files: {rel!r} is listed twice")
        listed.add(rel)
    return problems


def check_files(root: Path, document: Mapping[str, Any]) -> list[str]:
    """Problems with the listed files, one line each, naming the file; empty when all is well.

    The path policy comes first and alone (:func:`path_problems`): nothing is read through a
    path it refuses."""
    problems = path_problems(root, document)
    if problems:
        return problems
    listed: set[str] = set()
    checked: list[tuple[str, Mapping[str, Any]]] = []
    for entry in document["files"]:
        listed.add(str(entry["path"]))
        checked.append((str(entry["path"]), entry))
    for rel, entry in checked:
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
