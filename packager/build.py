"""The build path: model -> inspect -> (optimize) -> fit check -> backend -> manifest -> verify.

Everything is written into a temporary directory beside the output and moved into place only when
the bundle is complete and verified, so a failure at any step leaves nothing half-written.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager import __version__
from packager.backends import get_backend
from packager.backends.base import BuildPlan, BuildRequest
from packager.bundle.manifest import write_manifest
from packager.console import console
from packager.errors import InputError, UsageError
from packager.fit import FitReport, enforce
from packager.models import inspect_model
from packager.models.info import ModelInfo
from packager.targets import LoadedTarget, resolve_target

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEPACK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack"


def bundle_name(request: BuildRequest) -> str:
    """The served model's name: ``--name`` or the model file's stem, as a valid image name."""
    raw = request.name if request.name is not None else request.model.name.split(".")[0]
    name = raw.lower() if request.name is None else raw
    if request.name is None:
        name = re.sub(r"[^a-z0-9._-]+", "-", name).strip("-._") or "model"
    if not _NAME_RE.match(name):
        raise UsageError(
            f"--name: '{raw}' is not a valid bundle name",
            hint="use lower-case letters, digits, '.', '_' and '-' (e.g. mnist-v2)",
        )
    return name


def check_version(version: str) -> str:
    if not _VERSION_RE.match(version):
        raise UsageError(
            f"--version: '{version}' is not a valid version",
            hint="use letters, digits, '.', '_', '+' and '-' (e.g. 1.4.0)",
        )
    return version


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    plan: BuildPlan
    manifest: dict[str, Any]
    json_extra: tuple[tuple[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        target = self.plan.target
        document: dict[str, Any] = {
            "bundle": str(self.bundle),
            "target": target.name,
            "device_class": target.device_class,
            "model_name": self.plan.bundle_name,
            "version": self.plan.version,
            "model": {
                "path": str(self.plan.model.path),
                "digest": self.plan.model.digest,
                "size_bytes": self.plan.model.size_bytes,
            },
            "fit": self.plan.fit.to_json(),
            "manifest": str(self.bundle / "manifest.json"),
        }
        document.update(dict(self.json_extra))
        image = document.get("image")
        if isinstance(image, dict) and "archive" in image:
            image["archive"] = str(self.bundle / str(image["archive"]))
        return document


@dataclass(frozen=True)
class Prepared:
    """Everything decided before any file is written."""

    target: LoadedTarget
    model: ModelInfo
    fit: FitReport
    plan: BuildPlan


def prepare(request: BuildRequest, *, model_path: Path | None = None) -> Prepared:
    """Resolve, inspect, fit-check and plan: no output is written."""
    target = resolve_target(request.target)
    backend = get_backend(target.device_class)
    path = model_path or request.model
    console.status(f"inspecting {request.model}")
    model = inspect_model(path)
    report = backend.fit(request, model, target)
    enforce(report, force=request.force, model_label=request.model.name)
    if not report.fits:
        console.warn(f"{request.model.name} does not fit {target.name}; building anyway (--force)")
    plan = backend.plan(request, model, target, report)
    return Prepared(target=target, model=model, fit=report, plan=plan)


def _output_dir(request: BuildRequest, name: str, version: str) -> Path:
    return request.out if request.out is not None else Path("out") / f"{name}-{version}"


def build(request: BuildRequest) -> BuildResult:
    """Build a bundle for ``request`` and return where it went and what it holds."""
    if not request.model.exists():
        raise InputError(f"{request.model}: model file not found", hint="check the path")
    name = bundle_name(request)
    version = check_version(request.version)
    out = _output_dir(request, name, version).absolute()
    if out.exists() and not (out / "manifest.json").is_file():
        raise UsageError(
            f"--out: {out} exists and is not an edgepack bundle",
            hint="choose another directory or remove it",
        )
    cache_dir = request.cache_dir or default_cache_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model_path = _convert_to_tflite(request, work)
        optimization: dict[str, Any] | None = None
        quantize = effective_quantize(request)
        if quantize:
            model_path, optimization = _optimize(request, quantize, work / "optimize")
        prepared = prepare(request, model_path=model_path)
        plan = prepared.plan
        staging = work / "bundle"
        staging.mkdir()
        backend = get_backend(prepared.target.device_class)
        result = backend.execute(plan, staging, cache_dir)
        meta: dict[str, Any] = {
            "name": plan.bundle_name,
            "version": plan.version,
            "target": _target_meta(prepared.target),
            "model": {
                "source": request.model.name,
                "format": prepared.model.format,
                "digest": prepared.model.digest,
                "size_bytes": prepared.model.size_bytes,
                "inputs": [t.to_json() for t in prepared.model.inputs],
                "outputs": [t.to_json() for t in prepared.model.outputs],
            },
            "fit": prepared.fit.to_json(),
            "builder": {"edgepack": __version__},
        }
        if optimization is not None:
            meta["optimization"] = optimization
        meta.update(dict(result.manifest_extra))
        manifest = write_manifest(staging, meta)
        # No verification pass here: every byte was hashed as it was written (layers, archive
        # blobs, then manifest.json over the finished files), so a second pass would only repeat
        # that work. `edgepack verify` (and install.sh's sha256sum -c) are the independent checks.
        _replace(staging, out)
        console.status(f"bundle written to {out}")
        return BuildResult(bundle=out, plan=plan, manifest=manifest, json_extra=result.json_extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _is_keras(path: Path) -> bool:
    return path.suffix.lower() in (".keras", ".h5") or (
        path.is_dir() and (path / "saved_model.pb").is_file()
    )


def _convert_to_tflite(request: BuildRequest, work: Path) -> Path | None:
    """Keras / SavedModel (any target), or PyTorch for an MCU target -> fully int8 TFLite,
    calibrated on --calibration. Other models go on as they are."""
    from packager.models.torch_tflite import TORCH_SUFFIXES

    if _is_keras(request.model):
        from packager.models.keras import convert_to_int8_tflite as convert
    elif (
        request.model.suffix.lower() in TORCH_SUFFIXES
        and resolve_target(request.target).device_class == "mcu"
    ):
        from packager.models.torch_tflite import convert_torch_to_int8_tflite as convert
    else:
        return None
    console.status(f"converting {request.model.name} to int8 TFLite")
    data = convert(request.model, request.calibration)
    path = work / f"{request.model.name.split('.')[0]}.tflite"
    path.write_bytes(data)
    return path


def effective_quantize(request: BuildRequest) -> str | None:
    """``--quantize``, else the target's preferred precision (``--quantize fp32`` opts out)."""
    if request.quantize is not None:
        return None if request.quantize == "fp32" else request.quantize
    if request.model.suffix.lower() != ".onnx":
        return None
    runtime = getattr(resolve_target(request.target).spec, "runtime", None)
    preferred = getattr(runtime, "preferred_precision", "fp32")
    if preferred == "fp32":
        return None
    choice = (
        "fp16"
        if preferred == "fp16"
        else ("int8-static" if request.calibration else "int8-dynamic")
    )
    console.status(
        f"the target prefers {preferred}: optimizing to {choice} (--quantize fp32 keeps fp32)"
    )
    return choice


def _optimize(request: BuildRequest, quantize: str, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    from packager.optimize import optimize_for_build

    work_dir.mkdir(parents=True)
    path, report = optimize_for_build(
        request.model, quantize, request.calibration, request.eval_dir, work_dir
    )
    return path, dict(report)


def _target_meta(target: LoadedTarget) -> dict[str, Any]:
    spec = target.spec
    meta: dict[str, Any] = {"name": spec.name, "device_class": spec.device_class}
    platform = getattr(spec, "platform", None)
    if platform is not None:
        meta["platform"] = platform.oci
    return meta


def _replace(staging: Path, out: Path) -> None:
    """Move the finished bundle into place; an older bundle there is replaced whole."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    _fsync_dir(out.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
