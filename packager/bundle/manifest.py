"""``manifest.json``: every bundle file's sha256 and size, plus what was built, for what.

The manifest is written last, over the finished staging directory, and is byte-identical for the
same inputs: keys sorted, files sorted, no timestamps. Its shape is :class:`Manifest`: frozen,
typed sections (target, model, fit, image, optimization, builder, files) with unknown keys
refused, like the target files (:mod:`packager.targets`), so every reader and writer goes through
one definition. The device class's own section (``device``) is free-form here and typed by its
backend (:meth:`Manifest.device_as`): core code never names a device class.

A bundle is untrusted input (``edgepack verify``, ``ota publish``, a USB stick): its documents are
bounded (:func:`check_document_sizes`, :func:`check_shape`) before the model parse, and every
problem is one :class:`~packager.errors.VerifyError` (exit 8) naming the file and field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    model_validator,
)

from packager import __version__
from packager.agent.paths import (
    PathError,
    check_inside,
    check_relpath,
    mask_mode,
    tree_problems,
)
from packager.agent.signature import SIGNATURE_FILE
from packager.bounded import read_bounded
from packager.digest import sha256_path
from packager.errors import InputError, VerifyError

MANIFEST = "manifest.json"
# The same checksums in coreutils' format, so a field tech can run `sha256sum -c SHA256SUMS`
# on a device that has no edgepack.
SUMS = "SHA256SUMS"
# v2 (issue 11): the typed manifest. v1 had a top-level edgepack_version (now builder.edgepack),
# wrote null for absent values and kept the device class's section under its class's name (now
# ``device``). Bundles of any other schema are refused: rebuild them.
SchemaVersion = Literal["edgepack.bundle/v2"]
SCHEMA: SchemaVersion = "edgepack.bundle/v2"
# The DSSE envelope over manifest.json (packager.agent.signature), beside it, unlisted.
SIGNATURE = SIGNATURE_FILE
MAX_FILE_SIZE = 2**63 - 1  # off_t: no file can be larger

JsonObject = dict[str, JsonValue]
Str = Annotated[str, Field(strict=True, max_length=4096)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_FILE_SIZE)]
Flag = Annotated[bool, Field(strict=True)]
Sha256 = Annotated[str, Field(strict=True, pattern=r"^[0-9a-f]{64}$")]
Digest = Annotated[str, Field(strict=True, pattern=r"^sha256:[0-9a-f]{64}$")]
# The bundle name and version: what edgepack build accepts (NAME_FORM, VERSION_FORM in
# packager.targets) and the names backends derive from a model's file name, at most 128.
Label = Annotated[str, Field(strict=True, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Dim = Annotated[int, Field(strict=True)] | Str | None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceSection(_Section):
    """Base of a backend's ``device`` section model (:meth:`Manifest.device_as`)."""

    def to_json(self) -> JsonObject:
        return self.model_dump(mode="json", exclude_none=True)


class Builder(_Section):
    """``builder``: the edgepack version that wrote the bundle (v1's ``edgepack_version``)."""

    edgepack: Str = __version__


class CpuInfo(_Section):
    """The target's CPU; ``qemu``: the qemu-user model ``edgepack run`` emulates (absent: qemu
    models no such core)."""

    model: Str
    cores: Count
    qemu: Str | None = None


class TargetInfo(_Section):
    """``target``: the target the bundle was built for: its name and device class, plus the OCI
    platform and CPU where the class has them (a Linux target does, an MCU does not)."""

    name: Str
    device_class: Str
    platform: Str | None = None  # the OCI platform, e.g. linux/arm64, where the class has one
    cpu: CpuInfo | None = None


class Tensor(_Section):
    """One model input or output (:class:`packager.models.info.TensorInfo`): dtype in numpy
    spelling, each dim an int, a symbolic name (``"batch"``) or null (unknown)."""

    name: Str
    dtype: Str
    shape: tuple[Dim, ...]


class ConstantFolding(_Section):
    """``model.constant_folding``: what the FoldConstantsStep did (packager.build
    _fold_constants, packager.models.fold): the tool and its version, whether it folded and then
    the top-level node counts before and after (after may be the larger: an If on a constant
    is replaced by its branch's nodes), else why not (``error``)."""

    tool: Literal["polygraphy"]
    version: Str
    ran: Flag
    nodes_before: Count | None = None
    nodes_after: Count | None = None
    error: Str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ConstantFolding:
        counts = (self.nodes_before, self.nodes_after)
        if self.ran and (None in counts or self.error is not None):
            raise ValueError("ran: true needs nodes_before and nodes_after and no error")
        if not self.ran and (counts != (None, None) or self.error is None):
            raise ValueError("ran: false needs an error and no node counts")
        return self


class ModelSection(_Section):
    """``model``: the model the bundle deploys (:class:`packager.models.info.ModelInfo`): its
    ``sha256:`` digest and ``size_bytes`` cover the file and its external data; then its tensors
    and what the source steps recorded (runtime-compat notes, the conversion's measurements)."""

    source: Str  # the model file's name as given to edgepack build
    format: Str
    digest: Digest
    size_bytes: Count
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    runtime_compatibility: tuple[Str, ...] | None = None
    conversion: JsonObject | None = None
    # What the FoldConstantsStep did (packager.build: tool, version, ran, node counts or error).
    constant_folding: ConstantFolding | None = None


class Resource(_Section):
    """One budget line of :class:`packager.fit.Resource`, in bytes."""

    name: Str
    needed_bytes: Count
    available_bytes: Count
    needed_parts: dict[str, Count]
    available_note: Str
    estimate_source: Str
    fits: Flag


class FitSection(_Section):
    """``fit``: the fit check (:class:`packager.fit.FitReport`): the target's name, whether every
    resource fits, and each resource's budget in bytes."""

    target: Str
    fits: Flag
    resources: tuple[Resource, ...]

    @classmethod
    def from_report(cls, report: Any) -> FitSection:
        """From a :class:`packager.fit.FitReport` (its ``to_json``)."""
        return cls.model_validate(report.to_json())


class Layer(_Section):
    """One layer of the bundle's OCI image (:class:`packager.image.spec.LayerResult`):
    ``digest`` and ``size`` (bytes) of the compressed blob, ``diff_id`` and
    ``uncompressed_size`` (bytes) of the tar inside it."""

    name: Str
    digest: Digest
    diff_id: Digest
    size: Count
    uncompressed_size: Count


class ImageSection(_Section):
    """The OCI image the bundle carries: its archive (bundle-relative), manifest and config
    digests, reference, platform, archive size and the port its server listens on."""

    archive: Str
    digest: Digest
    config_digest: Digest
    ref: Str
    platform: Str
    size_bytes: Count
    port: Port
    layers: tuple[Layer, ...]


class Optimization(_Section):
    """The optimize report (:meth:`packager.optimize.report.OptimizeReport.to_json`, with the
    on-target measurement of :mod:`packager.optimize.on_target`) without what was timed on the
    building host (:func:`packager.optimize.report.without_host_timing`): same inputs, same
    manifest bytes."""

    source: Str
    source_kind: Str
    quantize: Str
    settings: JsonObject
    steps: tuple[Str, ...]
    model: Str
    variants: tuple[JsonObject, ...]
    notes: tuple[Str, ...]
    prune: JsonObject | None = None
    evaluation: JsonObject | None = None
    measured_on: JsonObject | None = None
    on_target: JsonObject | None = None


class FileRecord(_Section):
    """One entry of ``files``: a bundle-relative POSIX path, the file's lower-case hex sha256
    (no ``sha256:`` prefix: the SHA256SUMS form) and its size in bytes."""

    path: Str
    sha256: Sha256
    size: Count


class BundleMeta(_Section):
    """What a writer says about a bundle: everything in manifest.json but its files."""

    name: Label
    version: Label
    target: TargetInfo
    model: ModelSection
    fit: FitSection
    builder: Builder = Builder()
    image: ImageSection | None = None
    optimization: Optimization | None = None
    # The device class's own section, typed by its backend (Manifest.device_as).
    device: JsonObject | None = None


D = TypeVar("D", bound=DeviceSection)


class Manifest(BundleMeta):
    """``manifest.json`` as written: :class:`BundleMeta`, the schema and every file."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: SchemaVersion = Field(alias="schema")
    files: tuple[FileRecord, ...]

    @classmethod
    def from_json(cls, document: object, source: str = MANIFEST) -> Manifest:
        """The typed manifest; VerifyError (exit 8) naming ``source`` and the first bad field
        (``source: image.prot: unknown key (did you mean 'port'?)``)."""
        if isinstance(document, dict) and document.get("schema") != SCHEMA:
            raise VerifyError(_schema_problem(source, document.get("schema")))
        return _validate(cls, document, source, "")

    def to_json(self) -> dict[str, Any]:
        """The document :func:`write_manifest` writes (absent values left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def meta(self) -> BundleMeta:
        """What its writer said (everything but the schema and files), to write it again."""
        return BundleMeta.model_validate(self.model_dump(exclude={"schema_", "files"}))

    def device_as(self, model: type[D], source: str = MANIFEST) -> D:
        """The ``device`` section parsed by its backend's ``model``; VerifyError naming
        ``source`` and ``device.FIELD`` when it is missing or malformed."""
        if self.device is None:
            raise VerifyError(f"{source}: device: is required for a {self.target.device_class}"
                              " bundle", hint="rebuild the bundle with 'edgepack build'")
        return _validate(model, self.device, source, "device")


M = TypeVar("M", bound=BaseModel)
# How pydantic names a union's branch in an error's location (a model's class name, a type):
# not a key of the document, so not part of the field path shown.
_UNION_TAG = re.compile(r"[A-Z][A-Za-z0-9]*|int|str|none|bool|float|(constrained|function)-.*")


def _schema_problem(source: str, given: object) -> str:
    shown = repr(given)[:80] if given is not None else "missing"
    return (f"{source}: schema: {shown} is not supported (this edgepack reads '{SCHEMA}'; "
            "rebuild the bundle with 'edgepack build')")


def _owner(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The model that holds the field at ``loc`` (tuple indexes skipped), for suggestions."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()} if model else {}
        if part not in fields:
            return None
        pending: list[Any] = [fields[part].annotation]
        model = None
        while pending:
            kind = pending.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                model = kind
                break
            pending.extend(getattr(kind, "__args__", ()))
    return model


_PROBLEMS = {
    "missing": "is required",
    "int_type": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "string_pattern_mismatch": "must match {pattern}",
    "string_too_long": "is too long",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be {expected}",
}


def _validate(model: type[M], document: object, source: str, prefix: str) -> M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        # A misspelt key also shows up as a missing one: the unknown key is the real fault.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        loc = [p for p in first["loc"] if isinstance(p, str | int)]
        # A union (str | None, Model | None) reports each branch under its type's name.
        loc = [p for p in loc if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
        path = prefix
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        kind = first["type"]
        if kind == "extra_forbidden":
            owner = _owner(model, loc[:-1])
            names = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
            match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
            problem = "unknown key" + (f" (did you mean '{match[0]}'?)" if match else "")
        elif kind in _PROBLEMS:
            problem = _PROBLEMS[kind].format(**(first.get("ctx") or {}))
        else:
            problem = " ".join(str(first["msg"]).split()).rstrip(".").lower()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise VerifyError(f"{source}: {path or '(top level)'}: {problem}{more}",
                          hint="rebuild the bundle with 'edgepack build'") from exc


def sha256_file(path: Path) -> str:
    """The lower-case hex sha256 of the file at ``path``, without the ``sha256:`` prefix
    (:func:`packager.digest.sha256_file` gives the prefixed form and the size)."""
    return sha256_path(path)[0]


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
        FileRecord(path=p.relative_to(root).as_posix(), sha256=sha256_file(p),
                   size=p.stat().st_size)
        for p in _walk(root)
    ]


def write_sums(root: Path, records: list[FileRecord]) -> None:
    """Write ``root/SHA256SUMS``: one ``<hex>  <path>`` line per record, in the order given,
    SHA256SUMS itself left out (coreutils' format: ``sha256sum -c SHA256SUMS`` on a device)."""
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


def write_manifest(root: Path, meta: BundleMeta) -> Manifest:
    """Hash every file under ``root`` and write ``SHA256SUMS`` and ``manifest.json`` (``meta``,
    the schema and every file's record); returns what was written.

    File modes are masked to 0644/0755 first; a symlink, special file or a name the path policy
    refuses raises VerifyError naming it."""
    _mask_modes(root)
    records = [r for r in record_files(root) if r.path != SUMS]
    write_sums(root, records)
    sums = root / SUMS
    records.append(FileRecord(path=SUMS, sha256=sha256_file(sums), size=sums.stat().st_size))
    manifest = Manifest.model_validate(
        {
            **meta.model_dump(exclude_none=True),
            "schema": SCHEMA,
            "files": sorted(records, key=lambda r: r.path),
        }
    )
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    (root / MANIFEST).write_text(text, encoding="utf-8")
    return manifest


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
    """``document`` when it has a manifest's outline, else VerifyError naming the field: a dict
    of schema :data:`SCHEMA`, at most :data:`MAX_DEPTH` deep, ``files`` a list of at most
    :data:`MAX_FILES` entries. Runs before the model parse (:meth:`Manifest.from_json`), which
    checks every field."""
    if not isinstance(document, dict):
        raise VerifyError(f"{path}: expected a JSON object")
    if document.get("schema") != SCHEMA:
        raise VerifyError(_schema_problem(str(path), document.get("schema")))
    if _depth(document) > MAX_DEPTH:
        raise VerifyError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    files = document.get("files")
    if not isinstance(files, list):
        raise VerifyError(f"{path}: files: expected a list")
    if len(files) > MAX_FILES:
        raise VerifyError(f"{path}: files: {len(files)} entries, at most {MAX_FILES} allowed")
    return document


@dataclass(frozen=True)
class ManifestRead:
    """``manifest.json`` as read once (:func:`load_manifest`): its exact bytes (at most
    :data:`MAX_DOCUMENT_BYTES`) and the :class:`Manifest` parsed from them. Whatever checks the
    bundle (checksums, signature) and whatever then acts on it use this one copy: the file on
    disk (untrusted media, another writer) may change after it was read."""

    data: bytes = field(repr=False)
    manifest: Manifest

    @property
    def sha256(self) -> str:
        """The lower-case hex sha256 of :attr:`data`."""
        return hashlib.sha256(self.data).hexdigest()


def load_manifest(root: Path) -> ManifestRead:
    """``root``'s manifest.json, read with ONE bounded read and typed (:class:`Manifest`):
    after every bundle document's size (:func:`check_document_sizes`) and the document's size,
    nesting and outline (:func:`check_shape`). InputError when ``root`` is not a directory;
    VerifyError (exit 8), one line naming the file and field (an unknown key with a close
    match), otherwise."""
    path = root / MANIFEST
    if not root.is_dir():
        raise InputError(f"{root}: not a bundle directory", hint="pass the directory build wrote")
    if path.is_symlink():
        raise VerifyError(f"{path}: is a symbolic link (bundles hold regular files only)")
    if not path.is_file():
        raise VerifyError(f"{path}: missing", hint="rebuild the bundle with 'edgepack build'")
    check_document_sizes(root)
    # No link followed: a link swapped in after the check above is refused, not read through.
    data = read_bounded(path, MAX_DOCUMENT_BYTES, error=VerifyError, what="not a bundle manifest",
                        follow_symlinks=False)
    return ManifestRead(data=data, manifest=parse_manifest(data, path))


def parse_manifest(data: bytes, path: Path) -> Manifest:
    """The typed manifest in ``data`` (the bytes of ``path``, named in every error): JSON,
    then :func:`check_shape`, then :meth:`Manifest.from_json`; VerifyError (exit 8)."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an int of 5,000 digits
        raise VerifyError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:200]})"
                          ) from exc
    except RecursionError as exc:
        raise VerifyError(f"{path}: nested deeper than {MAX_DEPTH} levels") from exc
    return Manifest.from_json(check_shape(path, document), str(path))


def read_manifest(root: Path) -> Manifest:
    """``root``'s manifest.json, typed: :func:`load_manifest` without the bytes. A command that
    verifies the bundle uses the manifest :func:`packager.bundle.verify.verify_bundle` returns
    instead of reading it again."""
    return load_manifest(root).manifest


def path_problems(root: Path, manifest: Manifest) -> list[str]:
    """What the path policy (:mod:`packager.agent.paths`) refuses in a bundle, one line each
    naming the path: a listed path that is absolute, not normalised, holds ``..`` or crosses a
    symlink, a path listed twice, and any symlink, special file or setuid/world-writable file
    in the tree. Empty when the bundle's names are all plain files inside it."""
    problems: list[str] = list(tree_problems(root))
    listed: set[str] = set()
    for entry in manifest.files:
        try:
            rel = check_relpath(entry.path)
            check_inside(root, rel)
        except PathError as exc:
            problems.append(f"{MANIFEST}: files: {exc}")
            continue
        if rel in listed:
            problems.append(f"{MANIFEST}: files: {rel!r} is listed twice")
        listed.add(rel)
    return problems


def check_files(root: Path, manifest: Manifest) -> list[str]:
    """Problems with the listed files, one line each, naming the file; empty when all is well.

    The path policy comes first and alone (:func:`path_problems`): nothing is read through a
    path it refuses."""
    problems = path_problems(root, manifest)
    if problems:
        return problems
    listed = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        path = root / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{entry.path}: size {size} bytes, manifest says {entry.size}")
            continue
        actual = sha256_file(path)
        if actual != entry.sha256:
            problems.append(
                f"{entry.path}: sha256 {actual[:16]}..., manifest says {entry.sha256[:16]}..."
            )
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in manifest.json (unexpected file)")
    return problems
