"""NVIDIA Jetson: the Linux container bundle, on the target's JetPack container, with the key of
the TensorRT engine the device builds for itself.

A Jetson bundle is a Linux container bundle plus what TensorRT needs, so this backend reuses the
Linux backend whole (packager.backends.linux.backend: image spec, runtime and model layers,
wheels, OCI writer, templates, confinement, SBOM, OTA files) through the *Linux view* of the
target (:func:`linux_view`: its platform, CPU, memory, storage and server settings), and changes
only what differs:

- the image's base: the JetPack container pinned by digest in the target file (or ``--base``),
  its CPython and glibc for the runtime's wheels; or, for a generation whose CPython cannot run
  edgepack's runtime, edgepack's Debian base and an explicit onnxruntime-CPU fallback
  (packager.backends.jetson.container);
- runtime.json's ``engine`` section (the engine key, /work/brief/jetson.md), read by
  packager/runtime/tensorrt_runner.py;
- the units: the serving unit starts after ``edgepack-<name>-engine.service`` (the first-boot
  preflight and trtexec build, templates/jetson/engine-build.service.jinja), and runs the
  container with the GPU as its engine gives it (docker's NVIDIA runtime, podman's CDI
  device) and the engines directory bound read-only;
- the manifest's ``device`` section: engine key, L4T range, SM, TensorRT, serving mode.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from packager.agent import confinement
from packager.agent.protocol import check_requires
from packager.backends.base import (
    BuildRequest,
    CopiedFile,
    ExecuteResult,
    FoldConstantsStep,
    OnTargetEval,
    PackagePlan,
    RenderedFile,
    RuntimeCompatStep,
    SourceModel,
    SourceStep,
    TargetNote,
    TryRequest,
    TryResult,
    bundle_name,
    checked_options,
)
from packager.backends.engine_on import AddedFile, EngineBuildOn
from packager.backends.jetson.container import (
    ContainerChoice,
    choose,
    describe,
    wheel_requirements,
)
from packager.backends.jetson.int8 import plan_model
from packager.backends.jetson.manifest import JetsonSection
from packager.backends.jetson.qdq_lint import check_qdq
from packager.backends.jetson.reference import write_reference
from packager.backends.linux import backend as linux
from packager.backends.linux.fit import linux_fit
from packager.bundle.manifest import MANIFEST, Manifest, TargetInfo
from packager.console import console
from packager.errors import InputError, TargetError, UnsupportedError, VerifyError
from packager.fit import FitReport
from packager.image.spec import ImageConfig, ImageResult, ImageSpec, WheelSet
from packager.models.info import ModelInfo
from packager.render import render_files
from packager.resources import runtime_dir
from packager.runtime.engine_key import EngineKey, EngineKeyError
from packager.runtime.trtexec import form as trtexec_form
from packager.targets import (
    JetsonTarget,
    LinuxRuntime,
    LinuxTarget,
    LoadedTarget,
    ServerSettings,
)

ENGINES_DIR = confinement.ENGINES_DIR
# Options of `--opt KEY=VALUE` this class takes.
# `--opt KEY=VALUE` this class takes (a string: a free value, checked where it is used).
OPTIONS: dict[str, tuple[str, ...] | str] = {"timing-cache": "PATH", "emulate": ("on", "off")}
TIMING_CACHE = "engine/timing.cache"
REFERENCE_DIR = "reference"
TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
# The engine unit's limits: free space for a plan and trtexec's scratch files (MiB); the build's
# own time limit (s; first builds take about 9.5 min on an Orin in one NVIDIA/TensorRT report,
# longer on a Nano); a journal progress line at least this often (s).
MIN_FREE_MIB = 1024
BUILD_TIMEOUT_S = 3600
PROGRESS_S = 30
# The serving container's flags beyond the confinement, per container engine, allow-listed
# exactly there (packager.agent.confinement.NVIDIA_JETSON): the GPU as the engine gives it
# (docker: the NVIDIA container runtime, named since JetPack's docker has it as its default only
# when set in daemon.json; podman: the CDI device nvidia.com/gpu=all, as the engine unit and the
# preflight expect), the video group that owns /dev/nvhost-* and /dev/nvmap, and the engines
# read-only. The Linux backend writes them as confinement.json's device_args (the OTA agent) and
# renders them into the unit's supervise.py and install-container.sh (plan context
# "device_args"), each of which picks the list by the engine's file name.
GPU_RUN_ARGS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(confinement.NVIDIA_JETSON.items())


def _words(flag: str) -> tuple[str, str]:
    """``"--runtime=nvidia"`` -> ``("--runtime", "nvidia")``: one ``--name=value`` flag as two
    argv words (the value may hold ``=``: ``nvidia.com/gpu=all``)."""
    name, _, value = flag.partition("=")
    return name, value


# The engine unit's GPU access per container engine (templates/jetson/engine-build.service.jinja,
# its context's ``engine.gpu_args``): THE table's flag (packager.agent.confinement.GPU, as the
# serving container and the agent's prepare step get it) as two argv words, the form the unit
# and the preflight's own check (packager/runtime/jetson_preflight.py gpu_run_args, which cannot
# import the agent: tests/unit/backends/jetson/test_backend.py holds the two equal) use.
UNIT_GPU_ARGS: tuple[tuple[str, tuple[str, str]], ...] = tuple(
    (engine, _words(confinement.GPU[engine])) for engine in confinement.ENGINES
)


def linux_view(spec: JetsonTarget) -> LinuxTarget:
    """The Linux container settings of a Jetson target (validated like any target): its platform,
    CPU, memory, storage, accelerator and service limits, and its server settings. The image's
    base and Python are set by this backend, not by this view."""
    runtime = spec.runtime
    return LinuxTarget(
        name=spec.name,
        description=spec.description,
        vendor=spec.vendor,
        device_class="linux-container",
        platform=spec.platform,
        cpu=spec.cpu,
        memory=spec.memory,
        storage=spec.storage,
        accelerator=spec.accelerator,
        service=spec.service,
        # The server settings both classes share, field for field (targets.ServerSettings).
        runtime=LinuxRuntime(
            **{field: getattr(runtime, field) for field in ServerSettings.model_fields}
        ),
    )


def _spec(target: LoadedTarget) -> JetsonTarget:
    spec = target.spec
    assert isinstance(spec, JetsonTarget)
    return spec


def _onnx_only(path: Path, model_format: str, target: LoadedTarget) -> JetsonTarget:
    """The target's spec, for an ONNX model; UnsupportedError (exit 10) for any other format:
    TensorRT's parser reads ONNX only. Checked for the source model and again for the model
    the plan is made of."""
    spec = _spec(target)
    if model_format != "onnx":
        raise UnsupportedError(
            f"{path.name}: {model_format} models cannot be built for {spec.name}",
            hint="export the model to ONNX: TensorRT builds its engine from ONNX",
        )
    return spec


def options(request: BuildRequest) -> dict[str, str]:
    """``--opt`` values this class knows (:data:`OPTIONS`: ``emulate``, which ``build
    --no-emulate`` sets for every device class, changes nothing here: the engine is built on the
    device, never emulated); UsageError (exit 2) for any other key or value."""
    return checked_options(request, OPTIONS, "Jetson")


def timing_cache(request: BuildRequest) -> Path | None:
    """The trtexec timing cache of ``--opt timing-cache=PATH``, shipped as ``engine/timing.cache``;
    None without it; InputError (exit 3) when PATH is not a file."""
    value = options(request).get("timing-cache")
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise InputError(
            f"--opt timing-cache={value}: no such file",
            hint="pass a trtexec timing cache (--timingCacheFile) from a device of this target",
        )
    return path


def precision_of(request: BuildRequest, spec: JetsonTarget) -> str:
    """The engine's precision (packager.backends.jetson.int8.plan_model: ``--quantize``, else
    the target's preferred precision)."""
    return plan_model(request.quantize, spec.runtime.preferred_precision,
                      calibration=request.calibration).precision


def engine_key(model: ModelInfo, precision: str, spec: JetsonTarget) -> dict[str, Any]:
    """The engine key (/work/brief/jetson.md): what the plan on the device is built for."""
    return {
        "model_sha256": model.digest.removeprefix("sha256:"),
        "tensorrt": spec.runtime.tensorrt,
        "sm": spec.sm,
        "precision": precision,
        "dla_core": spec.runtime.dla_core,
        "workspace_mib": spec.runtime.workspace_mib,
    }


# Where each engine key field comes from in the target file (for check_device_can_build).
_KEY_FIELDS = {
    "tensorrt": "runtime.tensorrt",
    "sm": "accelerator.compute_capability",
    "dla_core": "runtime.dla_core",
    "workspace_mib": "runtime.workspace_mib",
    "precision": "runtime.preferred_precision (or --quantize)",
    "model_sha256": "the model's sha256",
}


def check_device_can_build(key: dict[str, Any], source: str) -> None:
    """The device's builder accepts ``key`` (packager.runtime.engine_key.EngineKey) and knows a
    trtexec command line for its TensorRT (packager.runtime.trtexec.form); otherwise the bundle
    would build and verify, and every device would fail at first boot (a leading zero such as
    "08.6.2", or TensorRT 8.0 / 9.x). TargetError naming the target file and field."""
    try:
        trtexec_form(EngineKey(**key).tensorrt)
    except EngineKeyError as exc:
        name, _, problem = str(exc).partition(": ")
        raise TargetError(
            f"{source}: {_KEY_FIELDS.get(name, name)}: {problem}",
            hint="fix the target file: the device's engine builder takes TensorRT 8.2-8.6 or "
            "10.x as major.minor.patch (packager/runtime/trtexec.py)",
        ) from None


def prepare_step(python: str) -> confinement.Prepare:
    """The engine build as the OTA agent's prepare step (packager.agent.confinement): an update
    has no first-boot unit to build its plan, so the agent runs ``edgepack_runtime.engine_build
    --from-config`` (the key and model from the image's runtime.json) in the new image before
    starting it, waiting as long as the first-boot unit does (BUILD_TIMEOUT_S + 900 s)."""
    assert confinement.RUNTIME_CONFIG == f"{linux.MODEL_DIR}/runtime.json"
    return confinement.engine_build_step(python, BUILD_TIMEOUT_S + 900)


def plan_stem(key: dict[str, Any]) -> str:
    """``<tensorrt>-sm<NN>-<precision>[-dla<N>]``: the plan's file name without suffix."""
    dla = f"-dla{key['dla_core']}" if key["dla_core"] is not None else ""
    return f"{key['tensorrt']}-sm{key['sm']}-{key['precision']}{dla}"


def _with_interpreter(config: ImageConfig, python: str) -> ImageConfig:
    def swap(args: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(python if a == linux.PYTHON else a for a in args)

    health = config.healthcheck
    return dataclasses.replace(
        config,
        entrypoint=swap(config.entrypoint),
        healthcheck=None if health is None else dataclasses.replace(health, test=swap(health.test)),
    )


def jetson_image_spec(
    request: BuildRequest,
    model: ModelInfo,
    target: LoadedTarget,
    name: str,
    choice: ContainerChoice,
    engine: dict[str, Any],
) -> ImageSpec:
    """The Linux image spec of the view, on the chosen base and CPython, with the engine section
    in runtime.json."""
    view = linux_view(_spec(target))
    view_target = LoadedTarget(spec=view, source=target.source)
    spec = linux.image_spec(request, model, view, name, request.version, view_target,
                            runtime_extra={"engine": engine})
    changes: dict[str, Any] = {}
    if choice.base is not None and request.base is None:
        changes["base"] = choice.base
    if spec.wheels is not None and choice.python != "3.11":
        changes["wheels"] = WheelSet(
            requirements=wheel_requirements(choice, linux.runtime_requirements()),
            python_version=choice.python,
            site_packages=spec.wheels.site_packages,
            interpreter=choice.interpreter,
            slim=spec.wheels.slim,
            glibc=choice.glibc,
        )
        changes["config"] = _with_interpreter(spec.config, choice.interpreter)
    if choice.builds_engine:
        labels = (*spec.config.labels, ("io.edgepack.engine.key", json.dumps(
            engine["key"], sort_keys=True, separators=(",", ":"))))
        base_config = changes.get("config", spec.config)
        changes["config"] = dataclasses.replace(
            base_config,
            labels=tuple(sorted(labels)),
            env=tuple(sorted((*base_config.env, ("NVIDIA_DRIVER_CAPABILITIES", "all"),
                              ("NVIDIA_VISIBLE_DEVICES", "all")))),
        )
    return dataclasses.replace(spec, **changes)


@dataclasses.dataclass(frozen=True)
class JetsonPayload:
    """The Jetson plan's own data: the image spec and the files split by who renders them."""

    image: ImageSpec
    choice: ContainerChoice
    key: dict[str, Any]
    linux_rendered: tuple[RenderedFile, ...]  # rendered by the Linux backend's execute
    jetson_rendered: tuple[RenderedFile, ...]  # rendered here, with the Jetson context
    # The first-boot engine unit (templates/jetson/engine-build.service.jinja), whose context's
    # ``engine`` is the build's settings, not the container engine.
    engine_rendered: tuple[RenderedFile, ...]
    timing_cache: Path | None
    lines: tuple[str, ...]


class JetsonBackend:
    """``jetson`` targets: the Linux container bundle on the target's JetPack container, with
    the key of the TensorRT engine the device builds; the Linux backend does the common work
    through the target's Linux view (see the module docstring)."""

    device_class: ClassVar[str] = "jetson"

    def __init__(self) -> None:
        self._linux = linux.LinuxContainerBackend()

    def check_request(self, request: BuildRequest) -> None:
        linux.check_ota_flags(request)
        timing_cache(request)

    def source_steps(
        self, request: BuildRequest, source: SourceModel, target: LoadedTarget
    ) -> tuple[SourceStep, ...]:
        """ONNX only (TensorRT's parser reads ONNX), made loadable by the image's onnxruntime
        (the fallback); INT8 (``--quantize int8-*``) as Q/DQ through the optimizer; FP16 is left
        to TensorRT. In every precision the constants are folded (polygraphy, issue 12) after
        any optimization and before the final runtime check, so the folded model is the one
        inspected, linted, keyed and shipped: (compat, [optimize,] fold, compat)."""
        spec = _onnx_only(source.path, source.format, target)
        choice = choose(spec, target.source, user_base=request.base is not None)
        pins = wheel_requirements(choice, linux.runtime_requirements())
        version = next(p.partition("==")[2] for p in pins if p.startswith("onnxruntime=="))
        compat = RuntimeCompatStep(engine="onnxruntime", version=version)
        # FP16/FP32: the FP32 ONNX is shipped and trtexec builds the engine in that precision;
        # INT8: TensorRT's explicit Q/DQ through the optimizer (packager.backends.jetson.int8).
        model_plan = plan_model(request.quantize, spec.runtime.preferred_precision,
                                calibration=request.calibration)
        optimize = () if model_plan.optimize is None else (model_plan.optimize,)
        return (compat, *optimize, FoldConstantsStep(), compat)

    def fit(self, request: BuildRequest, model: ModelInfo, target: LoadedTarget) -> FitReport:
        return linux_fit(model, target)

    def plan(
        self, request: BuildRequest, model: ModelInfo, target: LoadedTarget, fit: FitReport
    ) -> PackagePlan:
        spec = _onnx_only(model.path, model.format, target)
        name = bundle_name(request)
        choice = choose(spec, target.source, user_base=request.base is not None)
        precision = precision_of(request, spec)
        if precision == "int8":
            # TensorRT's parser takes only its narrow Q/DQ form: refuse what it would reject,
            # naming the rule and the tensor (reads the model, writes nothing).
            check_qdq(model.path, spec.runtime.tensorrt, sm=spec.sm)
        key = engine_key(model, precision, spec)
        if choice.builds_engine:
            check_device_can_build(key, target.source)
        engine = {"engines_dir": ENGINES_DIR, "key": key, "fallback": "onnxruntime-cpu"}
        unit = f"edgepack-{name}"
        ota_rendered, ota_copied = linux.ota_files(request)
        linux_rendered = (
            RenderedFile(path="install-container.sh", template="linux/install.sh.jinja",
                         mode=0o755),
            RenderedFile(path="README.md", template="linux/README.md.jinja"),
            *ota_rendered,
        )
        jetson_rendered = [
            RenderedFile(path=f"{unit}.service", template="jetson/service.jinja"),
            RenderedFile(path="supervise.py", template="jetson/supervise.py.jinja", mode=0o755),
            RenderedFile(path="install.sh", template="jetson/install.sh.jinja", mode=0o755),
        ]
        engine_rendered: tuple[RenderedFile, ...] = ()
        preflight: tuple[CopiedFile, ...] = ()
        if choice.builds_engine:
            engine_rendered = (RenderedFile(
                path=f"{unit}-engine.service", template="jetson/engine-build.service.jinja"),)
        # Runs on the host (its own python3): before anything else in the engine unit, and as
        # the OTA agent's facts probe (--facts: the device's L4T release and SM for a release's
        # requirements, packager/agent/device.py). Stdlib, Python 3.6-safe.
        facts_preflight = (
            f"/opt/edgepack/{name}/jetson_preflight.py" if request.ota_repo else None
        )
        if choice.builds_engine or facts_preflight:
            preflight = (CopiedFile(path="jetson_preflight.py", mode=0o755,
                                    source=runtime_dir() / "jetson_preflight.py"),)
        cache = timing_cache(request)
        payload = JetsonPayload(
            image=jetson_image_spec(request, model, target, name, choice, engine),
            choice=choice,
            key=key,
            linux_rendered=linux_rendered,
            jetson_rendered=tuple(jetson_rendered),
            engine_rendered=engine_rendered,
            timing_cache=cache,
            lines=describe(spec, choice, request.base),
        )
        return PackagePlan.for_request(
            self.device_class, request, name, (target, model, fit),
            rendered=(*linux_rendered, *jetson_rendered, *engine_rendered),
            copied=(
                *ota_copied,
                *preflight,
                *((CopiedFile(path=TIMING_CACHE, source=cache),) if cache else ()),
            ),
            context=(
                # Read by the Linux backend (linux.device_args, template_context): the GPU access
                # per engine the confinement adds, and the OTA agent's device class.
                ("device_args", GPU_RUN_ARGS if choice.builds_engine else ()),
                # The OTA agent's prepare step (confinement.json): the engine build, run in the
                # new image before it serves, from the image's own runtime.json.
                ("prepare", prepare_step(choice.interpreter) if choice.builds_engine else None),
                ("device_class", self.device_class),
                ("ota", {"repo": request.ota_repo, "channel": request.ota_channel}
                 if request.ota_repo else None),
                # The OTA agent's facts probe (install-container.sh writes it into the agent's
                # configuration; templates/jetson/install.sh.jinja installs the file there).
                ("facts_preflight", facts_preflight),
                ("signing", linux.signing_context(request)),
            ),
            payload=payload,
        )

    def _view_plan(self, plan: PackagePlan, rendered: tuple[RenderedFile, ...]) -> PackagePlan:
        payload = plan.payload
        assert isinstance(payload, JetsonPayload)
        view = linux_view(_spec(plan.target))
        return dataclasses.replace(
            plan,
            backend=self._linux.device_class,
            target=LoadedTarget(spec=view, source=plan.target.source),
            rendered=rendered,
            payload=payload.image,
        )

    def context(self, plan: PackagePlan, image: ImageResult) -> dict[str, Any]:
        """The Linux templates' context of the view, and the Jetson keys."""
        payload = plan.payload
        assert isinstance(payload, JetsonPayload)
        spec = _spec(plan.target)
        context = linux.template_context(self._view_plan(plan, ()), image)
        key = payload.key
        low, below = spec.runtime.l4t_range
        context.update({
            "target": spec.name,
            "serving": payload.choice.serving,
            "fallback_reason": payload.choice.fallback_reason,
            "engine_unit": f"edgepack-{plan.bundle_name}-engine" if payload.choice.builds_engine
            else None,
            "engines_dir": ENGINES_DIR,
            "engine_key": key,
            "engine_key_json": json.dumps(key, sort_keys=True, separators=(",", ":")),
            "plan_dir": f"{ENGINES_DIR}/{key['model_sha256']}",
            "plan_stem": plan_stem(key),
            "model_path": f"{linux.MODEL_DIR}/{plan.model.path.name}",
            "timing_cache": TIMING_CACHE if payload.timing_cache else None,
            "l4t": spec.runtime.l4t,
            "l4t_min": low,
            "l4t_below": below,
            "jetpack": spec.runtime.jetpack,
            "tensorrt": spec.runtime.tensorrt,
            "sm": spec.sm,
            "precision": key["precision"],
            "dla_core": key["dla_core"],
            "workspace_mib": key["workspace_mib"],
            "python": payload.choice.interpreter,
        })
        return context

    def engine_context(self, plan: PackagePlan) -> dict[str, Any]:
        """``engine`` of the engine unit's context (templates/jetson/engine-build.service.jinja)."""
        payload = plan.payload
        assert isinstance(payload, JetsonPayload)
        low, below = _spec(plan.target).runtime.l4t_range
        return {
            **payload.key,
            "model_path": f"{linux.MODEL_DIR}/{plan.model.path.name}",
            # The build reads the key and the model from here (engine_build --from-config).
            "config_path": confinement.RUNTIME_CONFIG,
            "l4t_min": low,
            "l4t_below": below,
            "min_free_mib": MIN_FREE_MIB,
            "build_timeout_s": BUILD_TIMEOUT_S,
            "progress_s": PROGRESS_S,
            "python": payload.choice.interpreter,
            "runtime_root": linux.RUNTIME_ROOT,
            # Where every JetPack container (l4t-tensorrt, l4t-jetpack) has trtexec.
            "trtexec": TRTEXEC,
            "timing_cache_seed": payload.timing_cache is not None,
            # (container engine, its GPU words) for each "#<engine>-only" ExecStart line.
            "gpu_args": UNIT_GPU_ARGS,
        }

    def device_section(self, plan: PackagePlan) -> dict[str, Any]:
        payload = plan.payload
        assert isinstance(payload, JetsonPayload)
        spec = _spec(plan.target)
        low, below = spec.runtime.l4t_range
        return {
            "serving": payload.choice.serving,
            "fallback_reason": payload.choice.fallback_reason,
            "engine_key": payload.key if payload.choice.builds_engine else None,
            "plan": f"{ENGINES_DIR}/{payload.key['model_sha256']}/{plan_stem(payload.key)}.plan"
            if payload.choice.builds_engine else None,
            "timing_cache": TIMING_CACHE if payload.timing_cache else None,
            "l4t": {"release": spec.runtime.l4t, "min": low, "below": below},
            "jetpack": spec.runtime.jetpack,
            "tensorrt": spec.runtime.tensorrt,
            "cuda": spec.runtime.cuda,
            "sm": spec.sm,
            "generation": spec.runtime.generation,
        }

    def execute(self, plan: PackagePlan, staging: Path, cache_dir: Path) -> ExecuteResult:
        payload = plan.payload
        assert isinstance(payload, JetsonPayload)
        for line in payload.lines:
            console.status(f"{plan.target.name}: {line}")
        if payload.choice.fallback_reason:
            console.warn(f"{plan.target.name}: {payload.choice.fallback_reason}")
        # The Linux execute builds the image and writes plan.copied (OTA files, the preflight,
        # the timing-cache seed) with the Linux templates.
        result = self._linux.execute(
            self._view_plan(plan, payload.linux_rendered), staging, cache_dir
        )
        image = _image_result(staging, result)
        # Reference inputs/outputs (polygraphy, onnxruntime CPU) for the on-device comparison.
        reference = write_reference(plan.model.path, staging / REFERENCE_DIR)
        written_ref = tuple(
            p.relative_to(staging).as_posix() for p in (reference.inputs, reference.outputs)
        )
        context = self.context(plan, image)
        written = render_files(payload.jetson_rendered, context, staging)
        written += render_files(
            payload.engine_rendered, {**context, "engine": self.engine_context(plan)}, staging
        )
        device = self.device_section(plan)
        return dataclasses.replace(
            result,
            files=(*result.files, *written, *written_ref),
            summary=(*result.summary, *payload.lines),
            json_extra=(*result.json_extra, ("device", device)),
            device=device,
        )

    def evaluate_on_target(
        self, plan: PackagePlan, result: ExecuteResult, job: OnTargetEval
    ) -> dict[str, Any]:
        """TensorRT's INT8 accuracy can only be measured on the device (the reference I/O in the
        bundle is for that); the report stays as the optimizer wrote it."""
        return job.report

    def target_meta(self, target: LoadedTarget) -> TargetInfo:
        view = LoadedTarget(spec=linux_view(_spec(target)), source=target.source)
        return self._linux.target_meta(view).model_copy(
            update={"device_class": self.device_class}
        )

    def target_notes(self, target: LoadedTarget) -> tuple[TargetNote, ...]:
        spec = _spec(target)
        choice = choose(spec, target.source, user_base=True)
        low, below = spec.runtime.l4t_range
        value = {
            "jetpack": spec.runtime.jetpack,
            "l4t": {"release": spec.runtime.l4t, "min": low, "below": below},
            "tensorrt": spec.runtime.tensorrt,
            "cuda": spec.runtime.cuda,
            "sm": spec.sm,
            "dla_cores": spec.runtime.dla_cores,
            "generation": spec.runtime.generation,
            "base": spec.runtime.base,
            "base_pinned": "@sha256:" in spec.runtime.base,
            "python": spec.runtime.python,
            "serving": choice.serving,
            "fallback_reason": choice.fallback_reason,
        }
        return (TargetNote(key="jetson", value=value, line="\n".join(describe(spec, choice))),)

    def try_bundle(self, request: TryRequest, manifest: Manifest) -> TryResult:
        """Runs the image like a Linux bundle (emulated on a foreign host): no GPU here, so the
        runtime serves through its onnxruntime fallback and says so."""
        return self._linux.try_bundle(request, manifest)

    def verify_bundle(self, root: Path, manifest: Manifest) -> tuple[str, ...]:
        # The device section first: a hand-edited one is one VerifyError naming device.FIELD.
        section(root, manifest)
        if manifest.image is None:
            # The Linux check passes a bundle without an image (it has none to check); every
            # Jetson bundle is a container image.
            raise VerifyError(f"{root / MANIFEST}: image: is required for a jetson bundle",
                              hint="rebuild the bundle with 'edgepack build'")
        from packager.backends.linux.verify import check_image

        # The image, then the engine key and a prebuilt plan (edgepack engine build --on).
        return (*check_image(root, manifest), *check_engine_key(root, manifest))

    def build_engine_on(
        self, root: Path, manifest: Manifest, job: EngineBuildOn
    ) -> tuple[AddedFile, ...]:
        """``edgepack engine build --on ssh://HOST`` (packager.backends.engine_on)."""
        from packager.backends.jetson.engine_remote import build_engine_on

        return build_engine_on(root, manifest, job)

    def check_publishable(self, root: Path, manifest: Manifest) -> None:
        """Published like any container bundle: the agent runs its image."""
        self._linux.check_publishable(root, manifest)

    def release_compatibility(self, root: Path, manifest: Manifest) -> dict[str, str]:
        """The device section's L4T range and SM (:meth:`device_section`) as the release's
        ``compat.requires``: ``{"l4t_min": "r36.0.0", "l4t_below": "r36.4.0", "sm": "87"}``.
        The agent installs the release only on a device whose /etc/nv_tegra_release and SoC
        match, as read by the bundle's own preflight (``jetson_preflight.py --facts``, the
        agent's facts probe: packager/agent/device.py); VerifyError naming the field when the
        section does not carry them."""
        return release_requires(root, manifest)


def _image_result(staging: Path, result: ExecuteResult) -> ImageResult:
    """The image facts the Linux templates' context needs, from the Linux execute's result."""
    image = result.image
    assert image is not None  # the Linux execute always builds the image
    return ImageResult(
        archive=staging / "image.tar",
        manifest_digest=image.digest,
        config_digest=image.config_digest,
        size_bytes=image.size_bytes,
        layers=(),
        ref_name=image.ref,
    )


def section(root: Path, manifest: Manifest) -> JetsonSection:
    """The bundle's ``device`` section, typed (packager.backends.jetson.manifest); VerifyError
    (exit 8) naming manifest.json and ``device.FIELD`` when it is missing or malformed."""
    return manifest.device_as(JetsonSection, str(root / MANIFEST))


def release_requires(root: Path, manifest: Manifest) -> dict[str, str]:
    """``device.l4t.min``, ``device.l4t.below`` and ``device.sm`` of the Jetson bundle at
    ``root`` as OTA requirements (packager.agent.protocol.check_requires); VerifyError naming
    manifest.json and the field."""
    device = section(root, manifest)
    requires = {"l4t_min": device.l4t.min, "l4t_below": device.l4t.below, "sm": str(device.sm)}
    try:
        return check_requires(requires)
    except ValueError as exc:
        raise VerifyError(f"{root / MANIFEST}: device: {exc}",
                          hint="rebuild the bundle with 'edgepack build'") from exc


def check_engine_key(root: Path, manifest: Manifest) -> list[str]:
    """verify's engine checks, one line per problem: the manifest's engine key names the ONNX
    model the bundle's image serves (its ``model_sha256`` is the model section's digest), and
    what ``engine/`` holds is that key's prebuilt plan, as
    :func:`.engine_remote.prebuilt_problems` checks it (the one checker of prebuilt plans).
    VerifyError (exit 8) naming ``device.FIELD`` when the section is malformed."""
    from packager.backends.jetson.engine_remote import prebuilt_problems

    engine_key = section(root, manifest).engine_key
    key = engine_key.key() if engine_key is not None else None
    problems = []
    digest = manifest.model.digest.removeprefix("sha256:")
    if key is not None and key.model_sha256 != digest:
        problems.append(
            f"{root / MANIFEST}: device.engine_key.model_sha256 {key.model_sha256} "
            f"is not the model's sha256 {digest}"
        )
    return problems + prebuilt_problems(root, manifest, key)
