"""The Protocol every device-class backend implements, and the typed values it trades.

A device class (Linux containers, microcontrollers, ...) is one package under
``packager/backends/`` registered by one line in :data:`packager.backends.REGISTRY`. The core
(``packager.plan``, ``packager.build``, ``packager.commands``, ``packager.bundle``,
``packager.ota``) reaches it only through :class:`Backend`, and never names a class:
tests/unit/test_device_class_names.py greps for it.

The backend decides, the core runs: :meth:`Backend.source_steps` says how the user's model becomes
the one the device runs (frozen :data:`SourceStep` values the core executes), :meth:`Backend.fit`
and :meth:`Backend.plan` are pure, :meth:`Backend.execute` writes a :class:`PackagePlan` into a
staging directory. The core owns inspection, the fit refusal, the temporary directory, the manifest
and the final atomic move.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from packager.bundle.manifest import ImageSection, TargetInfo
from packager.bundle.manifest import Manifest as Manifest  # backends name it here
from packager.errors import UsageError
from packager.fit import FitReport
from packager.models.info import ModelInfo
from packager.render import RenderedFile as RenderedFile  # backends name it here
from packager.targets import NAME_FORM, LoadedTarget


@dataclass(frozen=True)
class BuildRequest:
    """Everything the user asked for on the command line, typed."""

    model: Path
    target: str  # a catalogue name or a path to a TOML file
    out: Path | None = None
    name: str | None = None
    version: str = "0.1.0"
    force: bool = False
    base: str | None = None  # "oci-archive:PATH" or an OCI layout directory
    cache_dir: Path | None = None
    offline: bool = False
    # Optimization (issue "optimize"): precision, calibration and evaluation data.
    quantize: str | None = None  # "fp16" | "int8-dynamic" | "int8-static"
    calibration: Path | None = None
    eval_dir: Path | None = None
    # Runtime settings that override the target's [runtime] table (None: keep the target's).
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    # The user's word that the model's first axis is its batch axis (--batch-axis 0), for a model
    # whose dimension names do not say so (packager.runtime.model.BATCH_DIM_NAMES).
    batch_axis: int | None = None
    cache_mb: int | None = None
    # OTA: the bundle carries the device agent, set up for this TUF repository.
    ota_repo: str | None = None  # the repository's base URL as devices reach it
    ota_root: Path | None = None  # the repository's trusted root metadata (1.root.json)
    ota_channel: str = "stable"
    options: tuple[tuple[str, str], ...] = ()  # backend-specific --opt key=value
    # Image layers: "gzip" (every engine) or "zstd" (docker >= 23, podman >= 4.1, containerd 1.5+).
    compression: Literal["gzip", "zstd"] = "gzip"
    # Leave out of the image what packager/image/data/slim-policy.toml lists (--no-slim: keep).
    slim: bool = True
    # Sign the manifest (and provenance) with this Ed25519 PEM key (--sign-key / EDGEPACK_SIGN_KEY;
    # packager.bundle.signing); None: an unsigned bundle.
    sign_key: Path | None = None
    # --trust-model-code: the builder vouches for a model file whose loading runs code from it
    # (PyTorch, a TensorFlow SavedModel: packager.models.trust); carried onto the ConvertStep.
    trust_model_code: bool = False


@dataclass(frozen=True)
class CopiedFile:
    """A bundle file copied byte for byte from ``source`` to ``path`` (relative to the bundle
    root) with file mode ``mode``."""

    path: str
    source: Path
    mode: int = 0o644


@dataclass(frozen=True)
class PackagePlan:
    """What a backend will write, computed without side effects."""

    backend: str
    bundle_name: str  # the model name served / the bundle's directory name
    version: str
    target: LoadedTarget
    model: ModelInfo
    fit: FitReport
    rendered: tuple[RenderedFile, ...] = ()
    copied: tuple[CopiedFile, ...] = ()
    # Backend-specific frozen data (an ImageSpec for containers, an McuProject for MCUs).
    payload: Any = None
    context: tuple[tuple[str, Any], ...] = field(default=())  # template context, sorted keys
    offline: bool = False  # never touch the network: everything must come from the cache

    @classmethod
    def for_request(
        cls,
        backend: str,
        request: BuildRequest,
        name: str,
        checked: tuple[LoadedTarget, ModelInfo, FitReport],
        *,
        rendered: tuple[RenderedFile, ...] = (),
        copied: tuple[CopiedFile, ...] = (),
        payload: Any = None,
        context: tuple[tuple[str, Any], ...] = (),
    ) -> PackagePlan:
        """The plan of ``backend`` (its device class) for ``request``: named ``name``
        (:func:`bundle_name` of the request), the request's version and ``--offline``, for the
        ``checked`` (target, model, fit report) the plan was made from; the rest is the class's."""
        target, model, fit = checked
        return cls(
            backend=backend,
            bundle_name=name,
            version=request.version,
            target=target,
            model=model,
            fit=fit,
            rendered=rendered,
            copied=copied,
            payload=payload,
            context=context,
            offline=request.offline,
        )

    def context_dict(self) -> dict[str, Any]:
        return dict(self.context)


@dataclass(frozen=True)
class ExecuteResult:
    """What executing a plan produced, for the manifest, ``--json`` and the build summary."""

    files: tuple[str, ...]  # bundle-relative paths written
    image: ImageSection | None = None  # the manifest's `image`, for a class that builds one
    fit: FitReport | None = None  # the fit measured while executing; None: the plan's estimate
    # The manifest's `device` section: this class's own JSON (its backend types it to read it).
    device: dict[str, Any] | None = None
    json_extra: tuple[tuple[str, Any], ...] = ()  # added to `edgepack build --json`
    # Lines `edgepack build` prints after its own (the MCU firmware proof, where to flash).
    summary: tuple[str, ...] = ()


# --- the source model and the steps that turn it into the deployed one ------------------------

ModelFormat = Literal["onnx", "tflite", "keras", "pytorch"]


@dataclass(frozen=True)
class SourceModel:
    """The user's model before any step: its path and its format by name
    (:func:`packager.models.model_format`; nothing is loaded)."""

    path: Path
    format: ModelFormat


@dataclass(frozen=True)
class ConvertStep:
    """Source -> fully int8 TFLite, calibrated on ``--calibration``. ``route`` is the source
    format the converter reads (packager.models.keras / torch_tflite / onnx_tflite)."""

    route: Literal["onnx", "keras", "pytorch"]
    # The builder's --trust-model-code (BuildRequest), set by packager.plan.plan_build: a form
    # whose loading runs code (packager.models.trust.RUNS_CODE) is loaded only with it.
    trust_model_code: bool = False


@dataclass(frozen=True)
class RuntimeCompatStep:
    """Make an ONNX model loadable by ``engine`` ``version`` (the one the bundle ships), converting
    it down where onnx can (packager.models.runtime_compat); UnsupportedError (exit 10) otherwise,
    a warning under ``--force``. Other formats pass through."""

    engine: Literal["onnxruntime"]
    version: str


@dataclass(frozen=True)
class OptimizeStep:
    """packager.optimize.optimize_for_build to ``quantize``; ``reason`` is printed when the
    choice was not the user's (the target's preferred precision)."""

    quantize: str  # "fp16" | "int8-dynamic" | "int8-static"
    reason: str = ""


@dataclass(frozen=True)
class FoldConstantsStep:
    """Fold an ONNX model's constant subgraphs into initializers with polygraphy
    (packager.models.fold.fold_constants), so the folded file is what is inspected, digested and
    shipped. Folding is an optimisation a build can do without: when polygraphy cannot fold the
    model, the core warns and keeps it unfolded, and the manifest says so
    (``model.constant_folding.ran`` false). Other formats pass through."""


SourceStep = ConvertStep | RuntimeCompatStep | OptimizeStep | FoldConstantsStep


def preferred_quantize(
    request: BuildRequest, source: SourceModel, preferred: str
) -> OptimizeStep | None:
    """The optimization a build gets: ``--quantize`` (``fp32`` opts out), else for an ONNX model
    the target's preferred precision (``fp16``; ``int8`` -> ``int8-static`` with
    ``--calibration``, ``int8-dynamic`` without), else none. One rule for every device class."""
    if request.quantize is not None:
        return None if request.quantize == "fp32" else OptimizeStep(request.quantize)
    if source.format != "onnx" or preferred == "fp32":
        return None
    if preferred == "fp16":
        choice = "fp16"
    else:
        choice = "int8-static" if request.calibration else "int8-dynamic"
    return OptimizeStep(
        choice,
        reason=f"the target prefers {preferred}: optimizing to {choice} "
        "(--quantize fp32 keeps fp32)",
    )


# --- naming -----------------------------------------------------------------------------------


def default_name(model: Path) -> str:
    """The served model's name derived from the model file's name (``resnet50-v1.7.onnx`` ->
    ``resnet50-v1``), normalised into :data:`NAME_FORM`: lower case, other characters and any
    separator run that the OCI grammar refuses (``..``, ``._``, ``___``) become one ``-``,
    separators trimmed from both ends, cut to 63 characters; ``model`` when nothing is left."""
    name = model.name.split(".")[0].lower()
    name = re.sub(r"[^a-z0-9._-]+", "-", name)
    name = re.sub(
        r"[._-]{2,}", lambda m: m.group() if NAME_FORM.matches(f"a{m.group()}a") else "-", name
    )
    name = name.strip("-._")[:63].rstrip("-._")
    return name if NAME_FORM.matches(name) else "model"


def bundle_name(request: BuildRequest) -> str:
    """The bundle's (served model's) name, the one way every class names it: ``--name`` or
    :func:`default_name`; UsageError (exit 2) when ``--name`` is outside :data:`NAME_FORM`."""
    if request.name is None:
        return default_name(request.model)
    # Whole-string match: the name lands in the image reference, install.sh, the unit,
    # supervise.py and C sources.
    if not NAME_FORM.matches(request.name):
        raise UsageError(
            f"--name: {request.name!r} must match {NAME_FORM.description}",
            hint="it is the image's repository name, which podman and docker check",
        )
    return request.name


def checked_options(
    request: BuildRequest, allowed: Mapping[str, tuple[str, ...] | str], device_class: str
) -> dict[str, str]:
    """``request``'s ``--opt KEY=VALUE`` pairs as ``{KEY: VALUE}`` (a repeated KEY keeps its last
    value), each KEY one of ``allowed`` and each VALUE one of ``allowed[KEY]``; where
    ``allowed[KEY]`` is a string it names a free value (``"PATH"``), which the backend checks.

    UsageError (exit 2) otherwise: one line naming ``--opt KEY`` (with the closest known key,
    difflib's 0.6 cutoff as packager.targets uses) and ``device_class``'s keys and values.
    """

    def form(values: tuple[str, ...] | str) -> str:
        return values if isinstance(values, str) else "|".join(values)

    known = ", ".join(f"{key}={form(values)}" for key, values in allowed.items())
    found: dict[str, str] = {}
    for key, value in request.options:
        if key not in allowed:
            match = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
            guess = f" (did you mean '{match[0]}'?)" if match else ""
            raise UsageError(
                f"--opt {key}: not an option of {device_class} targets{guess}",
                hint=f"{device_class} options: {known}",
            )
        values = allowed[key]
        if not isinstance(values, str) and value not in values:
            raise UsageError(
                f"--opt {key}={value}: give {key}={form(values)}",
                hint=f"{device_class} options: {known}",
            )
        found[key] = value
    return found


# The last second datetime (and so oci.iso_time) can write: 9999-12-31T23:59:59Z.
_MAX_EPOCH = 253_402_300_799


def created_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` (seconds) when set and not empty, else 0 (the Unix epoch).

    UsageError (exit 2) when it is set to anything but ASCII digits up to 253402300799
    (9999-12-31T23:59:59Z): the specification (reproducible-builds.org/specs/source-date-epoch)
    says a malformed value SHOULD fail the build rather than be replaced.
    """
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    if not value:
        return 0
    # ASCII digits, whole string: str.isdigit() also passes '²', which int() refuses.
    if not re.fullmatch(r"[0-9]{1,12}", value) or int(value) > _MAX_EPOCH:
        raise UsageError(
            f"SOURCE_DATE_EPOCH={value[:40]!r}: give whole seconds since 1970 in ASCII digits, "
            f"at most {_MAX_EPOCH}, or unset it"
        )
    return int(value)


# --- after the build: try, verify, publish, describe ----------------------------------------


@dataclass(frozen=True)
class OnTargetEval:
    """Input of :meth:`Backend.evaluate_on_target`: the optimization just done and where."""

    quantize: str
    baseline: Path  # the model before optimization (fp32)
    eval_dir: Path  # --eval
    report: dict[str, Any]  # the optimization report so far (packager.optimize)
    bundle: Path  # the staging directory execute wrote
    work: Path  # scratch space, removed with the build's work directory


@dataclass(frozen=True)
class TryRequest:
    """``edgepack run``'s flags; each backend uses those that apply to its bundles."""

    bundle: Path
    port: int = 8080  # 127.0.0.1 port of a served bundle
    engine: str | None = None  # container engine ("podman" | "docker"), None: auto
    smoke_test: bool = False  # start, check ready and one inference, stop
    timeout_s: float = 300.0  # how long to wait for ready
    cpu: str | None = None  # qemu CPU model to emulate instead of the target's (--cpu)
    inputs: tuple[Path, ...] = ()  # .npy files, one inference each (none: zeros)
    kernels: str | None = None  # kernel set to build firmware with (None: the core's default)
    toolchain_tree: str | None = None  # source tree/archive the firmware builds against


@dataclass(frozen=True)
class TryResult:
    """What ``edgepack run`` reports: its ``--json`` document and its human lines."""

    document: dict[str, Any]
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetNote:
    """One extra entry of ``edgepack targets show``: its ``--json`` key and value, and the line
    printed for people."""

    key: str
    value: dict[str, Any]
    line: str


class Backend(Protocol):
    """One device class. Every method is called by the core with a target (or a bundle) of this
    class; see /work/brief/protocol.md for the flow."""

    device_class: ClassVar[str]

    def check_request(self, request: BuildRequest) -> None:
        """This class's flags, checked before any work (nothing read beyond the flags' own
        files, nothing written): UsageError (exit 2) / InputError (exit 3)."""
        ...

    def source_steps(
        self, request: BuildRequest, source: SourceModel, target: LoadedTarget
    ) -> tuple[SourceStep, ...]:
        """How ``source`` becomes the model this class deploys, decided once and purely;
        UnsupportedError (exit 10) for a format the class cannot deploy."""
        ...

    def fit(self, request: BuildRequest, model: ModelInfo, target: LoadedTarget) -> FitReport:
        """Estimate what the (post-steps) model needs on the device (memory/storage or
        RAM/flash)."""
        ...

    def plan(
        self, request: BuildRequest, model: ModelInfo, target: LoadedTarget, fit: FitReport
    ) -> PackagePlan:
        """What :meth:`execute` will write, without side effects."""
        ...

    def execute(self, plan: PackagePlan, staging: Path, cache_dir: Path) -> ExecuteResult:
        """Write ``plan`` into ``staging`` (this class's SBOM included)."""
        ...

    def evaluate_on_target(
        self, plan: PackagePlan, result: ExecuteResult, job: OnTargetEval
    ) -> dict[str, Any]:
        """After an optimization: its report with what this class can measure on the target
        (Linux: INT8 accuracy inside the built image under qemu); ``job.report`` otherwise."""
        ...

    def target_meta(self, target: LoadedTarget) -> TargetInfo:
        """The manifest's ``target`` section: ``name``, ``device_class`` and this class's keys."""
        ...

    def target_notes(self, target: LoadedTarget) -> tuple[TargetNote, ...]:
        """Extra ``edgepack targets show`` entries; () when there are none."""
        ...

    def try_bundle(self, request: TryRequest, manifest: Manifest) -> TryResult:
        """``edgepack run``: try a bundle the core has verified, here (emulated when foreign)."""
        ...

    def verify_bundle(self, root: Path, manifest: Manifest) -> tuple[str, ...]:
        """``edgepack verify`` beyond the checksums: problems, one line each naming the file."""
        ...

    def check_publishable(self, root: Path, manifest: Manifest) -> None:
        """Raise UnsupportedError (exit 10) naming ``manifest.json`` when ``edgepack ota``
        may not publish this bundle."""
        ...

    def release_compatibility(self, root: Path, manifest: Manifest) -> dict[str, str]:
        """What a device must be, beyond platform and device class, to install this bundle as
        an OTA release: the release's ``compat.requires`` (keys and values from
        packager.agent.protocol.REQUIREMENTS, e.g. Jetson ``{"l4t_min": "r36.0.0",
        "l4t_below": "r36.4.0", "sm": "87"}``), which the agent checks against the device
        before accepting it; {} when there is nothing more (Linux). Called after
        check_publishable. VerifyError (exit 8) naming ``manifest.json`` when the manifest's
        own section cannot say."""
        ...
