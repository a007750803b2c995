"""Target definitions: typed models for ``targets/*.toml`` and the catalogue that loads them.

A target file is data, not code. Every section is a pydantic model with unknown keys refused, and
validation problems are reported as ``targets/rpi4.toml: memory.ram_mb: must be a positive
integer`` with a close-match suggestion where one exists.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from packager.errors import TargetError
from packager.resources import targets_dir

DeviceClass = Literal["linux-container", "jetson", "mcu"]
Arch = Literal["arm64", "amd64", "armv7"]
Precision = Literal["fp32", "fp16", "int8"]
PosInt = Annotated[int, Field(gt=0, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Platform(_Section):
    """What an OCI image for the device declares (``os/arch[/variant]``)."""

    os: Literal["linux"] = "linux"
    arch: Arch
    variant: str | None = None

    @property
    def oci(self) -> str:
        return f"{self.os}/{self.arch}" + (f"/{self.variant}" if self.variant else "")


class Cpu(_Section):
    cores: PosInt
    model: str
    isa: tuple[str, ...] = ()
    freq_mhz: PosInt | None = None


class LinuxMemory(_Section):
    ram_mb: PosInt
    # What the OS, drivers and other services keep for themselves; the model gets the rest.
    reserved_mb: NonNegInt = 256


class Storage(_Section):
    kind: Literal["sd", "emmc", "nvme", "ssd", "usb"]
    size_mb: PosInt
    # Space kept free for the OS, logs and a second (rollback) copy of the bundle.
    reserved_mb: NonNegInt = 2048


class Accelerator(_Section):
    kind: Literal["none", "gpu", "npu", "dsp"] = "none"
    name: str | None = None
    tops: float | None = Field(default=None, gt=0)
    compute_capability: str | None = None


class LinuxRuntime(_Section):
    """How the on-device runtime is packaged for a Linux (container) target."""

    engine: Literal["onnxruntime"] = "onnxruntime"
    base: str = "debian:bookworm"
    python: Literal["3.11"] = "3.11"
    container_engine: Literal["docker", "podman"] = "docker"
    port: Annotated[int, Field(gt=0, lt=65536, strict=True)] = 8080
    intra_op_threads: NonNegInt = 0
    inter_op_threads: NonNegInt = 0
    # Resident memory of Python + onnxruntime before any model is loaded.
    overhead_mb: PosInt = 96
    preferred_precision: Precision = "fp32"
    # Dynamic batching (for models with a dynamic batch dimension); 0 turns it off.
    max_batch_size: NonNegInt = 0
    max_queue_delay_us: NonNegInt = 500
    max_queue_size: PosInt = 256
    # LRU response cache, bounded; 0 turns it off.
    cache_mb: NonNegInt = 0
    # onnxruntime's CPU memory arena: off trades some speed for a smaller, steadier RSS;
    # "kSameAsRequested" grows it only by what is asked for (less slack on small devices).
    cpu_mem_arena: bool = True
    arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = "kNextPowerOfTwo"


class JetsonRuntime(_Section):
    engine: Literal["tensorrt"] = "tensorrt"
    jetpack: str
    l4t: str
    base: str
    tensorrt: str
    cuda: str
    port: Annotated[int, Field(gt=0, lt=65536, strict=True)] = 8080
    overhead_mb: PosInt = 600
    preferred_precision: Precision = "fp16"


class Service(_Section):
    """systemd limits for the runtime's unit on the device."""

    memory_max_mb: PosInt | None = None
    cpu_quota_percent: PosInt | None = None
    restart_sec: PosInt = 5
    watchdog_sec: NonNegInt = 30


class McuCore(_Section):
    core: Literal["cortex-m0plus", "cortex-m4", "cortex-m7", "cortex-m33", "xtensa-lx7", "riscv32"]
    freq_mhz: PosInt
    fpu: Literal["none", "fpv4-sp-d16", "fpv5-sp-d16", "fpv5-d16", "single"] = "none"
    dsp: bool = False
    isa: tuple[str, ...] = ()


class McuMemory(_Section):
    ram_kb: PosInt
    flash_kb: PosInt
    # RAM the application keeps outside the tensor arena (stack, I/O buffers, the SDK's heap).
    ram_reserved_kb: NonNegInt = 16
    flash_reserved_kb: NonNegInt = 64


class McuRuntime(_Section):
    engine: Literal["tflite-micro"] = "tflite-micro"
    sdk: Literal["cmake", "zephyr", "esp-idf", "arduino"]
    board: str
    # Percent added to the measured arena; per-architecture alignment and allocator slack.
    arena_margin_percent: NonNegInt = 10
    int8_only: bool = True
    toolchain: str = "arm-none-eabi"


class _TargetBase(_Section):
    schema_version: Literal[1] = 1
    name: str
    description: str
    vendor: str | None = None


class LinuxTarget(_TargetBase):
    device_class: Literal["linux-container"]
    platform: Platform
    cpu: Cpu
    memory: LinuxMemory
    storage: Storage
    accelerator: Accelerator = Accelerator()
    runtime: LinuxRuntime = LinuxRuntime()
    service: Service = Service()


class JetsonTarget(_TargetBase):
    device_class: Literal["jetson"]
    platform: Platform
    cpu: Cpu
    memory: LinuxMemory
    storage: Storage
    accelerator: Accelerator
    runtime: JetsonRuntime
    service: Service = Service()


class McuTarget(_TargetBase):
    device_class: Literal["mcu"]
    mcu: McuCore
    memory: McuMemory
    accelerator: Accelerator = Accelerator()
    runtime: McuRuntime


Target = Annotated[LinuxTarget | JetsonTarget | McuTarget, Field(discriminator="device_class")]


class _TargetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Target


class LoadedTarget(BaseModel):
    """A validated target and where it came from."""

    model_config = ConfigDict(frozen=True)
    spec: Annotated[LinuxTarget | JetsonTarget | McuTarget, Field(discriminator="device_class")]
    source: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device_class(self) -> DeviceClass:
        return self.spec.device_class


_SECTION_MODELS: dict[str, type[BaseModel]] = {
    "linux-container": LinuxTarget,
    "jetson": JetsonTarget,
    "mcu": McuTarget,
}


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        pass
    try:
        return str(Path("targets") / path.resolve().relative_to(targets_dir().resolve()))
    except ValueError:
        return str(path)


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (for key suggestions)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return model


def _suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _friendly(error: Any, root: type[BaseModel], raw: dict[str, Any]) -> tuple[str, str]:
    """Turn one pydantic error into (dotted field path, problem)."""
    loc = [p for p in error["loc"] if p not in _SECTION_MODELS]
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        options = owner.model_fields.keys() if owner else []
        return path, "unknown key" + _suggest(str(loc[-1]), options)
    if kind == "missing":
        return path, "is required"
    if kind == "greater_than" and ctx.get("gt") == 0:
        return path, "must be a positive integer"
    if kind == "greater_than_equal" and ctx.get("ge") == 0:
        return path, "must be zero or a positive integer"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return path, "must be an integer"
    if kind in ("string_type",):
        return path, "must be a string"
    if kind in ("bool_type", "bool_parsing"):
        return path, "must be true or false"
    if kind == "literal_error":
        expected = str(ctx.get("expected", ""))
        options = [o.strip().strip("'") for o in expected.replace(" or ", ",").split(",")]
        given = error.get("input")
        hint = _suggest(str(given), options) if isinstance(given, str) else ""
        return path, f"must be one of {', '.join(o for o in options if o)}{hint}"
    if kind == "union_tag_not_found":
        return "device_class", f"is required (one of {', '.join(_SECTION_MODELS)})"
    if kind == "union_tag_invalid":
        given = ctx.get("tag", "")
        options = list(_SECTION_MODELS)
        return "device_class", (
            f"must be one of {', '.join(options)}" + _suggest(str(given), options)
        )
    if kind == "model_type" or kind == "dict_type":
        return path, "must be a table (a [section] in TOML)"
    return path, str(error["msg"]).rstrip(".").lower()


def parse_target(data: dict[str, Any], source: str) -> LoadedTarget:
    """Validate an already-parsed target document; raise TargetError naming file and field."""
    device_class = data.get("device_class")
    root: type[BaseModel] = _SECTION_MODELS.get(str(device_class), LinuxTarget)
    try:
        parsed = _TargetFile.model_validate({"target": data})
    except ValidationError as exc:
        errors = exc.errors()
        # A bad device_class makes every other field noise: report the tag first. A misspelt key
        # also shows up as a missing one; the unknown key (with its suggestion) is the real fault.
        rank = {"union_tag_invalid": 0, "union_tag_not_found": 0, "extra_forbidden": 1}
        errors.sort(key=lambda e: rank.get(e["type"], 2))
        first = errors[0]
        first = {**first, "loc": tuple(first["loc"][1:])}
        path, problem = _friendly(first, root, data)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise TargetError(f"{source}: {path}: {problem}{more}") from exc
    return LoadedTarget(spec=parsed.target, source=source)


def load_target_file(path: Path) -> LoadedTarget:
    shown = _display_path(path)
    if not path.is_file():
        raise TargetError(f"{shown}: target file not found", hint="check the path to --target")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{shown}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TargetError(f"{shown}: not a UTF-8 text file") from exc
    loaded = parse_target(data, shown)
    return loaded


def catalogue(directory: Path | None = None) -> dict[str, Path]:
    """Names of the shipped targets mapped to their files."""
    root = directory or targets_dir()
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def resolve_target(name_or_path: str, directory: Path | None = None) -> LoadedTarget:
    """A catalogue name (``rpi4``) or a path to a TOML file (``./my-board.toml``)."""
    candidate = Path(name_or_path)
    if name_or_path.endswith(".toml") or candidate.is_file() or "/" in name_or_path:
        return load_target_file(candidate)
    known = catalogue(directory)
    if name_or_path not in known:
        raise TargetError(
            f"unknown target '{name_or_path}'{_suggest(name_or_path, known)}",
            hint="run 'edgepack targets list', or pass a file with --target path/to/file.toml",
        )
    loaded = load_target_file(known[name_or_path])
    if loaded.name != name_or_path:
        raise TargetError(
            f"{loaded.source}: name: is '{loaded.name}' but the file is named "
            f"'{name_or_path}.toml'; make them match"
        )
    return loaded
