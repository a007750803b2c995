"""The engine key: what a TensorRT plan was built for, and where that plan lives on the device.

One definition (/work/brief/jetson.md, "The engine key") used by the on-device builder
(``engine_build``), the TensorRT runner, the bundle manifest and ``edgepack engine build``. A
TensorRT plan is tied to the GPU (SM), the TensorRT release and the build options
(NVIDIA/TensorRT#1879, #1810: "engines are not portable across platforms or TensorRT versions"),
so a plan is loaded only when the ``<stem>.key.json`` next to it holds exactly the key expected.

Layout under the engines directory (``ENGINES_DIR`` on the device)::

    <model_sha256>/<tensorrt>-sm<NN>-<precision>[-dla<N>].plan
    <model_sha256>/<tensorrt>-sm<NN>-<precision>[-dla<N>].key.json   (canonical JSON, written last)
    timing-<tensorrt>-sm<NN>.cache                                    (kept across rebuilds)

Standard library only; this module runs inside the device's container with the image's Python
(3.8 or newer: ``from __future__`` annotations, no newer syntax).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINES_DIR = "/var/lib/edgepack/engines"
PRECISIONS = ("fp16", "int8", "fp32")
FIELDS = ("model_sha256", "tensorrt", "sm", "precision", "dla_core", "workspace_mib")
PLAN_SUFFIX = ".plan"
KEY_SUFFIX = ".key.json"
# A key file is a few hundred bytes; anything larger is not one of ours (bounded read).
MAX_KEY_BYTES = 4096
# Bounds: the largest Jetson module has 2 DLA cores (Xavier, Orin AGX); 1 TiB of workspace is
# beyond any device; compute capabilities are two or three digits (5.3 -> 53, 10.0 -> 100).
MAX_DLA_CORE = 7
MAX_WORKSPACE_MIB = 1024 * 1024

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RELEASE = re.compile(r"(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")
_VERSION = re.compile(r"(0|[1-9][0-9]{0,2})(?:\.(0|[1-9][0-9]{0,2})){0,3}")
_COMPUTE_CAPABILITY = re.compile(r"([1-9][0-9]?)\.([0-9])")


class EngineKeyError(ValueError):
    """A key field or key file that is not a valid engine key (one-line message)."""


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineKey:
    """The build inputs of one plan; equal keys mean an interchangeable plan.

    - ``model_sha256``: lowercase hex sha256 of the ONNX file the bundle ships.
    - ``tensorrt``: ``major.minor.patch`` ("8.6.2"); the device's TensorRT is compared on these.
    - ``sm``: compute capability without the dot (87 for "8.7").
    - ``precision``: "fp16" | "int8" (explicit Q/DQ) | "fp32".
    - ``dla_core``: the DLA core the plan runs on, or None for the GPU.
    - ``workspace_mib``: the builder's workspace pool limit, MiB.

    Raises :class:`EngineKeyError` naming the field for a value outside those forms.
    """

    model_sha256: str
    tensorrt: str
    sm: int
    precision: str
    dla_core: int | None
    workspace_mib: int

    def __post_init__(self) -> None:
        if not isinstance(self.model_sha256, str) or not _SHA256.fullmatch(self.model_sha256):
            raise EngineKeyError(
                f"model_sha256: {self.model_sha256!r} is not 64 lowercase hex digits"
            )
        if not isinstance(self.tensorrt, str) or not _RELEASE.fullmatch(self.tensorrt):
            raise EngineKeyError(
                f"tensorrt: {self.tensorrt!r} is not major.minor.patch (e.g. 8.6.2)"
            )
        if not _int(self.sm) or not 10 <= self.sm <= 999:
            raise EngineKeyError(f"sm: {self.sm!r} is not a compute capability like 87")
        if self.precision not in PRECISIONS:
            raise EngineKeyError(
                f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if self.dla_core is not None and (
            not _int(self.dla_core) or not 0 <= self.dla_core <= MAX_DLA_CORE
        ):
            raise EngineKeyError(
                f"dla_core: {self.dla_core!r} is not null or a core number 0..{MAX_DLA_CORE}"
            )
        if self.dla_core is not None and self.precision == "fp32":
            # DLA runs FP16 and INT8 only (TensorRT developer guide, "Working with DLA");
            # trtexec silently turns FP16 on for DLA (samples/common/sampleEngines.cpp).
            raise EngineKeyError("dla_core: DLA runs fp16 or int8 only, not fp32")
        if not _int(self.workspace_mib) or not 1 <= self.workspace_mib <= MAX_WORKSPACE_MIB:
            raise EngineKeyError(
                f"workspace_mib: {self.workspace_mib!r} is not 1..{MAX_WORKSPACE_MIB} MiB"
            )

    # -- forms -------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """The key as a plain dict (the manifest section and the key file hold exactly this)."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, separators ``(",", ":")``, ASCII, no trailing newline."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> EngineKey:
        """A key from a dict with exactly :data:`FIELDS` (an unknown or missing field refused)."""
        if not isinstance(data, dict):
            raise EngineKeyError(f"engine key: expected a JSON object, found {type(data).__name__}")
        missing = [name for name in FIELDS if name not in data]
        extra = sorted(str(name) for name in data if name not in FIELDS)
        if missing or extra:
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing))
            if extra:
                parts.append("unknown " + ", ".join(extra))
            raise EngineKeyError("engine key: " + "; ".join(parts))
        return cls(**{name: data[name] for name in FIELDS})

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineKey:
        """A key from its JSON text (any JSON formatting; the content is checked strictly)."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EngineKeyError(f"engine key: not JSON ({exc})") from None
        return cls.from_dict(data)

    # -- layout ------------------------------------------------------------------------------

    @property
    def stem(self) -> str:
        """``<tensorrt>-sm<NN>-<precision>[-dla<N>]``, e.g. ``8.6.2-sm87-fp16``."""
        dla = "" if self.dla_core is None else f"-dla{self.dla_core}"
        return f"{self.tensorrt}-sm{self.sm}-{self.precision}{dla}"

    def plan_path(self, root: str | os.PathLike[str] = ENGINES_DIR) -> Path:
        return Path(root) / self.model_sha256 / (self.stem + PLAN_SUFFIX)

    def key_path(self, root: str | os.PathLike[str] = ENGINES_DIR) -> Path:
        return Path(root) / self.model_sha256 / (self.stem + KEY_SUFFIX)

    def timing_cache_path(self, root: str | os.PathLike[str] = ENGINES_DIR) -> Path:
        """Shared by every model built with this TensorRT on this SM (kept across rebuilds)."""
        return Path(root) / f"timing-{self.tensorrt}-sm{self.sm}.cache"

    def differences(self, other: EngineKey) -> list[str]:
        """One ``field: expected X, found Y`` per differing field (self is the expected key)."""
        return [
            f"{name}: expected {getattr(self, name)!r}, found {getattr(other, name)!r}"
            for name in FIELDS
            if getattr(self, name) != getattr(other, name)
        ]


def sm_from_compute_capability(capability: str) -> int:
    """``"8.7"`` -> 87 (the target file's ``compute_capability``); EngineKeyError otherwise."""
    match = _COMPUTE_CAPABILITY.fullmatch(capability) if isinstance(capability, str) else None
    if match is None:
        raise EngineKeyError(f"compute capability: {capability!r} is not major.minor (e.g. 8.7)")
    return int(match.group(1)) * 10 + int(match.group(2))


def tensorrt_release(version: str) -> str:
    """``major.minor.patch`` of a TensorRT version: "8.6.2.3" -> "8.6.2", "10.3" -> "10.3.0".

    TensorRT's own version macros carry exactly these three (NvInferVersion.h,
    NV_TENSORRT_MAJOR/MINOR/PATCH); the fourth (build) number does not change the engine format
    a runtime accepts within one release.
    """
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise EngineKeyError(f"tensorrt: {version!r} is not a version like 8.6.2")
    parts = [*version.split("."), "0", "0"][:3]
    return ".".join(str(int(part)) for part in parts)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (models can be hundreds of MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_key(path: str | os.PathLike[str]) -> EngineKey:
    """The key in a ``.key.json`` file; EngineKeyError when unreadable, too large or invalid."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise EngineKeyError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_KEY_BYTES:
        raise EngineKeyError(f"{path}: larger than {MAX_KEY_BYTES} bytes, not an engine key")
    try:
        return EngineKey.from_json(raw)
    except EngineKeyError as exc:
        raise EngineKeyError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class PlanStatus:
    """What the engines directory holds for an expected key.

    ``state``: "ready" (plan and an equal key file: load it), "absent" (no plan: build it or
    fall back) or "invalid" (never load it; ``reason`` says why, for
    ``engine: invalid (<reason>)``).
    """

    state: str
    reason: str
    plan: Path
    key_file: Path

    @property
    def ready(self) -> bool:
        return self.state == "ready"


def check_plan(expected: EngineKey, root: str | os.PathLike[str] = ENGINES_DIR) -> PlanStatus:
    """Whether the plan for ``expected`` under ``root`` may be loaded, and why not.

    The builder writes the plan first and its key file last (each by an atomic rename), so a
    plan without its key is an interrupted or foreign build: invalid, never loaded.
    """
    plan, key_file = expected.plan_path(root), expected.key_path(root)
    if plan.parent.is_symlink():
        # The builder never writes through one (engine_build.build): not a plan it made.
        return PlanStatus(
            "invalid", f"{plan.parent.name} is a symlink, not the builder's directory", plan,
            key_file,
        )
    has_plan = plan.is_file() and not plan.is_symlink()
    has_key = key_file.exists() or key_file.is_symlink()
    if not has_plan and not has_key:
        return PlanStatus("absent", "no plan built yet", plan, key_file)
    if not has_plan:
        return PlanStatus("invalid", f"{key_file.name} without its plan", plan, key_file)
    if not has_key:
        return PlanStatus(
            "invalid", f"{plan.name} without its key file (an interrupted build)", plan, key_file
        )
    if key_file.is_symlink() or not key_file.is_file():
        return PlanStatus("invalid", f"{key_file.name} is not a regular file", plan, key_file)
    try:
        found = read_key(key_file)
    except EngineKeyError as exc:
        return PlanStatus("invalid", str(exc), plan, key_file)
    if found != expected:
        return PlanStatus(
            "invalid", "key differs: " + "; ".join(expected.differences(found)), plan, key_file
        )
    if plan.stat().st_size == 0:
        return PlanStatus("invalid", f"{plan.name} is empty", plan, key_file)
    return PlanStatus("ready", "plan matches its key", plan, key_file)
