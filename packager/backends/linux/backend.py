"""Linux devices that run containers (Raspberry Pi, industrial PCs): an OCI image bundle.

The plan is pure: the image spec (Debian base, runtime wheels, runtime layer, model layer), the
files rendered from ``templates/linux/`` and their context. ``execute`` builds the image with
``packager.image`` and renders the templates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from packager import __version__
from packager.agent import confinement
from packager.backends import base
from packager.backends.linux.fit import (
    INSTALLED_COPIES,
    linux_fit,
    storage_available,
    with_image_storage,
)
from packager.bundle.manifest import MANIFEST, CpuInfo, ImageSection, Layer, TargetInfo
from packager.console import console
from packager.errors import InputError, UnsupportedError, UsageError, VerifyError
from packager.fit import FitReport
from packager.image.registry import parse_pinned
from packager.image.spec import (
    ArchiveBase,
    BaseSpec,
    DebianBase,
    FileEntry,
    FileLayer,
    HealthCheck,
    ImageConfig,
    ImageResult,
    ImageSpec,
    RegistryBase,
    StorageBudget,
    WheelSet,
)
from packager.models.info import Dim, ModelInfo, TensorInfo
from packager.render import render_files
from packager.resources import runtime_dir
from packager.targets import CHANNEL_FORM, LinuxTarget, LoadedTarget, ota_repo_problem
from packager.tools.qemu import emulated_cpu

RUNTIME_ROOT = "/opt/edgepack/runtime"
RUNTIME_PACKAGE = "edgepack_runtime"
MODEL_DIR = "/opt/edgepack/model"
SITE_PACKAGES = "/opt/edgepack/site-packages"
PYTHON = "/usr/bin/python3.11"
USER_ID = 10001
SOURCE_URL = "https://github.com/edgepack/edgepack"


def runtime_requirements() -> tuple[str, ...]:
    """The image's runtime wheels: the requirement lines of packager/runtime/requirements.txt,
    comments and blank lines dropped (``name==version`` pins)."""
    path = runtime_dir() / "requirements.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip())


def onnxruntime_pin() -> str:
    """The onnxruntime version the image ships (packager/runtime/requirements.txt)."""
    pins = [r.partition("==")[2] for r in runtime_requirements() if r.startswith("onnxruntime==")]
    if not pins:  # pragma: no cover - packager/runtime/requirements.txt pins it
        raise UsageError("packager/runtime/requirements.txt pins no onnxruntime version")
    return pins[0]


def runtime_files() -> tuple[FileEntry, ...]:
    """The on-device runtime package, copied as ``edgepack_runtime`` (sources only)."""
    root = runtime_dir()
    entries = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or "__pycache__" in rel.parts or path.suffix not in (".py", ".txt"):
            continue
        dest = f"{RUNTIME_ROOT}/{RUNTIME_PACKAGE}/{rel.as_posix()}"
        entries.append(FileEntry(dest=dest, source=path, mode=0o644))
    return tuple(entries)


def parse_base(reference: str) -> ArchiveBase | RegistryBase:
    """``oci-archive:PATH``, ``oci:DIR`` / a layout directory, or
    ``docker://REGISTRY/REPO@sha256:HEX`` (pulled when the image is built), for ``--base``."""
    if reference.startswith("docker://"):
        return parse_pinned(reference, "--base")
    if reference.startswith("oci-archive:"):
        path = Path(reference.removeprefix("oci-archive:").split(":")[0])
        if not path.is_file():
            raise InputError(f"--base: {path}: no such OCI archive", hint="check the path")
        return ArchiveBase(reference=reference, path=path, kind="oci-archive")
    path = Path(reference.removeprefix("oci:").split(":")[0])
    if not (path / "oci-layout").is_file():
        raise InputError(
            f"--base: {path}: not an OCI archive or layout",
            hint="pass oci-archive:PATH (a tar) or an OCI image layout directory",
        )
    return ArchiveBase(reference=reference, path=path, kind="oci-layout")


def _pick(override: int | None, default: int) -> int:
    return default if override is None else override


def _first_dim(tensor: TensorInfo) -> Dim:
    return tensor.shape[0] if tensor.shape else None


def batch_settings(request: base.BuildRequest, model: ModelInfo, spec: LinuxTarget) -> int:
    """runtime.json's max_batch_size: the build's or the target's, when the model can be batched.

    The runtime concatenates concurrent requests along their first axis, which is right only
    when that axis is the batch: every input's and output's first dimension named as a batch
    (packager.runtime.model.BATCH_DIM_NAMES, e.g. "batch", "N", "batch_size"), or declared by
    the user with ``--batch-axis 0``. Along any other axis (a time-major LSTM's ``seq``) merged
    requests answer wrongly. Raises UnsupportedError (exit 10: the flags are well-formed and would
    build another model; this model cannot be served that way) when --max-batch-size > 1 asks
    for batching that model cannot have, or --batch-axis names an axis the runtime cannot merge
    along; a target's own max_batch_size is turned off (with a warning) instead.
    """
    from packager.runtime.model import is_batch_dim

    axis = request.batch_axis
    label = model.path.name
    if axis is not None and axis != 0:
        raise UnsupportedError(
            f"--batch-axis {axis}: requests can only be merged along axis 0",
            hint="export the model batch-first, or build without --max-batch-size",
        )
    size = _pick(request.max_batch_size, spec.runtime.max_batch_size)
    tensors = (*model.inputs, *model.outputs)
    fixed = next((t for t in tensors if not isinstance(_first_dim(t), str | None)), None)
    if axis == 0 and fixed is not None:
        raise UnsupportedError(
            f"--batch-axis 0: {label}: '{fixed.name}' has a fixed first dimension "
            f"({_first_dim(fixed)}), so its first axis cannot be a batch axis",
            hint="export the model with a dynamic batch dimension, or leave out --batch-axis",
        )
    if size <= 1 or axis == 0:
        return size
    unnamed = fixed or next((t for t in tensors if not is_batch_dim(_first_dim(t))), None)
    if unnamed is None:
        return size
    dim = _first_dim(unnamed)
    if fixed is not None:
        why = f"'{fixed.name}' has a fixed first dimension ({dim}), so requests cannot be merged"
    else:
        named = f"'{dim}'" if dim is not None else "unnamed"
        why = (
            f"the first dimension of '{unnamed.name}' is {named}, not a batch axis: "
            "merging requests along it would mix their answers"
        )
    if request.max_batch_size is None:
        console.warn(f"{label}: {why}; the target's max_batch_size {size} is turned off")
        return 0
    raise UnsupportedError(
        f"--max-batch-size {size}: {label}: {why}",
        hint="name the batch dimension 'batch' or 'N' in the model, pass --batch-axis 0 if "
        "the first axis is the batch, or build without --max-batch-size"
        if fixed is None
        else "build without --max-batch-size",
    )


def runtime_config(
    request: base.BuildRequest, name: str, version: str, model: ModelInfo, spec: LinuxTarget
) -> dict[str, Any]:
    """``runtime.json`` for the on-device runtime: the target's settings, then the build's."""
    runtime = spec.runtime
    config: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "model_path": f"{MODEL_DIR}/{model.path.name}",
        "host": "0.0.0.0",
        "port": runtime.port,
        "intra_op_threads": runtime.intra_op_threads,
        "inter_op_threads": runtime.inter_op_threads,
        "max_batch_size": batch_settings(request, model, spec),
        "max_queue_delay_us": _pick(request.max_queue_delay_us, runtime.max_queue_delay_us),
        "max_queue_size": runtime.max_queue_size,
        "cache_bytes": _pick(request.cache_mb, runtime.cache_mb) * 1024 * 1024,
        "cpu_mem_arena": runtime.cpu_mem_arena,
        "arena_extend_strategy": runtime.arena_extend_strategy,
    }
    if request.batch_axis is not None:  # absent otherwise: the same bundle as before the flag
        config["batch_axis"] = request.batch_axis
    return config


def model_layer(model: ModelInfo, config: dict[str, Any]) -> FileLayer:
    """The image's ``model`` layer under ``/opt/edgepack/model``: the model file, its external
    data at the same relative paths, and ``config`` as ``runtime.json``. InputError (exit 3)
    when an external data file would take the model's or runtime.json's place."""
    files = [FileEntry(dest=f"{MODEL_DIR}/{model.path.name}", source=model.path)]
    # External data keeps the model's relative layout (weights/ext.bin stays weights/ext.bin):
    # onnxruntime resolves each location against the model file's folder. Inspection checked
    # every location is a plain relative path inside that folder.
    for path in model.external_data:
        rel = path.relative_to(model.path.parent).as_posix()
        if rel in (model.path.name, "runtime.json"):
            raise InputError(
                f"{model.path}: external data file '{rel}' would replace the "
                f"{'model file' if rel == model.path.name else 'runtime configuration'} "
                "in the image",
                hint="re-save the model with another external data location",
            )
        files.append(FileEntry(dest=f"{MODEL_DIR}/{rel}", source=path))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    files.append(FileEntry(dest=f"{MODEL_DIR}/runtime.json", source=text.encode()))
    return FileLayer(name="model", files=tuple(sorted(files, key=lambda f: f.dest)))


def image_spec(
    request: base.BuildRequest,
    model: ModelInfo,
    spec: LinuxTarget,
    name: str,
    version: str,
    target: LoadedTarget,
    runtime_extra: Mapping[str, Any] | None = None,
) -> ImageSpec:
    """The image of ``spec`` serving ``model``; ``runtime_extra``: sections a class reusing this
    backend adds to runtime.json (Jetson: its ``engine``)."""
    if spec.platform.arch not in ("arm64", "amd64"):
        raise UnsupportedError(
            f"{spec.name}: platform.arch: {spec.platform.arch} images are not supported yet",
            hint="use an arm64 or amd64 target",
        )
    base_image: BaseSpec
    if request.base:
        base_image = parse_base(request.base)
    else:
        from packager.image.debian import DEFAULT_PYTHON_PACKAGES

        suite = spec.runtime.base.partition(":")[2] or "bookworm"
        base_image = DebianBase(suite=suite, packages=DEFAULT_PYTHON_PACKAGES, slim=request.slim)
    config = {**runtime_config(request, name, version, model, spec), **(runtime_extra or {})}
    port = spec.runtime.port
    labels = (
        ("io.edgepack.model.digest", model.digest),
        ("io.edgepack.model.name", name),
        ("io.edgepack.target", spec.name),
        ("io.edgepack.version", __version__),
        ("org.opencontainers.image.source", SOURCE_URL),
        ("org.opencontainers.image.title", name),
        ("org.opencontainers.image.version", version),
    )
    return ImageSpec(
        platform_os="linux",
        arch=spec.platform.arch,
        variant=spec.platform.variant,
        base=base_image,
        wheels=WheelSet(
            requirements=runtime_requirements(),
            python_version=spec.runtime.python,
            site_packages=SITE_PACKAGES,
            interpreter=PYTHON,
            slim=request.slim,
        ),
        layers=(
            FileLayer(name="runtime", files=runtime_files()),
            model_layer(model, config),
        ),
        config=ImageConfig(
            user=f"{USER_ID}:{USER_ID}",
            entrypoint=(PYTHON, "-m", f"{RUNTIME_PACKAGE}.server"),
            cmd=("--config", f"{MODEL_DIR}/runtime.json"),
            env=(
                ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                ("EDGEPACK_RUNTIME_CONFIG", f"{MODEL_DIR}/runtime.json"),
                ("PYTHONDONTWRITEBYTECODE", "1"),
                ("PYTHONPATH", f"{RUNTIME_ROOT}:{SITE_PACKAGES}"),
                ("PYTHONUNBUFFERED", "1"),
            ),
            workdir="/",
            exposed_ports=(f"{port}/tcp",),
            labels=labels,
            healthcheck=HealthCheck(
                test=("CMD", PYTHON, "-m", f"{RUNTIME_PACKAGE}.healthcheck", "--port", str(port)),
            ),
        ),
        ref_name=f"edgepack/{name}:{version}",
        annotations=(
            *labels,
            ("org.opencontainers.image.ref.name", version),
        ),
        created_epoch=base.created_epoch(),
        storage=storage_budget(target, force=request.force),
        compression=request.compression,
    )


def storage_budget(target: LoadedTarget, *, force: bool) -> StorageBudget:
    """The target's storage for the build's check of the image's real size (packager.fit)."""
    available, note = storage_available(target)
    return StorageBudget(
        target=target.name,
        available_bytes=available,
        note=note,
        copies=INSTALLED_COPIES,
        enforce=not force,
    )


OTA_DIR = "ota"
OTA_AGENT_DIR = "/opt/edgepack/ota-agent"
OTA_CONFIG = "/etc/edgepack/ota-agent.json"
OTA_STATE = "/var/lib/edgepack-ota"


def check_ota_flags(request: base.BuildRequest) -> bool:
    """Check --ota-repo/--ota-root/--ota-channel (before any work); True when OTA is wanted.

    UsageError (exit 2) for a lone flag, a URL that :func:`packager.targets.ota_repo_problem`
    refuses or a bad channel; InputError (exit 3) for a missing root file."""
    if request.ota_repo is None and request.ota_root is None:
        return False
    if request.ota_repo is None or request.ota_root is None:
        raise UsageError(
            "--ota-repo and --ota-root go together",
            hint="pass the URL devices reach the repository at and its 1.root.json",
        )
    # Both land in install.sh and the agent's configuration: whole-string allow-lists.
    problem = ota_repo_problem(request.ota_repo)
    if problem is not None:
        raise UsageError(
            f"--ota-repo: {request.ota_repo!r} {problem}",
            hint="e.g. https://updates.example.com/edgepack/",
        )
    if not CHANNEL_FORM.matches(request.ota_channel):
        raise UsageError(
            f"--ota-channel: {request.ota_channel!r} must match {CHANNEL_FORM.description}"
        )
    if not request.ota_root.is_file():
        raise InputError(
            f"--ota-root: {request.ota_root}: not found",
            hint="pass the repository's trusted root, e.g. REPO/metadata/1.root.json",
        )
    return True


def ota_files(
    request: base.BuildRequest,
) -> tuple[tuple[base.RenderedFile, ...], tuple[base.CopiedFile, ...]]:
    """The device agent, its trusted root and units, when the bundle is built for OTA."""
    if not check_ota_flags(request):
        return (), ()
    assert request.ota_root is not None  # check_ota_flags: both or neither
    from packager.ota.wheels import agent_source_dir

    source = agent_source_dir()
    copied = [base.CopiedFile(path=f"{OTA_DIR}/root.json", source=request.ota_root)]
    for path in sorted(source.rglob("*.py")):
        rel = path.relative_to(source).as_posix()
        if "__pycache__" not in rel:
            copied.append(base.CopiedFile(path=f"{OTA_DIR}/lib/edgepack_agent/{rel}", source=path))
    rendered = (
        base.RenderedFile(
            path=f"{OTA_DIR}/edgepack-ota-agent.service", template="linux/ota-agent.service.jinja"
        ),
        base.RenderedFile(
            path=f"{OTA_DIR}/edgepack-ota-agent.timer", template="linux/ota-agent.timer.jinja"
        ),
    )
    return rendered, tuple(copied)


def copy_files(files: tuple[base.CopiedFile, ...], root: Path) -> tuple[str, ...]:
    """Copy each file into ``root`` at its bundle path, with its mode; the paths written."""
    written = []
    for item in files:
        dest = root / item.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(item.source.read_bytes())
        os.chmod(dest, item.mode)
        written.append(item.path)
    return tuple(written)


def ota_wheels(plan: base.PackagePlan, staging: Path, cache_dir: Path) -> tuple[str, ...]:
    """The agent's wheels for the device's platform, downloaded once into the cache."""
    from packager.ota.wheels import download_agent_wheels

    spec = plan.target.spec
    assert isinstance(spec, LinuxTarget)
    arch = spec.platform.arch
    assert arch in ("arm64", "amd64")
    cached = cache_dir / "ota-agent-wheels" / f"{arch}-py{spec.runtime.python}"
    if not any(cached.glob("*.whl")):
        if plan.offline:
            raise InputError(
                f"offline: the OTA agent's wheels for {arch} are not in {cache_dir}",
                hint="build once with network access to fill the cache",
            )
        partial = cached.with_name(cached.name + ".partial")
        download_agent_wheels(partial, arch=arch, python_version=spec.runtime.python)
        partial.rename(cached)
    written = []
    for wheel in sorted(cached.glob("*.whl")):
        rel = f"{OTA_DIR}/wheels/{wheel.name}"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(wheel.read_bytes())
        written.append(rel)
    return tuple(written)


def container_confinement(spec: LinuxTarget) -> tuple[str, ...]:
    """The runtime container's run flags from the target's ``[service]`` limits, the same with
    every engine (a derived class's device access is per engine: :func:`device_args`)."""
    return confinement.from_target(spec.service.memory_max_mb, spec.service.cpu_quota_percent)


def device_args(plan: base.PackagePlan) -> dict[str, tuple[str, ...]]:
    """The plan's ``device_args`` context entry: a class's device access per container engine,
    as ``(engine, flags)`` pairs (set by a class that reuses this backend through a Linux view
    of its target, e.g. Jetson's packager.agent.confinement.NVIDIA_JETSON; allow-listed there);
    {} for a Linux bundle."""
    return {engine: tuple(flags) for engine, flags in plan.context_dict().get("device_args") or ()}


def prepare_step(plan: base.PackagePlan) -> confinement.Prepare | None:
    """The plan's ``prepare`` context entry (a derived class's step the OTA agent runs before
    starting a release, e.g. Jetson's engine build); None for a Linux bundle."""
    step = plan.context_dict().get("prepare")
    assert step is None or isinstance(step, confinement.Prepare)
    return step


def write_confinement(
    spec: LinuxTarget,
    staging: Path,
    device: Mapping[str, Sequence[str]] | None = None,
    prepare: confinement.Prepare | None = None,
) -> str:
    """``confinement.json``: the flags the OTA agent starts this bundle's runtime with, its
    device access per engine and the prepare step it runs first, if any (neither: the file is
    as before they existed)."""
    (staging / confinement.FILE).write_bytes(
        confinement.to_bytes(container_confinement(spec), prepare=prepare, device=device)
    )
    return confinement.FILE


def template_context(plan: base.PackagePlan, image: ImageResult) -> dict[str, Any]:
    """The one place the Linux templates' context is built."""
    spec = plan.target.spec
    assert isinstance(spec, LinuxTarget)
    name = plan.bundle_name
    return {
        "name": name,
        "version": plan.version,
        "unit": f"edgepack-{name}",
        "container": f"edgepack-{name}",
        "target": spec.name,
        "target_description": spec.description,
        "platform": spec.platform.oci,
        "arch": spec.platform.arch,
        "engine": spec.runtime.container_engine,
        "port": spec.runtime.port,
        "image_ref": image.ref_name,
        "image_digest": image.manifest_digest,
        "image_id": image.config_digest,
        "image_archive": "image.tar",
        "model_file": plan.model.path.name,
        "model_digest": plan.model.digest,
        "memory_max_mb": spec.service.memory_max_mb,
        "cpus": (
            f"{spec.service.cpu_quota_percent / 100:.2f}"
            if spec.service.cpu_quota_percent
            else None
        ),
        "restart_sec": spec.service.restart_sec,
        # One list of run flags for the unit's supervisor, install.sh and the OTA agent
        # (confinement.json): packager.agent.confinement; then the device access as each
        # engine gives it (the same lists as confinement.json's device_args), {} for none.
        "confinement_args": list(container_confinement(spec)),
        "device_access": {e: list(flags) for e, flags in device_args(plan).items()},
        # The OTA agent's device class (a class reusing this backend sets its own).
        "device_class": plan.context_dict().get("device_class") or spec.device_class,
        "restart_policy": confinement.RESTART_POLICY,
        "watchdog_sec": spec.service.watchdog_sec,
        "edgepack_version": __version__,
        "inputs": [t.to_json() for t in plan.model.inputs],
        "outputs": [t.to_json() for t in plan.model.outputs],
        "ota": plan.context_dict().get("ota"),
        # A class's device facts probe for the OTA agent (Jetson: its jetson_preflight.py, run
        # as /usr/bin/python3 FILE --facts); None for a Linux bundle.
        "facts_preflight": plan.context_dict().get("facts_preflight"),
        "agent_dir": OTA_AGENT_DIR,
        "config_path": OTA_CONFIG,
        "ota_state": OTA_STATE,
        "interval_min": 15,
        # The signer's public key (base64 of its PEM body) install.sh checks manifest.dsse.json
        # with; None for an unsigned bundle (packager.bundle.signing).
        "signing": plan.context_dict().get("signing"),
    }


def signing_context(request: base.BuildRequest) -> dict[str, str] | None:
    """The public half of ``--sign-key`` for install.sh: ``{"key": base64, "keyid": hex}``."""
    if request.sign_key is None:
        return None
    from packager.bundle.signing import load_signer, public_key_base64

    public = load_signer(request.sign_key).public_key
    return {"key": public_key_base64(public), "keyid": str(public.keyid)}


def write_sbom(plan: base.PackagePlan, image: ImageResult, staging: Path, cache_dir: Path) -> str:
    """``sbom.cdx.json``: the image's Debian packages, wheels, model and runtime
    (packager.bundle.sbom)."""
    from packager.bundle.sbom import SBOM_FILE, ModelEntry, build_sbom
    from packager.digest import sha256_path

    text = build_sbom(
        image_name=image.ref_name.rsplit(":", 1)[0],
        image_version=plan.version,
        image_digest=image.manifest_digest,
        packages=image.packages,
        debian_suite=image.debian_suite,
        model=ModelEntry(
            name=plan.model.path.name,
            sha256=plan.model.digest.removeprefix("sha256:"),
            source=f"{MODEL_DIR}/{plan.model.path.name}",
        ),
        runtime_files={
            entry.dest: sha256_path(entry.source)[0]
            for entry in runtime_files()
            if isinstance(entry.source, Path)
        },
        cache_dir=cache_dir,
        epoch=base.created_epoch(),
    )
    (staging / SBOM_FILE).write_text(text, encoding="utf-8")
    return SBOM_FILE


# `--opt KEY=VALUE` this class takes: only emulate, which `build --no-emulate` sets for every
# class ("where the backend has one"); it has no firmware proof to skip, so it changes nothing.
OPTIONS: dict[str, tuple[str, ...]] = {"emulate": ("on", "off")}


class LinuxContainerBackend:
    """``linux-container`` targets (Raspberry Pi, industrial PCs): an OCI image serving the ONNX
    model with onnxruntime, its systemd unit, install.sh and, with ``--ota-repo``, the OTA agent."""

    device_class: ClassVar[str] = "linux-container"

    def check_request(self, request: base.BuildRequest) -> None:
        """``--opt`` (:data:`OPTIONS`) and the OTA flags (:func:`check_ota_flags`)."""
        base.checked_options(request, OPTIONS, "linux-container")
        check_ota_flags(request)

    def source_steps(
        self, request: base.BuildRequest, source: base.SourceModel, target: LoadedTarget
    ) -> tuple[base.SourceStep, ...]:
        """ONNX only: made loadable by the image's onnxruntime, optimized to ``--quantize`` or
        the target's preferred precision, and checked again after optimizing."""
        spec = target.spec
        assert isinstance(spec, LinuxTarget)
        if source.format != "onnx":
            raise UnsupportedError(
                f"{source.path.name}: {source.format} models cannot run on {spec.name}",
                hint="linux-container targets serve ONNX models with onnxruntime",
            )
        compat = base.RuntimeCompatStep(engine=spec.runtime.engine, version=onnxruntime_pin())
        optimize = base.preferred_quantize(request, source, spec.runtime.preferred_precision)
        return (compat,) if optimize is None else (compat, optimize, compat)

    def fit(self, request: base.BuildRequest, model: ModelInfo, target: LoadedTarget) -> FitReport:
        return linux_fit(model, target)

    def plan(
        self, request: base.BuildRequest, model: ModelInfo, target: LoadedTarget, fit: FitReport
    ) -> base.PackagePlan:
        spec = target.spec
        assert isinstance(spec, LinuxTarget)
        name = base.bundle_name(request)
        if model.format != "onnx":
            raise UnsupportedError(
                f"{model.path.name}: {model.format} models cannot run on {spec.name}",
                hint="linux-container targets serve ONNX models with onnxruntime",
            )
        unit = f"edgepack-{name}"
        ota_rendered, ota_copied = ota_files(request)
        return base.PackagePlan.for_request(
            self.device_class, request, name, (target, model, fit),
            rendered=(
                base.RenderedFile(path=f"{unit}.service", template="linux/service.jinja"),
                base.RenderedFile(path="install.sh", template="linux/install.sh.jinja", mode=0o755),
                base.RenderedFile(path="supervise.py", template="linux/supervise.py.jinja",
                                  mode=0o755),
                base.RenderedFile(path="README.md", template="linux/README.md.jinja"),
                *ota_rendered,
            ),
            copied=ota_copied,
            context=(
                (
                    "ota",
                    {"repo": request.ota_repo, "channel": request.ota_channel}
                    if request.ota_repo
                    else None,
                ),
                ("signing", signing_context(request)),
            ),
            payload=image_spec(request, model, spec, name, request.version, target),
        )

    def execute(self, plan: base.PackagePlan, staging: Path, cache_dir: Path) -> base.ExecuteResult:
        from packager.image.builder import build_image

        image_plan = plan.payload
        assert isinstance(image_plan, ImageSpec)
        spec = plan.target.spec
        assert isinstance(spec, LinuxTarget)
        image = build_image(image_plan, staging / "image.tar", cache_dir, offline=plan.offline)
        context = template_context(plan, image)
        written = render_files(plan.rendered, context, staging)
        written += copy_files(plan.copied, staging)
        written += (write_confinement(spec, staging, device_args(plan), prepare_step(plan)),)
        if plan.context_dict().get("ota"):
            written += ota_wheels(plan, staging, cache_dir)
        written += (write_sbom(plan, image, staging, cache_dir),)
        layers = tuple(
            Layer(
                name=layer.name,
                digest=layer.digest,
                diff_id=layer.diff_id,
                size=layer.size,
                uncompressed_size=layer.uncompressed_size,
            )
            for layer in image.layers
        )
        section = ImageSection(
            archive="image.tar",
            digest=image.manifest_digest,
            config_digest=image.config_digest,
            ref=image.ref_name,
            platform=spec.platform.oci,
            size_bytes=image.size_bytes,
            port=spec.runtime.port,
            layers=layers,
        )
        cached = [layer.name for layer in image.layers if layer.cached]
        # The fit the manifest records: storage from the built image's real sizes.
        fit = with_image_storage(plan.fit, plan.target, image.uncompressed_bytes, image.size_bytes)
        return base.ExecuteResult(
            files=("image.tar", *written),
            image=section,
            fit=fit,
            json_extra=(
                ("fit", fit.to_json()),
                ("platform", section.platform),
                (
                    "image",
                    {
                        "archive": str(Path("image.tar")),
                        "digest": image.manifest_digest,
                        "size_bytes": image.size_bytes,
                        "ref": image.ref_name,
                        "layers": [layer.model_dump(mode="json") for layer in layers],
                        "cached_layers": cached,
                    },
                ),
            ),
        )

    def evaluate_on_target(
        self, plan: base.PackagePlan, result: base.ExecuteResult, job: base.OnTargetEval
    ) -> dict[str, Any]:
        """The INT8 accuracy measured in the built image on the target's emulated CPU where
        that is another architecture (packager.optimize.on_target)."""
        from packager.optimize.on_target import evaluate_in_image, wanted

        if result.image is None or not wanted(
            plan.target, job.quantize, job.eval_dir, plan.model.path
        ):
            return job.report
        return evaluate_in_image(
            target=plan.target,
            image=result.image.model_dump(mode="json"),
            bundle=job.bundle,
            model_in_image=f"{MODEL_DIR}/{plan.model.path.name}",
            baseline=job.baseline,
            eval_dir=job.eval_dir,
            report=job.report,
            work=job.work,
        )

    def target_meta(self, target: LoadedTarget) -> TargetInfo:
        spec = target.spec
        assert isinstance(spec, LinuxTarget)
        cpu = spec.cpu
        return TargetInfo(
            name=spec.name,
            device_class=spec.device_class,
            platform=spec.platform.oci,
            # `edgepack run` emulates this CPU model (qemu-user); None: qemu models no such core.
            cpu=None
            if cpu is None
            else CpuInfo(model=cpu.model, cores=cpu.cores, qemu=emulated_cpu(cpu.model, cpu.qemu)),
        )

    def target_notes(self, target: LoadedTarget) -> tuple[base.TargetNote, ...]:
        return ()

    def try_bundle(self, request: base.TryRequest, manifest: base.Manifest) -> base.TryResult:
        from packager.backends.linux.trial import run_bundle

        result = run_bundle(request, manifest)
        lines: tuple[str, ...] = ()
        if result.smoke:
            where = f" on an emulated {result.cpu}" if result.cpu else ""
            lines = (f"{request.bundle}: ready in {result.ready_after_s:.1f}s{where}, "
                     "inference OK",)
        return base.TryResult(document=result.to_json(), lines=lines)

    def verify_bundle(self, root: Path, manifest: base.Manifest) -> tuple[str, ...]:
        """The image (every blob, and the digest manifest.json records). A bundle relabelled
        as this class is refused: a linux-container bundle always carries an image and never a
        device section (another class's, e.g. an engine key this class would not check)."""
        from packager.backends.linux.verify import check_image

        if manifest.image is None:
            raise VerifyError(
                f"{root / MANIFEST}: image: is required for a {self.device_class} bundle",
                hint="rebuild the bundle with 'edgepack build'",
            )
        if manifest.device is not None:
            raise VerifyError(
                f"{root / MANIFEST}: device: a {self.device_class} bundle has no device section",
                hint="was target.device_class changed? rebuild the bundle with 'edgepack build'",
            )
        return tuple(check_image(root, manifest))

    def release_compatibility(self, root: Path, manifest: base.Manifest) -> dict[str, str]:
        """Platform and device class say it all: no further requirements."""
        return {}

    def check_publishable(self, root: Path, manifest: base.Manifest) -> None:
        """Every verified container bundle may be published: the agent runs its image."""
