"""The small Protocol every device-class backend implements.

A backend turns (ModelInfo, Target, BuildRequest) into a frozen :class:`BuildPlan` with a pure
function, and a separate ``execute`` writes that plan into a staging directory. The core build
(``packager.build``) owns everything around it: inspection, the fit check, the temporary
directory, the manifest and the final atomic move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from packager.fit import FitReport
from packager.models.info import ModelInfo
from packager.targets import LoadedTarget


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


@dataclass(frozen=True)
class RenderedFile:
    """A bundle file produced from a Jinja2 template with the backend's context."""

    path: str  # relative to the bundle root
    template: str  # relative to templates/, e.g. "linux/service.jinja"
    mode: int = 0o644


@dataclass(frozen=True)
class CopiedFile:
    path: str
    source: Path
    mode: int = 0o644


@dataclass(frozen=True)
class BuildPlan:
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

    def context_dict(self) -> dict[str, Any]:
        return dict(self.context)


@dataclass(frozen=True)
class ExecuteResult:
    """What executing a plan produced, for the manifest and ``--json``."""

    files: tuple[str, ...]  # bundle-relative paths written
    manifest_extra: tuple[tuple[str, Any], ...] = ()
    json_extra: tuple[tuple[str, Any], ...] = ()


class Backend(Protocol):
    device_class: ClassVar[str]

    def fit(self, request: BuildRequest, model: ModelInfo, target: LoadedTarget) -> FitReport:
        """Estimate what the model needs on the device (memory/storage or RAM/flash)."""
        ...

    def plan(
        self, request: BuildRequest, model: ModelInfo, target: LoadedTarget, fit: FitReport
    ) -> BuildPlan: ...

    def execute(self, plan: BuildPlan, staging: Path, cache_dir: Path) -> ExecuteResult: ...
