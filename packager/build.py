"""The build: ``plan_build`` (packager.plan) decides, :func:`execute` runs the plan.

execute: source steps (convert / runtime-compat / optimize / fold constants, as the backend
chose) -> inspect -> fit (once) -> refuse what does not fit -> the backend's plan and execution
-> on-target measurement -> manifest -> provenance -> signature -> atomic move into place.

Everything is written into a temporary directory beside the output and moved into place only when
the bundle is complete, so a failure at any step leaves nothing half-written. This module reaches
a device class only through its backend (packager.backends.base.Backend).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

from packager.backends.base import (
    BuildRequest,
    ConvertStep,
    ExecuteResult,
    FoldConstantsStep,
    OnTargetEval,
    OptimizeStep,
    PackagePlan,
    RuntimeCompatStep,
    created_epoch,
)
from packager.bundle.manifest import (
    BundleMeta,
    FitSection,
    ImageSection,
    Manifest,
    ModelSection,
    Optimization,
    write_manifest,
)
from packager.bundle.signing import load_signer, sign_manifest
from packager.console import console
from packager.digest import sha256_path
from packager.errors import UnsupportedError
from packager.fit import enforce
from packager.models import code_form, inspect_model
from packager.plan import BuildPlan, plan_build
from packager.staging import make_staging_dir, replace_dir

__all__ = ["BuildResult", "build", "execute"]


@dataclass(frozen=True)
class BuildResult:
    """A finished ``edgepack build``: where the bundle is, the plans it was built from, the
    manifest written, and the backend's additions to ``--json`` and to the summary."""

    bundle: Path
    plan: BuildPlan
    package: PackagePlan
    manifest: Manifest
    json_extra: tuple[tuple[str, Any], ...]
    summary: tuple[str, ...] = ()  # the backend's lines for the human summary

    def to_json(self) -> dict[str, Any]:
        target = self.package.target
        document: dict[str, Any] = {
            "bundle": str(self.bundle),
            "target": target.name,
            "device_class": target.device_class,
            "model_name": self.package.bundle_name,
            "version": self.package.version,
            "model": {
                "path": str(self.package.model.path),
                "digest": self.package.model.digest,
                "size_bytes": self.package.model.size_bytes,
            },
            "fit": self.package.fit.to_json(),
            "manifest": str(self.bundle / "manifest.json"),
        }
        folding = self.manifest.model.constant_folding
        if folding is not None:  # what a FoldConstantsStep did, as the manifest records it
            document["model"]["constant_folding"] = folding.model_dump(
                mode="json", exclude_none=True
            )
        document.update(dict(self.json_extra))
        image = document.get("image")
        if isinstance(image, dict) and "archive" in image:
            image["archive"] = str(self.bundle / str(image["archive"]))
        return document


@dataclass(frozen=True)
class SourceOutcome:
    """What running a plan's source steps produced."""

    path: Path  # the model the backend deploys
    conversion: dict[str, Any]  # the conversion's measurements (ONNX route), for the manifest
    compatibility: tuple[str, ...]  # runtime-compat notes, for the manifest
    optimization: dict[str, Any] | None  # the optimize report, when a step optimized
    optimized: OptimizeStep | None  # the optimize step that ran
    baseline: Path  # the model before optimization
    # What constant folding did (packager.models.fold; the manifest's model.constant_folding):
    # None when no step folded, ``ran`` False when polygraphy could not fold the model.
    folding: dict[str, Any] | None = None


def build(request: BuildRequest) -> BuildResult:
    """Build a bundle for ``request`` and return where it went and what it holds."""
    return execute(plan_build(request))


def execute(plan: BuildPlan) -> BuildResult:
    """Run ``plan``: everything in a staging directory beside ``plan.out``, moved into place
    when complete (an older bundle there is replaced whole)."""
    request = plan.request
    # The key is read before anything is written: a bad key leaves no half-built bundle.
    signer = load_signer(request.sign_key) if request.sign_key is not None else None
    out = plan.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named for this process: a later build to the same --out removes it if we are killed.
    work = make_staging_dir(out)
    try:
        source = run_source_steps(plan, work)
        console.status(f"inspecting {request.model}")
        model = inspect_model(source.path)
        backend = plan.backend
        report = backend.fit(request, model, plan.target)
        enforce(report, force=request.force, model_label=request.model.name)
        if not report.fits:
            console.warn(
                f"{request.model.name} does not fit {plan.target.name}; building anyway (--force)"
            )
        package = backend.plan(request, model, plan.target, report)
        staging = work / "bundle"
        staging.mkdir()
        result = backend.execute(package, staging, plan.cache_dir)
        optimization = source.optimization
        if optimization is not None and source.optimized is not None and request.eval_dir:
            optimization = backend.evaluate_on_target(
                package,
                result,
                OnTargetEval(
                    quantize=source.optimized.quantize,
                    baseline=source.baseline,
                    eval_dir=request.eval_dir,
                    report=optimization,
                    bundle=staging,
                    work=work / "on-target",
                ),
            )
        meta = bundle_meta(plan, package, result, source, optimization)
        write_build_provenance(plan, package, staging, result.image, signer)
        manifest = write_manifest(staging, meta)
        if signer is not None:
            keyid = sign_manifest(
                staging,
                signer,
                {"name": package.bundle_name, "version": package.version,
                 "target": package.target.name},
            )
            console.status(f"signed manifest.json with key {keyid[:16]}")
        # No verification pass here: every byte was hashed as it was written (layers, archive
        # blobs, then manifest.json over the finished files), so a second pass would only repeat
        # that work. `edgepack verify` (and install.sh's sha256sum -c) are the independent checks.
        replace_dir(staging, out)
        console.status(f"bundle written to {out}")
        return BuildResult(
            bundle=out,
            plan=plan,
            package=package,
            manifest=manifest,
            json_extra=result.json_extra,
            summary=result.summary,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bundle_meta(
    plan: BuildPlan,
    package: PackagePlan,
    result: ExecuteResult,
    source: SourceOutcome,
    optimization: dict[str, Any] | None,
) -> BundleMeta:
    """What manifest.json says about the bundle (packager.bundle.manifest), from the plan, the
    backend's plan and what executing it produced."""
    from packager.optimize.report import without_host_timing  # only an optimized build needs it

    model = package.model
    return BundleMeta(
        name=package.bundle_name,
        version=package.version,
        target=plan.backend.target_meta(plan.target),
        model=ModelSection.model_validate(
            {
                "source": plan.request.model.name,
                "format": model.format,
                "digest": model.digest,
                "size_bytes": model.size_bytes,
                "inputs": [t.to_json() for t in model.inputs],
                "outputs": [t.to_json() for t in model.outputs],
                "runtime_compatibility": list(source.compatibility) or None,
                "conversion": source.conversion or None,
                "constant_folding": source.folding,
            }
        ),
        fit=FitSection.from_report(result.fit or package.fit),
        image=result.image,
        optimization=None
        if optimization is None
        else Optimization.model_validate(
            {k: v for k, v in without_host_timing(optimization).items() if v is not None}
        ),
        device=result.device,
    )


def _digest_of(path: Path) -> str | None:
    return sha256_path(path)[0] if path.is_file() else None


def write_build_provenance(
    plan: BuildPlan,
    package: PackagePlan,
    staging: Path,
    image: ImageSection | None,
    signer: CryptoSigner | None,
) -> None:
    """``provenance.intoto.json`` (packager.bundle.provenance): subjects are the bundle's files
    (image.tar as its OCI image digest), inputs the model, target file, base, Debian packages
    and wheels (from the SBOM just written), parameters what the command line asked for."""
    from packager.bundle.provenance import dependency, write_provenance
    from packager.bundle.sbom import SBOM_FILE

    request = plan.request
    subjects: dict[str, str] = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(staging).as_posix()
        if image is None or rel != image.archive:
            subjects[rel] = sha256_path(path)[0]
    if image is not None:
        subjects[image.ref] = image.digest.removeprefix("sha256:")
    deps: list[dict[str, Any]] = []
    model_digest = _digest_of(request.model)
    if model_digest is not None:
        deps.append(dependency(f"model:{request.model.name}", model_digest))
    target_file = Path(plan.target.source)
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
        "name": package.bundle_name,
        "version": package.version,
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


def run_source_steps(plan: BuildPlan, work: Path) -> SourceOutcome:
    """Run the backend's source steps in order, in ``work``: the model to deploy and what the
    steps measured. An ONNX model's external data is checked first, before any loader reads
    it."""
    request = plan.request
    if plan.source.format == "onnx":
        from packager.models.onnx import check_external_data

        check_external_data(request.model)
    path = request.model
    baseline = path
    conversion: dict[str, Any] = {}
    notes: list[str] = []
    optimization: dict[str, Any] | None = None
    optimized: OptimizeStep | None = None
    folding: dict[str, Any] | None = None
    for index, step in enumerate(plan.steps):
        if isinstance(step, ConvertStep):
            path = _convert(step, request, work, conversion)
        elif isinstance(step, RuntimeCompatStep):
            # One folder per step: a later check must not write over an earlier one's output.
            path = _runtime_loadable(step, request, path, work / f"compat-{index}", notes)
        elif isinstance(step, FoldConstantsStep):
            path, folding = _fold_constants(path, work / f"fold-{index}")
        else:
            if step.reason:
                console.status(step.reason)
            baseline = path
            path, optimization = _optimize(plan, step, path, work / "optimize")
            optimized = step
    return SourceOutcome(
        path=path,
        conversion=conversion,
        compatibility=tuple(notes),
        optimization=optimization,
        optimized=optimized,
        baseline=baseline,
        folding=folding,
    )


def _fold_constants(path: Path, work_dir: Path) -> tuple[Path, dict[str, Any] | None]:
    """``path`` with its constants folded (packager.models.fold), written to ``work_dir``, and
    the manifest's record of it; one progress line with the node counts. A model with nothing
    to fold is kept as it is (its bytes, hence its digest, unchanged). When polygraphy cannot
    fold the model the build goes on with it unfolded (folding is an optimisation, the engine
    builder parses the model either way), with a warning and ``ran: false`` in the record.
    Other formats pass through, recorded as nothing."""
    if path.suffix.lower() != ".onnx":
        return path, None
    from packager.models.fold import TOOL, fold_constants, tool_version

    version = tool_version()
    tool = f"{TOOL} {version}"
    work_dir.mkdir(parents=True)
    try:
        result = fold_constants(path, work_dir / path.name)
    except UnsupportedError as exc:
        # The build's own directory (named for this process) never reaches the manifest.
        error = exc.one_line().replace(str(work_dir.parent), "<build>")
        console.warn(f"{error}; the model ships unfolded")
        return path, {"tool": TOOL, "version": version, "ran": False, "error": error}
    record = result.to_json()
    if result.folded == 0:
        console.status(f"folding constants ({tool}): {result.nodes_before} -> "
                       f"{result.nodes_after} nodes, nothing to fold: model kept as it is")
        return path, record
    console.status(
        f"folding constants ({tool}): {result.nodes_before} -> {result.nodes_after} nodes"
    )
    return work_dir / path.name, record


def _convert(
    step: ConvertStep, request: BuildRequest, work: Path, report: dict[str, Any]
) -> Path:
    """The source model as a fully int8 TFLite file in ``work``, calibrated on
    --calibration; ``report`` receives what the conversion measured (the ONNX route's agreement
    check), for the manifest."""
    path = work / f"{request.model.name.split('.')[0]}.tflite"
    if step.route == "onnx":
        from packager.models.onnx_tflite import convert_onnx_to_int8_tflite

        console.status(f"converting {request.model.name} to int8 TFLite (onnx2torch, litert-torch)")
        conversion = convert_onnx_to_int8_tflite(request.model, request.calibration)
        console.status(conversion.summary())
        report.update(conversion.to_json())
        path.write_bytes(conversion.data)
        return path
    console.status(f"converting {request.model.name} to int8 TFLite")
    if step.route == "keras":
        from packager.models.keras import convert_to_int8_tflite

        data = convert_to_int8_tflite(
            request.model, request.calibration, trusted=step.trust_model_code
        )
        path.write_bytes(data)
        if code_form(request.model) is not None:  # a SavedModel: its graph ran on the word
            report["trusted_model_code"] = True
        return path
    from packager.models.torch_tflite import convert_torch_to_int8_tflite

    data = convert_torch_to_int8_tflite(
        request.model, request.calibration, trusted=step.trust_model_code
    )
    # The manifest says the bundle's model came from a file whose code ran on the builder's word.
    report["trusted_model_code"] = True
    path.write_bytes(data)
    return path


def _optimize(plan: BuildPlan, step: OptimizeStep, source: Path, work_dir: Path
              ) -> tuple[Path, dict[str, Any]]:
    from packager.optimize import optimize_for_build

    request = plan.request
    work_dir.mkdir(parents=True)
    path, report = optimize_for_build(
        source,
        step.quantize,
        request.calibration,
        request.eval_dir,
        work_dir,
        # The target's cpu.isa chooses the INT8 settings (packager.optimize.cpu).
        target=plan.target,
    )
    return path, dict(report)


def _runtime_loadable(
    step: RuntimeCompatStep, request: BuildRequest, path: Path, work_dir: Path, notes: list[str]
) -> Path:
    """The model ``step``'s runtime loads: ``path`` itself, a converted copy in ``work_dir``,
    or UnsupportedError (exit 10) naming its IR/opsets and the runtime's limits. ``--force``
    builds anyway, with a warning. Other formats pass through."""
    if path.suffix.lower() != ".onnx":
        return path
    from packager.models.runtime_compat import make_loadable, support_for

    console.status(f"checking that {step.engine} {step.version} (the image's) loads {path.name}")
    try:
        result = make_loadable(path, work_dir, support_for(step.version), label=request.model.name)
    except UnsupportedError as exc:
        if not request.force:
            raise
        console.warn(f"{exc.one_line()}; building anyway (--force)")
        return path
    for note in result.notes:
        console.status(note)
    notes.extend(result.notes)
    return result.path if result.converted else path
