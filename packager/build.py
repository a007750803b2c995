"""The build path: model -> inspect -> (optimize) -> fit check -> backend -> manifest -> verify.

Everything is written into a temporary directory beside the output and moved into place only when
the bundle is complete and verified, so a failure at any step leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from packager import __version__
from packager.backends import get_backend
from packager.backends.base import BuildPlan, BuildRequest
from packager.bundle.manifest import write_manifest
from packager.bundle.signing import load_signer, sign_manifest
from packager.console import console
from packager.digest import sha256_path
from packager.errors import InputError, UnsupportedError, UsageError
from packager.fit import FitReport, enforce
from packager.models import inspect_model
from packager.models.info import ModelInfo
from packager.staging import make_staging_dir
from packager.targets import NAME_FORM, VERSION_FORM, LoadedTarget, resolve_target
from packager.tools.qemu import emulated_cpu


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEPACK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack"


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
    """The served model's name: ``--name`` or :func:`default_name`, as a valid image name."""
    if request.name is None:
        return default_name(request.model)
    # Whole-string match: the name lands in the image reference, install.sh, the unit and
    # supervise.py.
    if not NAME_FORM.matches(request.name):
        raise UsageError(
            f"--name: {request.name!r} must match {NAME_FORM.description}",
            hint="it is the image's repository name, which podman and docker check",
        )
    return request.name


def check_version(version: str) -> str:
    """``--version`` as the image tag; UsageError (exit 2) unless it is a valid OCI tag.

    Semver build metadata (``1.0+b1``) is refused, not rewritten: an OCI tag has no ``+``, and a
    silent mapping would tag the image with a version the user never typed."""
    if VERSION_FORM.matches(version):
        return version
    if "+" in version and VERSION_FORM.matches(version.replace("+", "-")):
        raise UsageError(
            f"--version: {version!r}: '+' (semver build metadata) is not allowed in an image tag",
            hint=f"use '-' instead, e.g. --version {version.replace('+', '-')}",
        )
    raise UsageError(f"--version: {version!r} must match {VERSION_FORM.description}")


def check_request(request: BuildRequest) -> tuple[str, str]:
    """Every flag checked before any work (no model loaded, nothing written): the bundle name
    and version, and the OTA flags. Returns (name, version); UsageError/InputError otherwise."""
    name = bundle_name(request)
    version = check_version(request.version)
    from packager.backends.linux.backend import check_ota_flags

    check_ota_flags(request)
    return name, version


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


def _check_out_parent(out: Path) -> None:
    """UsageError (exit 2) when ``out`` cannot be created: a component above it is a file."""
    for parent in reversed(out.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(
                f"--out: {out}: {parent} is a file, not a directory",
                hint="choose an --out whose parent folders are directories",
            )


def _output_dir(request: BuildRequest, name: str, version: str) -> Path:
    return request.out if request.out is not None else Path("out") / f"{name}-{version}"


def build(request: BuildRequest) -> BuildResult:
    """Build a bundle for ``request`` and return where it went and what it holds."""
    name, version = check_request(request)
    if not request.model.exists():
        raise InputError(f"{request.model}: model file not found", hint="check the path")
    out = _output_dir(request, name, version).absolute()
    _check_out_parent(out)
    if out.exists() and not (out / "manifest.json").is_file():
        raise UsageError(
            f"--out: {out} exists and is not an edgepack bundle",
            hint="choose another directory or remove it",
        )
    # The key is read before anything is written: a bad key leaves no half-built bundle.
    signer = load_signer(request.sign_key) if request.sign_key is not None else None
    cache_dir = request.cache_dir or default_cache_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named for this process: a later build to the same --out removes it if we are killed.
    work = make_staging_dir(out)
    try:
        conversion: dict[str, Any] = {}
        model_path = _convert_to_tflite(request, work, conversion)
        if request.model.suffix.lower() == ".onnx":
            from packager.models.onnx import check_external_data

            # Before any loader reads the model: its external data must be inside its folder.
            check_external_data(request.model)
        compatibility: list[str] = []
        # The runtime the image ships must load the model: checked (and converted down where
        # onnx can) before optimizing, and again on the optimizer's output.
        model_path = _runtime_loadable(request, model_path, work / "compat", compatibility)
        optimization: dict[str, Any] | None = None
        quantize = effective_quantize(request)
        fp32_path = model_path or request.model
        if quantize:
            model_path, optimization = _optimize(
                request, quantize, work / "optimize", source=model_path
            )
            model_path = _runtime_loadable(request, model_path, work / "compat-opt", compatibility)
        prepared = prepare(request, model_path=model_path)
        plan = prepared.plan
        staging = work / "bundle"
        staging.mkdir()
        backend = get_backend(prepared.target.device_class)
        result = backend.execute(plan, staging, cache_dir)
        if optimization is not None:
            image = dict(result.manifest_extra).get("image")
            optimization = _measure_on_target(
                request, prepared, quantize, fp32_path, staging, image, work, optimization
            )
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
        if compatibility:
            meta["model"]["runtime_compatibility"] = compatibility
        if conversion:
            meta["model"]["conversion"] = conversion
        if optimization is not None:
            meta["optimization"] = optimization
        meta.update(dict(result.manifest_extra))
        if prepared.target.device_class == "mcu":
            write_mcu_sbom(prepared, staging)
        write_build_provenance(request, prepared, staging, meta, signer)
        manifest = write_manifest(staging, meta)
        if signer is not None:
            keyid = sign_manifest(
                staging,
                signer,
                {"name": plan.bundle_name, "version": plan.version, "target": plan.target.name},
            )
            console.status(f"signed manifest.json with key {keyid[:16]}")
        # No verification pass here: every byte was hashed as it was written (layers, archive
        # blobs, then manifest.json over the finished files), so a second pass would only repeat
        # that work. `edgepack verify` (and install.sh's sha256sum -c) are the independent checks.
        _replace(staging, out)
        console.status(f"bundle written to {out}")
        return BuildResult(bundle=out, plan=plan, manifest=manifest, json_extra=result.json_extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _digest_of(path: Path) -> str | None:
    return sha256_path(path)[0] if path.is_file() else None


def write_mcu_sbom(prepared: Prepared, staging: Path) -> None:
    """``sbom.cdx.json`` for an MCU bundle: its model, TFLite Micro and generated sources."""
    from packager.backends.linux.backend import created_epoch
    from packager.bundle.sbom import SBOM_FILE, build_mcu_sbom

    files = {
        p.relative_to(staging).as_posix(): sha256_path(p)[0]
        for p in sorted(staging.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }
    model_file = next((f for f in files if f.endswith(".tflite")), "")
    sdk = str(getattr(getattr(prepared.target.spec, "runtime", None), "sdk", "firmware"))
    text = build_mcu_sbom(
        name=prepared.plan.bundle_name,
        version=prepared.plan.version,
        files=files,
        model_file=model_file,
        sdk=sdk,
        epoch=created_epoch(),
    )
    (staging / SBOM_FILE).write_text(text, encoding="utf-8")


def write_build_provenance(
    request: BuildRequest,
    prepared: Prepared,
    staging: Path,
    meta: dict[str, Any],
    signer: CryptoSigner | None,
) -> None:
    """``provenance.intoto.json`` (packager.bundle.provenance): subjects are the bundle's files
    (image.tar as its OCI image digest), inputs the model, target file, base, Debian packages
    and wheels (from the SBOM just written), parameters what the command line asked for."""
    from packager.backends.linux.backend import created_epoch
    from packager.bundle.provenance import dependency, write_provenance
    from packager.bundle.sbom import SBOM_FILE

    image = meta.get("image") if isinstance(meta.get("image"), dict) else None
    subjects: dict[str, str] = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(staging).as_posix()
        if image is None or rel != image.get("archive"):
            subjects[rel] = sha256_path(path)[0]
    if image is not None:
        subjects[str(image["ref"])] = str(image["digest"]).removeprefix("sha256:")
    deps: list[dict[str, Any]] = []
    model_digest = _digest_of(request.model)
    if model_digest is not None:
        deps.append(dependency(f"model:{request.model.name}", model_digest))
    target_file = Path(prepared.target.source)
    target_digest = _digest_of(target_file)
    if target_digest is not None:
        deps.append(dependency(f"target:{target_file.name}", target_digest))
    if request.base and "@sha256:" in request.base:
        deps.append(dependency("base", request.base.rsplit("@sha256:", 1)[1], request.base))
    elif request.base:
        base_path = Path(request.base.removeprefix("oci-archive:").split(":")[0])
        base_digest = _digest_of(base_path)
        if base_digest is not None:
            deps.append(dependency(f"base:{base_path.name}", base_digest))
    sbom = staging / SBOM_FILE
    if sbom.is_file():
        for component in json.loads(sbom.read_text(encoding="utf-8")).get("components", []):
            purl = component.get("purl")
            hashes = {h["alg"]: h["content"] for h in component.get("hashes", [])}
            if purl and "SHA-256" in hashes:
                deps.append(dependency(component["name"], hashes["SHA-256"], purl))
    external: dict[str, Any] = {
        "model": request.model.name,
        "target": Path(request.target).name,
        "name": prepared.plan.bundle_name,
        "version": prepared.plan.version,
        "base": request.base,
        "quantize": request.quantize,
        "calibration": request.calibration.name if request.calibration else None,
        "eval": request.eval_dir.name if request.eval_dir else None,
        "max_batch_size": request.max_batch_size,
        "batch_delay_us": request.max_queue_delay_us,
        "batch_axis": request.batch_axis,
        "cache_mb": request.cache_mb,
        "options": [f"{k}={v}" for k, v in request.options],
        "ota_repo": request.ota_repo,
        "ota_channel": request.ota_channel if request.ota_repo else None,
        "compression": request.compression,
        "slim": request.slim,
        "force": request.force,
        "signed": signer is not None,
    }
    write_provenance(
        staging,
        subjects,
        {k: v for k, v in external.items() if v is not None},
        deps,
        created_epoch(),
        signer,
    )


def _is_keras(path: Path) -> bool:
    return path.suffix.lower() in (".keras", ".h5") or (
        path.is_dir() and (path / "saved_model.pb").is_file()
    )


def _convert_to_tflite(
    request: BuildRequest, work: Path, report: dict[str, Any] | None = None
) -> Path | None:
    """Keras / SavedModel (any target), or PyTorch or ONNX for an MCU target -> fully int8 TFLite,
    calibrated on --calibration. Other models go on as they are. ``report`` receives what the
    conversion measured (the ONNX route's agreement check), for the manifest."""
    from packager.models.torch_tflite import TORCH_SUFFIXES

    if _is_keras(request.model):
        from packager.models.keras import convert_to_int8_tflite as convert
    elif (
        request.model.suffix.lower() in TORCH_SUFFIXES
        and resolve_target(request.target).device_class == "mcu"
    ):
        from packager.models.torch_tflite import convert_torch_to_int8_tflite as convert
    elif (
        request.model.suffix.lower() == ".onnx"
        and resolve_target(request.target).device_class == "mcu"
    ):
        from packager.models.onnx_tflite import convert_onnx_to_int8_tflite

        console.status(f"converting {request.model.name} to int8 TFLite (onnx2torch, litert-torch)")
        conversion = convert_onnx_to_int8_tflite(request.model, request.calibration)
        console.status(conversion.summary())
        if report is not None:
            report.update(conversion.to_json())
        path = work / f"{request.model.name.split('.')[0]}.tflite"
        path.write_bytes(conversion.data)
        return path
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


def _optimize(
    request: BuildRequest, quantize: str, work_dir: Path, *, source: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    from packager.optimize import optimize_for_build

    work_dir.mkdir(parents=True)
    path, report = optimize_for_build(
        source or request.model,
        quantize,
        request.calibration,
        request.eval_dir,
        work_dir,
        # The target's cpu.isa chooses the INT8 settings (packager.optimize.cpu).
        target=resolve_target(request.target),
    )
    return path, dict(report)


def _measure_on_target(
    request: BuildRequest,
    prepared: Prepared,
    quantize: str | None,
    fp32_path: Path,
    staging: Path,
    image: Any,
    work: Path,
    report: dict[str, Any],
) -> dict[str, Any]:
    """The optimization report, its INT8 accuracy measured in the built image on the target's
    emulated CPU where that is another architecture (packager.optimize.on_target)."""
    from packager.backends.linux.backend import MODEL_DIR
    from packager.optimize.on_target import evaluate_in_image, wanted

    if not isinstance(image, dict) or request.eval_dir is None:
        return report
    if not wanted(prepared.target, quantize, request.eval_dir, prepared.plan.model.path):
        return report
    return evaluate_in_image(
        target=prepared.target,
        image=image,
        bundle=staging,
        model_in_image=f"{MODEL_DIR}/{prepared.plan.model.path.name}",
        baseline=fp32_path,
        eval_dir=request.eval_dir,
        report=report,
        work=work / "on-target",
    )


def _runtime_loadable(
    request: BuildRequest, model_path: Path | None, work_dir: Path, notes: list[str]
) -> Path | None:
    """The model the target's onnxruntime loads: ``model_path`` itself, a converted copy in
    ``work_dir``, or UnsupportedError (exit 10) naming its IR/opsets and the runtime's limits.
    ``--force`` builds anyway, with a warning. Other engines and formats pass through."""
    path = model_path or request.model
    runtime = getattr(resolve_target(request.target).spec, "runtime", None)
    if getattr(runtime, "engine", None) != "onnxruntime" or path.suffix.lower() != ".onnx":
        return model_path
    from packager.backends.linux.backend import runtime_requirements
    from packager.models.runtime_compat import make_loadable, support_for

    pins = [r.partition("==")[2] for r in runtime_requirements() if r.startswith("onnxruntime==")]
    if not pins:  # pragma: no cover - packager/runtime/requirements.txt pins it
        raise UsageError("packager/runtime/requirements.txt pins no onnxruntime version")
    console.status(f"checking that onnxruntime {pins[0]} (the image's) loads {path.name}")
    try:
        result = make_loadable(path, work_dir, support_for(pins[0]), label=request.model.name)
    except UnsupportedError as exc:
        if not request.force:
            raise
        console.warn(f"{exc.one_line()}; building anyway (--force)")
        return model_path
    for note in result.notes:
        console.status(note)
    notes.extend(result.notes)
    return result.path if result.converted else model_path


def _target_meta(target: LoadedTarget) -> dict[str, Any]:
    spec = target.spec
    meta: dict[str, Any] = {"name": spec.name, "device_class": spec.device_class}
    platform = getattr(spec, "platform", None)
    if platform is not None:
        meta["platform"] = platform.oci
    cpu = getattr(spec, "cpu", None)
    if cpu is not None:
        # `edgepack run` emulates this CPU model (qemu-user); null: qemu models no such core.
        meta["cpu"] = {
            "model": cpu.model,
            "cores": cpu.cores,
            "qemu": emulated_cpu(cpu.model, cpu.qemu),
        }
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
