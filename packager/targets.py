"""Target definitions: typed models for ``targets/*.toml`` and the catalogue that loads them.

A target file is data, not code. Every section is a pydantic model with unknown keys refused, and
validation problems are reported as ``targets/rpi4.toml: memory.ram_mb: must be a positive
integer`` with a close-match suggestion where one exists.

Targets are shared between teams and downloaded from vendors, and their strings reach shell
scripts, systemd units, Python and C sources in the bundle. So every string field is either a
``Literal`` or checked here, once, against a whole-string allow-list (a :class:`Form`, matched
with ``re.fullmatch``: no trailing newline slips through ``$``); the templates escape each value
again for the language it lands in (``packager.render``).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from packager.agent.protocol import CHANNEL
from packager.bounded import read_bounded
from packager.errors import TargetError
from packager.resources import targets_dir

DeviceClass = Literal["linux-container", "jetson", "mcu"]
Arch = Literal["arm64", "amd64", "armv7"]
Precision = Literal["fp32", "fp16", "int8"]
# Integers are bounded too: no device setting needs more than 2**31 - 1 of anything, and a
# 30-digit number is a hostile or broken file, not a big board.
INT_MAX = 2**31 - 1
PosInt = Annotated[int, Field(gt=0, le=INT_MAX, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, le=INT_MAX, strict=True)]

# Target files are small; a bigger one is not a target (and is not read whole into memory).
MAX_TARGET_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Form:
    """A whole-string allow-list: ``pattern`` must match all of a value (``re.fullmatch``).

    ``description`` is the allowed form in words, as error messages show it.
    """

    pattern: str
    description: str

    def matches(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is not None


# A bundle, unit, container and image name (also --name): exactly one path component of the OCI
# distribution spec's repository-name grammar (`[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`,
# github.com/opencontainers/distribution-spec, spec.md "Pulling manifests"), at most 63
# characters. Podman/docker refuse anything else on `load` ("invalid reference format"), and
# this form needs no quoting anywhere (shell, systemd, Python, C, file names).
NAME_FORM = Form(
    r"(?=[a-z0-9._-]{1,63}\Z)[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*",
    "lower-case letters and digits, separated by single '.' or '_', '__' or runs of '-', "
    "starting and ending with a letter or digit, at most 63 characters (e.g. rpi4)",
)
# --version: exactly an OCI tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`, distribution-spec): the
# image is tagged with it. None of these characters is special to a shell.
VERSION_FORM = Form(
    r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}",
    "letters, digits, '.', '_' and '-', not starting with '.' or '-', at most 128 characters "
    "(an OCI image tag, e.g. 1.4.0 or 1.4.0-rc.1)",
)
# --ota-repo: the URL devices reach the update repository at (the agent takes http(s) and file).
OTA_REPO_FORM = Form(
    r"(https?://([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?(/[A-Za-z0-9._~+/-]*)?"
    r"|file:///[A-Za-z0-9._~+/-]*)",
    "an http://, https:// or file:/// URL of letters, digits and . _ ~ + / - "
    "(no query, spaces or quotes; e.g. https://updates.example.com/edgepack/)",
)
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_FORM = Form(rf"(?=.{{1,253}}\Z){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?", "a DNS host name")


def ota_repo_problem(url: str) -> str | None:
    """Why ``url`` is no usable ``--ota-repo`` (one phrase), or None when it is.

    Beyond :data:`OTA_REPO_FORM`'s characters, the URL is parsed (``urllib.parse.urlsplit``) and
    must be http(s) with a DNS host name or bracketed IP address, a port in 1-65535, no userinfo,
    query or fragment, and a normalised path (no ``.``/``..`` or empty segments); or
    ``file:///ABSOLUTE/PATH`` with the same path rule. Source: RFC 3986 (URI syntax), RFC 1123
    (host names).
    """
    import ipaddress
    from urllib.parse import urlsplit

    if not OTA_REPO_FORM.matches(url):
        return f"must match {OTA_REPO_FORM.description}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "must not carry a user name or password"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "must not have a query or fragment"
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        if host.startswith("[") or ":" in host:
            try:
                ipaddress.IPv6Address(host.strip("[]"))
            except ValueError:
                return f"host {host!r} is not a valid IPv6 address"
        elif not _HOST_FORM.matches(host):
            return f"host {host!r} is not a valid host name"
        if port is not None and not 1 <= port <= 65535:
            return f"port {port} is not in 1-65535"
        if parts.netloc.endswith(":"):
            return "has an empty port"
    elif parts.scheme == "file":
        if parts.netloc:
            return "file URLs must be file:///ABSOLUTE/PATH (no host)"
    else:  # pragma: no cover - OTA_REPO_FORM admits only these schemes
        return "must be an http://, https:// or file:/// URL"
    segments = parts.path.split("/")[1:]
    if any(seg in (".", "..") for seg in segments):
        return "path must not contain '.' or '..' segments"
    if any(seg == "" for seg in segments[:-1]):
        return "path must not contain empty segments ('//')"
    return None


# --ota-channel (and the channel names a repository publishes under, `edgepack ota --channel`):
# the OTA contract's one pattern (packager.agent.protocol.CHANNEL), which the agent holds too.
CHANNEL_FORM = Form(
    CHANNEL.pattern,
    "lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, "
    "at most 63 characters (e.g. stable)",
)
# Prose shown to people (description, vendor, accelerator name): one line, no quotes, no
# shell, systemd or template metacharacters.
TEXT_FORM = Form(
    r"[A-Za-z0-9][A-Za-z0-9 .,()/+_-]{0,199}",
    "one line of letters, digits, spaces and . , ( ) / + _ -, starting with a letter or digit, "
    "at most 200 characters",
)
# Identifiers of hardware and boards: cortex-a72, armv8.2-a, sse4.2, nrf52840dk/nrf52840.
TOKEN_FORM = Form(
    r"[A-Za-z0-9][A-Za-z0-9._+/-]{0,63}",
    "letters, digits, '.', '_', '+', '/' and '-', starting with a letter or digit, "
    "at most 64 characters (e.g. cortex-a72)",
)
# A toolchain prefix names programs (arm-none-eabi-gcc): no dots or slashes.
TOOLCHAIN_FORM = Form(
    r"[a-z0-9][a-z0-9_-]{0,63}",
    "lower-case letters, digits, '_' and '-' (a tool prefix such as arm-none-eabi)",
)
VARIANT_FORM = Form(r"v[0-9]{1,2}", "'v' and a number, as OCI platform variants are (e.g. v8)")
DEBIAN_BASE_FORM = Form(
    r"debian:[a-z]{2,32}", "debian:SUITE with a lower-case Debian suite name (e.g. debian:bookworm)"
)
VERSION_NUMBER_FORM = Form(
    r"r?[0-9]{1,4}(\.[0-9]{1,4}){0,3}", "a dotted version number (e.g. 5.1.2 or r35.4.1)"
)
IMAGE_REF_FORM = Form(
    r"[a-z0-9][a-z0-9._-]{0,127}(:[0-9]{1,5})?(/[a-z0-9][a-z0-9._-]{0,127}){0,8}"
    r"(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?(@sha256:[0-9a-f]{64})?",
    "an image reference of lower-case letters, digits, '.', '_', '-' and '/' with an optional "
    ":tag and @sha256:digest (e.g. nvcr.io/nvidia/l4t-jetpack:r35.4.1)",
)


def _checked(form: Form) -> AfterValidator:
    def check(value: str) -> str:
        if not form.matches(value):
            raise PydanticCustomError(
                "edgepack_form", "must match {form}", {"form": form.description}
            )
        return value

    return AfterValidator(check)


# ``str`` field types that only hold values of their form.
Name = Annotated[str, Field(strict=True), _checked(NAME_FORM)]
Text = Annotated[str, Field(strict=True), _checked(TEXT_FORM)]
Token = Annotated[str, Field(strict=True), _checked(TOKEN_FORM)]
Toolchain = Annotated[str, Field(strict=True), _checked(TOOLCHAIN_FORM)]
# cpu.qemu: a qemu CPU model name (`qemu-aarch64 -cpu help`), passed to qemu-user as QEMU_CPU.
QEMU_CPU_FORM = Form(
    r"[a-z0-9][a-z0-9.-]{0,31}",
    "a qemu CPU model name: lower-case letters, digits, '.' and '-', at most 32 characters "
    "(e.g. cortex-a72; list them with qemu-aarch64-static -cpu help)",
)
QemuCpu = Annotated[str, Field(strict=True), _checked(QEMU_CPU_FORM)]
Variant = Annotated[str, Field(strict=True), _checked(VARIANT_FORM)]
DebianBaseRef = Annotated[str, Field(strict=True), _checked(DEBIAN_BASE_FORM)]
VersionNumber = Annotated[str, Field(strict=True), _checked(VERSION_NUMBER_FORM)]
ImageRef = Annotated[str, Field(strict=True), _checked(IMAGE_REF_FORM)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Platform(_Section):
    """What an OCI image for the device declares (``os/arch[/variant]``)."""

    os: Literal["linux"] = "linux"
    arch: Arch
    variant: Variant | None = None

    @property
    def oci(self) -> str:
        return f"{self.os}/{self.arch}" + (f"/{self.variant}" if self.variant else "")


class Cpu(_Section):
    """``[cpu]``: core count, model (``cortex-a72``), ISA extensions and clock (MHz); ``qemu``
    names the CPU ``edgepack run`` emulates instead."""

    cores: PosInt
    model: Token
    isa: tuple[Token, ...] = ()
    freq_mhz: PosInt | None = None
    # The CPU `edgepack run` emulates (qemu-user -cpu); unset: the qemu model named like
    # cpu.model (packager.tools.qemu.QEMU_CPU_MODELS).
    qemu: QemuCpu | None = None


class LinuxMemory(_Section):
    """``[memory]`` of a Linux or Jetson target, in MiB (the fit check counts MB as 2**20)."""

    ram_mb: PosInt
    # What the OS, drivers and other services keep for themselves; the model gets the rest.
    reserved_mb: NonNegInt = 256


class Storage(_Section):
    """``[storage]``: the device's storage medium and its size, in MiB (2**20)."""

    kind: Literal["sd", "emmc", "nvme", "ssd", "usb"]
    size_mb: PosInt
    # Space kept free for the OS, logs and a second (rollback) copy of the bundle.
    reserved_mb: NonNegInt = 2048


class Accelerator(_Section):
    """``[accelerator]``: its kind and name, peak ``tops`` (tera-operations per second) and a
    GPU's CUDA compute capability (MAJOR.MINOR, required on a Jetson)."""

    kind: Literal["none", "gpu", "npu", "dsp"] = "none"
    name: Text | None = None
    # Strict like every other number: "12" and true are type errors, not 12.0 and 1.0; bounded
    # like the integers (no accelerator has 2**31 - 1 TOPS, 1e40 is a broken file).
    tops: float | None = Field(default=None, gt=0, le=INT_MAX, allow_inf_nan=False, strict=True)
    compute_capability: VersionNumber | None = None


class ServerSettings(_Section):
    """The container and server settings every class that serves a model over HTTP in a
    container shares (``[runtime]`` of Linux and Jetson targets); a Jetson target's Linux view
    (packager.backends.jetson.backend.linux_view) copies exactly these fields."""

    container_engine: Literal["docker", "podman"] = "docker"
    port: Annotated[int, Field(gt=0, lt=65536, strict=True)] = 8080
    # onnxruntime's thread pools (on Jetson: the onnxruntime fallback's); 0: one per core.
    intra_op_threads: NonNegInt = 0
    inter_op_threads: NonNegInt = 0
    # Resident memory of the runtime before any model is loaded (each class sets its own).
    overhead_mb: PosInt
    preferred_precision: Precision
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


class LinuxRuntime(ServerSettings):
    """How the on-device runtime is packaged for a Linux (container) target."""

    engine: Literal["onnxruntime"] = "onnxruntime"
    # The apt sources of the image are built from the suite named here (packager.image.debian).
    base: DebianBaseRef = "debian:bookworm"
    python: Literal["3.11"] = "3.11"
    # Resident memory of Python + onnxruntime before any model is loaded.
    overhead_mb: PosInt = 96
    preferred_precision: Precision = "fp32"


def version_tuple(value: str) -> tuple[int, ...]:
    """``"r36.3.0"`` / ``"8.6.2"`` -> ``(36, 3, 0)`` / ``(8, 6, 2)`` (a :data:`VERSION_NUMBER_FORM`
    value), for ordering releases numerically."""
    return tuple(int(part) for part in value.removeprefix("r").split("."))


# An L4T release as /etc/nv_tegra_release names it: "# R36 (release), REVISION: 3.0" is r36.3.0.
# No leading zeros: the device's own reading (packager.runtime.jetson_preflight) has none.
L4T_FORM = Form(
    r"r[1-9][0-9]\.(0|[1-9][0-9]?)\.(0|[1-9][0-9]?)", "an L4T release rMM.N.P (e.g. r36.3.0)"
)
# TensorRT as the engine key and the on-device check compare it: major.minor.patch.
TRT_FORM = Form(
    r"[1-9][0-9]?\.(0|[1-9][0-9]?)\.(0|[1-9][0-9]?)", "a TensorRT version N.N.N (e.g. 8.6.2)"
)
L4tRelease = Annotated[str, Field(strict=True), _checked(L4T_FORM)]
TrtVersion = Annotated[str, Field(strict=True), _checked(TRT_FORM)]
# JetPack generations by L4T major release, and what their container must carry. Source: NVIDIA
# "Jetson Containers" / nvidia-container-toolkit docs: on r32 the NVIDIA container runtime mounts
# CUDA, cuDNN and TensorRT from the host (the files listed in /etc/nvidia-container-runtime/
# host-files-for-container.d/*.csv) into an l4t-base container; from r35 the container carries
# them itself (l4t-jetpack / l4t-tensorrt); only the L4T core driver libraries come from the host.
JetsonGeneration = Literal["r32", "r35", "r36"]
CONTAINER_CONTRACTS: dict[str, str] = {
    "r32": "l4t-base + CSV mounts: the NVIDIA container runtime mounts CUDA/cuDNN/TensorRT "
    "from the host",
    "r35": "l4t-jetpack / l4t-tensorrt: the container carries CUDA/cuDNN/TensorRT",
    "r36": "l4t-jetpack / l4t-tensorrt: the container carries CUDA/cuDNN/TensorRT",
}


class JetsonRuntime(ServerSettings):
    """How the runtime is packaged for an NVIDIA Jetson: the JetPack container it runs on and the
    TensorRT engine built on the device (packager.backends.jetson)."""

    engine: Literal["tensorrt"] = "tensorrt"
    jetpack: VersionNumber
    # The L4T release the bundle is built for, and the releases its preflight accepts on the
    # device: l4t_min (inclusive) up to l4t_below (exclusive); default: the JetPack container
    # compatibility rule of packager.runtime.jetson_preflight.supported_l4t_range.
    l4t: L4tRelease
    l4t_min: L4tRelease | None = None
    l4t_below: L4tRelease | None = None
    # The JetPack container (l4t-base for r32, l4t-jetpack / l4t-tensorrt for r35+). The build
    # takes it only pinned by digest (``REPO[:TAG]@sha256:HEX``); an unpinned one is refused.
    base: ImageRef
    # The base's CPython (``/usr/bin/pythonX.Y``) and glibc (manylinux tags of the runtime's
    # wheels): Ubuntu 18.04 / 20.04 / 22.04 under JetPack 4 / 5 / 6.
    python: Literal["3.6", "3.8", "3.10", "3.11"]
    glibc: Annotated[str, Field(strict=True), _checked(Form(r"2\.[0-9]{2}", "2.NN"))]
    tensorrt: TrtVersion
    cuda: VersionNumber
    # NVDLA cores on the module, and the one the engine is built for (None: the GPU).
    dla_cores: Annotated[int, Field(ge=0, le=16, strict=True)] = 0
    dla_core: Annotated[int, Field(ge=0, le=15, strict=True)] | None = None
    # trtexec's workspace memory pool for tactics (MiB).
    workspace_mib: Annotated[int, Field(gt=0, le=1024 * 1024, strict=True)] = 1024
    # The CUDA/TensorRT container and its runtime before any model is loaded.
    overhead_mb: PosInt = 600
    preferred_precision: Precision = "fp16"

    @property
    def generation(self) -> JetsonGeneration:
        major = self.l4t.split(".")[0]
        return "r32" if major == "r32" else ("r35" if major == "r35" else "r36")

    @property
    def l4t_range(self) -> tuple[str, str]:
        """(lowest release, first release above) the device may run: ``l4t_min`` inclusive,
        ``l4t_below`` exclusive."""
        from packager.runtime.jetson_preflight import supported_l4t_range

        low, below = supported_l4t_range(self.l4t.removeprefix("r"))
        default_low = "r" + ".".join(str(p) for p in low)
        default_below = "r" + ".".join(str(p) for p in below)
        return self.l4t_min or default_low, self.l4t_below or default_below

    @property
    def consistency_problem(self) -> str | None:
        if self.dla_core is not None and self.dla_core >= self.dla_cores:
            return f"dla_core {self.dla_core} but the module has {self.dla_cores} DLA core(s)"
        low, below = self.l4t_range
        if not version_tuple(low) <= version_tuple(self.l4t) < version_tuple(below):
            return f"l4t {self.l4t} is outside l4t_min..l4t_below ({low} up to {below})"
        return None


class Service(_Section):
    """systemd limits for the runtime's unit on the device."""

    # Bounded by what the engines' run flags take (packager.agent.confinement.FLAGS): 1 TiB and
    # 256 CPUs are beyond any edge device.
    memory_max_mb: Annotated[int, Field(gt=0, le=1024 * 1024, strict=True)] | None = None
    cpu_quota_percent: Annotated[int, Field(gt=0, le=256 * 100, strict=True)] | None = None
    restart_sec: PosInt = 5
    watchdog_sec: NonNegInt = 30


class McuCore(_Section):
    """``[mcu]``: the microcontroller's core, clock (MHz), FPU, DSP extension and ISA tokens."""

    core: Literal["cortex-m0plus", "cortex-m4", "cortex-m7", "cortex-m33", "xtensa-lx7", "riscv32"]
    freq_mhz: PosInt
    fpu: Literal["none", "fpv4-sp-d16", "fpv5-sp-d16", "fpv5-d16", "single"] = "none"
    dsp: bool = False
    isa: tuple[Token, ...] = ()


class McuMemory(_Section):
    """``[memory]`` of an MCU target: RAM and flash in KiB (the fit check counts KB as 1024
    bytes), what the application keeps of each, and the flash base address (bytes)."""

    ram_kb: PosInt
    flash_kb: PosInt
    # RAM the application keeps outside the tensor arena (stack, I/O buffers, the SDK's heap).
    ram_reserved_kb: NonNegInt = 16
    flash_reserved_kb: NonNegInt = 64
    # Address of the first flash byte as the CPU sees it (0 on nRF52, 0x08000000 on STM32; a
    # flash offset on ESP32): the model-update slots are placed from it. flash_reserved_kb is
    # kept free at the top of flash.
    flash_base: NonNegInt = 0


class McuRuntime(_Section):
    """``[runtime]`` of an MCU target: TFLite Micro built with ``sdk`` for ``board`` by the
    ``toolchain``-prefixed compiler; ``int8_only`` refuses a model with float tensors."""

    engine: Literal["tflite-micro"] = "tflite-micro"
    sdk: Literal["cmake", "zephyr", "esp-idf", "arduino"]
    board: Token
    # Percent added to the measured arena; per-architecture alignment and allocator slack.
    arena_margin_percent: NonNegInt = 10
    int8_only: bool = True
    toolchain: Toolchain = "arm-none-eabi"


class _TargetBase(_Section):
    schema_version: Literal[1] = 1
    name: Name
    description: Text
    vendor: Text | None = None


class LinuxTarget(_TargetBase):
    """A ``device_class = "linux-container"`` target: a Linux board or PC that serves the
    model from an OCI container under systemd."""

    device_class: Literal["linux-container"]
    platform: Platform
    cpu: Cpu
    memory: LinuxMemory
    storage: Storage
    accelerator: Accelerator = Accelerator()
    runtime: LinuxRuntime = LinuxRuntime()
    service: Service = Service()


class JetsonTarget(_TargetBase):
    """A ``device_class = "jetson"`` target: an NVIDIA Jetson serving the model from a JetPack
    container with a TensorRT engine; a missing or malformed compute capability, a ``dla_core``
    the module lacks or an ``l4t`` outside ``l4t_min``..``l4t_below`` is refused."""

    device_class: Literal["jetson"]
    platform: Platform
    cpu: Cpu
    memory: LinuxMemory
    storage: Storage
    accelerator: Accelerator
    runtime: JetsonRuntime
    service: Service = Service()

    @model_validator(mode="after")
    def _consistent(self) -> JetsonTarget:
        if self.accelerator.compute_capability is None:
            raise PydanticCustomError(
                "edgepack_jetson",
                "accelerator.compute_capability: is required for a Jetson (e.g. 8.7)",
            )
        if not re.fullmatch(r"[1-9]\.[0-9]", self.accelerator.compute_capability):
            raise PydanticCustomError(
                "edgepack_jetson", "accelerator.compute_capability: must be MAJOR.MINOR (e.g. 8.7)"
            )
        problem = self.runtime.consistency_problem
        if problem is not None:
            raise PydanticCustomError("edgepack_jetson", "runtime: {problem}", {"problem": problem})
        return self

    @property
    def sm(self) -> int:
        """The GPU's SM number from ``accelerator.compute_capability`` ("8.7" -> 87)."""
        assert self.accelerator.compute_capability is not None  # _consistent
        return int(self.accelerator.compute_capability.replace(".", ""))


class McuTarget(_TargetBase):
    """A ``device_class = "mcu"`` target: a microcontroller that gets a TFLite Micro C project."""

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
    loc = list(error["loc"])
    # The union's tag (device_class) heads the location; a section may share its name ("mcu").
    if loc and loc[0] in _SECTION_MODELS:
        loc = loc[1:]
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        options = owner.model_fields.keys() if owner else []
        return path, "unknown key" + _suggest(str(loc[-1]), options)
    if kind == "missing":
        return path, "is required"
    if kind == "edgepack_jetson":  # JetsonTarget's cross-field checks: "FIELD: problem"
        field, _, problem = str(error["msg"]).partition(": ")
        return field, problem
    if kind == "edgepack_form":
        return path, f"must match {ctx.get('form', 'its allowed form')}"
    if kind == "greater_than" and ctx.get("gt") == 0:
        if isinstance(error.get("input"), float):
            return path, "must be a positive number"
        return path, "must be a positive integer"
    if kind == "finite_number":
        return path, "must be a finite number"
    if kind == "less_than_equal":
        limit = ctx.get("le")
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return path, f"must be at most {limit}"
    if kind == "greater_than_equal" and ctx.get("ge") == 0:
        return path, "must be zero or a positive integer"
    if kind in ("float_type", "float_parsing"):
        return path, "must be a number (not a string or true/false)"
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
    """The validated target in the TOML file at ``path`` (at most 1 MiB); TargetError (exit 4)
    naming the file (relative to the working directory or as ``targets/NAME.toml``) when it is
    missing, unreadable, not UTF-8 TOML or invalid (:func:`parse_target`)."""
    shown = _display_path(path)
    # Only a path that is not there is "not found": a directory, FIFO or device is there, and
    # read_bounded says what it is (never waiting on a FIFO).
    if not path.exists():
        raise TargetError(f"{shown}: target file not found", hint="check the path to --target")
    raw = read_bounded(path, MAX_TARGET_FILE_BYTES, error=TargetError, shown=shown,
                       what="not a target file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{shown}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise TargetError(f"{shown}: not a UTF-8 text file") from exc
    except RecursionError as exc:
        # tomllib recurses once per nested array or inline table.
        raise TargetError(f"{shown}: not valid TOML: nested too deeply") from exc
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
