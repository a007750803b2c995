"""``edgepack bake BUNDLE... --out DIR``: a ``docker buildx bake`` folder for a fleet (issue 13).

CI pipelines extend images with their own Dockerfile steps and cross-build with buildx; this
writes what they need to do that on top of edgepack's images, without rebuilding them:

    DIR/docker-bake.hcl       one target per model x device (``mnist-rpi4``), one multi-platform
                              target per model (``mnist``: one tag, one OCI index for a mixed
                              fleet), groups ``default`` (every model), ``devices`` (every model x
                              device) and ``device-NAME`` (every model for one device)
    DIR/Dockerfile            ``FROM edgepack``: the user's file, written only when absent
    DIR/.dockerignore         the build context is DIR, without the images
    DIR/cpuinfo-arm64.txt     bind-mounted over /proc/cpuinfo by arm64 RUNs under qemu-user
    DIR/images/MODEL/         an OCI layout of the model's images (the bundles' own blobs, and
                              their index): each target's ``edgepack`` named context is
                              ``oci-layout://images/MODEL@sha256:...``, pinned by digest

Every target builds ``DIR/Dockerfile`` with ``edgepack`` as a named context, so the base layers
are the bundles' bytes (same digests) and only the user's steps are new. Outputs are buildx's:
``--push`` (a registry, tags ``${REGISTRY}/MODEL:VERSION[-DEVICE]``), ``--load`` (the local
engine) or ``OCI_DIR=out`` (one OCI archive per target, ``out/TARGET.tar``).

Paths in the bake file are relative to DIR: run ``docker buildx bake`` there (buildx resolves
``context`` and ``oci-layout://`` against its working directory), or set ``EDGEPACK_BAKE_DIR``.

Same bundles, same bytes: the layouts are written as ``edgepack push`` stages them
(packager/push.py), the bake file from sorted, allow-listed names only.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from packager.bundle.manifest import ManifestRead, load_manifest
from packager.errors import UsageError, VerifyError
from packager.image.oci import blob_name
from packager.push import _Source, plan_sources, stage_layout
from packager.staging import fsync_dir, make_staging_dir, replace_dir, write_bytes

# Bake target names allow [A-Za-z0-9_-]; image repositories allow lower-case components
# (distribution/reference): the intersection, so that a name is both.
NAME = re.compile(r"[a-z0-9]+(?:[_-][a-z0-9]+)*")
VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}")  # an image tag, less the 'latest' room
PLATFORM = re.compile(r"linux/(?:amd64|arm64(?:/v8)?|arm/v[67])")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
CPUINFO = "cpuinfo-arm64.txt"
LAYOUT_TAG = "edgepack"

DOCKERFILE = """\
# Your steps on top of edgepack's image: `docker buildx bake` builds this file for every target
# in docker-bake.hcl, with `edgepack` as a named context pinned to each bundle's image.
# edgepack images have no shell: RUN takes the exec form only (RUN ["python3", "-c", "..."]),
# and runs as the image's user (10001) unless you add USER.
# An arm64 RUN built on an amd64 host runs under qemu-user, where onnxruntime reads the host's
# /proc/cpuinfo at import and crashes: bind-mount an arm64 text over it (harmless on amd64,
# where onnxruntime detects the CPU with CPUID):
#   RUN --mount=type=bind,source=cpuinfo-arm64.txt,target=/proc/cpuinfo \\
#       ["python3", "-c", "import onnxruntime"]
FROM edgepack
"""

# The staging directories and files a stopped run can leave (packager/staging.py:
# .images.PID.RANDOM, .NAME.RANDOM.tmp) stay out of the build context too.
DOCKERIGNORE = "images\n.images.*\n.*.tmp\ndocker-bake.hcl\n"


@dataclass(frozen=True)
class BakeTarget:
    """One target of ``docker-bake.hcl``: a model on one device, or on every device of the fleet
    (``device`` None), built from the image named by ``context``."""

    name: str  # "mnist-rpi4" or "mnist" (every platform)
    model: str
    device: str | None  # None: the model's multi-platform target
    platforms: tuple[str, ...]
    context: str  # "oci-layout://images/mnist@sha256:..."
    tag: str  # "mnist:1.0.0-rpi4", after "${REGISTRY}/"


@dataclass(frozen=True)
class BakeResult:
    """What ``edgepack bake`` wrote in ``out``: the bake file, the Dockerfile (and whether it was
    written), every target and the groups (group name -> target names)."""

    out: Path
    bake_file: Path
    dockerfile: Path
    dockerfile_written: bool  # False: the user's Dockerfile was kept
    targets: tuple[BakeTarget, ...]
    groups: dict[str, tuple[str, ...]]

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "bake_file": str(self.bake_file),
            "dockerfile": str(self.dockerfile),
            "dockerfile_written": self.dockerfile_written,
            "targets": [
                {
                    "name": t.name,
                    "model": t.model,
                    "device": t.device,
                    "platforms": list(t.platforms),
                    "context": t.context,
                    "tag": t.tag,
                }
                for t in self.targets
            ],
            "groups": {k: list(v) for k, v in self.groups.items()},
        }


def _check(pattern: re.Pattern[str], value: str, what: str, hint: str) -> str:
    if not pattern.fullmatch(value):
        raise UsageError(f"{what} {value!r} cannot name a bake target or image tag", hint=hint)
    return value


def hcl_string(value: str) -> str:
    """An HCL string literal: JSON escapes, and template sequences (``${``, ``%{``) doubled so
    that nothing in ``value`` is interpolated (hashicorp/hcl spec, "Template Literals")."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    escaped = escaped.replace("${", "$${").replace("%{", "%%{")
    return f'"{escaped}"'


def _list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(hcl_string(v) for v in values) + "]"


def render_bake_file(targets: tuple[BakeTarget, ...], groups: dict[str, tuple[str, ...]]) -> str:
    """The docker-bake.hcl text (pure)."""
    lines = [
        "# Written by `edgepack bake`: regenerate it rather than edit it (the Dockerfile is yours)",
        "# Run in this folder:  docker buildx bake [TARGET|GROUP...] [--push | --load]",
        "#   REGISTRY=ghcr.io/acme docker buildx bake --push   one tag per target, in a registry",
        "#   OCI_DIR=out docker buildx bake                     out/TARGET.tar, OCI archives",
        "",
        'variable "REGISTRY" {',
        '  default = "edgepack"',
        "}",
        "",
        'variable "OCI_DIR" {',
        '  default = ""',
        "}",
        "",
        'variable "EDGEPACK_BAKE_DIR" {',
        '  default = "."',
        "}",
        "",
    ]
    for name, members in groups.items():
        lines += [f"group {hcl_string(name)} {{", f"  targets = {_list(members)}", "}", ""]
    lines += [
        'target "_edgepack" {',
        "  context = EDGEPACK_BAKE_DIR",
        '  dockerfile = "Dockerfile"',
        "}",
        "",
    ]
    for t in targets:
        where = _escaped(t.context.removeprefix("oci-layout://"))
        lines += [
            f"target {hcl_string(t.name)} {{",
            '  inherits = ["_edgepack"]',
            # Only the variable reference is a template: the rest is escaped text.
            f'  contexts = {{ edgepack = "oci-layout://${{EDGEPACK_BAKE_DIR}}/{where}" }}',
            f"  platforms = {_list(t.platforms)}",
            f'  tags = ["${{REGISTRY}}/{_escaped(t.tag)}"]',
            f'  output = OCI_DIR == "" ? [] : '
            f'["type=oci,dest=${{OCI_DIR}}/{_escaped(t.name)}.tar"]',
            "}",
            "",
        ]
    return "\n".join(lines)


def _escaped(value: str) -> str:
    """``value`` inside an HCL string literal (without the quotes)."""
    return hcl_string(value)[1:-1]


@dataclass(frozen=True)
class _Model:
    name: str
    version: str
    sources: tuple[_Source, ...]  # every bundle of the model, verified (push.plan_sources)
    devices: tuple[tuple[str, str, str], ...]  # (device, platform, manifest digest), sorted


def _device_of(bundle: Path, manifest: ManifestRead) -> str:
    return _check(
        NAME,
        manifest.manifest.target.name,
        f"{bundle}: target",
        "use a target whose name is lower-case "
        "letters, digits, '-' and '_' (a copy of its TOML under a new name)",
    )


def plan_bake(
    bundles: tuple[Path, ...],
) -> tuple[list[_Model], tuple[BakeTarget, ...], dict[str, tuple[str, ...]]]:
    """Group the bundles by model and plan the bake targets and groups; UsageError for two
    versions of one model, two bundles of one model and device, or names a tag cannot carry.
    Verifies every bundle (VerifyError)."""
    if not bundles:
        raise UsageError("bake: name at least one bundle")
    by_model: dict[str, list[Path]] = {}
    versions: dict[str, tuple[str, Path]] = {}
    # Each manifest.json is read once: its names are checked here, then the same bytes are
    # verified (plan_sources) and used; never a second, possibly different, copy.
    loaded: dict[Path, ManifestRead] = {}
    for bundle in bundles:
        loaded[bundle] = read = load_manifest(bundle)
        name, version = read.manifest.name, read.manifest.version
        _check(
            NAME,
            name,
            f"{bundle}: model name",
            "rebuild with --name of lower-case letters, digits, '-' and '_'",
        )
        _check(VERSION, version, f"{bundle}: version", "rebuild with --version 1.2.3")
        if name in versions and versions[name][0] != version:
            raise UsageError(
                f"{bundle}: {name} {version}, but {versions[name][1]} is {name} "
                f"{versions[name][0]}",
                hint="bake one version of each model",
            )
        versions.setdefault(name, (version, bundle))
        by_model.setdefault(name, []).append(bundle)
    models = []
    targets = []
    for name in sorted(by_model):
        paths = tuple(by_model[name])
        sources = plan_sources(paths, loaded)  # verifies each bundle; distinct platforms
        devices = []
        seen: dict[str, Path] = {}
        for source in sources:
            device = _device_of(source.bundle, loaded[source.bundle])
            if device in seen:
                raise UsageError(
                    f"{source.bundle}: {name} for {device} again (as {seen[device]})",
                    hint="one bundle per model and device",
                )
            seen[device] = source.bundle
            _check(PLATFORM, source.platform, f"{source.bundle}: platform", "a Linux bundle")
            _check(DIGEST, source.digest, f"{source.bundle}: image digest", "rebuild the bundle")
            devices.append((device, source.platform, source.digest))
        devices.sort()
        version = versions[name][0]
        models.append(_Model(name, version, tuple(sources), tuple(devices)))
        for device, platform, digest in devices:
            targets.append(
                BakeTarget(
                    f"{name}-{device}",
                    name,
                    device,
                    (platform,),
                    f"oci-layout://images/{name}@{digest}",
                    f"{name}:{version}-{device}",
                )
            )
    target_names = {t.name for t in targets}
    clash = sorted(target_names & set(by_model))
    if clash:
        raise UsageError(
            f"bake: {clash[0]!r} is both a model and a model-device target name",
            hint="rename one model with --name",
        )
    groups: dict[str, tuple[str, ...]] = {
        "default": tuple(sorted(by_model)),
        "devices": tuple(sorted(target_names)),
    }
    for device in sorted({t.device for t in targets if t.device}):
        groups[f"device-{device}"] = tuple(sorted(t.name for t in targets if t.device == device))
    clash = sorted(set(groups) & (target_names | set(by_model)))
    if clash:
        raise UsageError(
            f"bake: {clash[0]!r} is both a group and a target name",
            hint="rename the model with --name",
        )
    return models, tuple(targets), groups


def bake(bundles: tuple[Path, ...], out: Path) -> BakeResult:
    """Write the bake folder ``out`` (see the module docstring). What edgepack writes is
    replaced; the Dockerfile is written only when absent.

    Nothing half-written (packager/staging.py): the layouts are built in a staging directory
    beside ``out/images`` (``.images.PID.RANDOM``; a killed run's is removed by the next) and
    swapped in whole by :func:`~packager.staging.replace_dir`. The old ``docker-bake.hcl``
    names the old layouts by digest, so unless it is already the new one it is removed just
    before they go, and the new one is written (atomically) last: a run stopped part way leaves
    the old folder, the new one, or one without a ``docker-bake.hcl`` (run ``edgepack bake``
    again), never a bake file naming images that are not there. The other files are replaced
    atomically, each whole. UsageError (exit 2) when ``out`` cannot be a folder."""
    models, targets, groups = plan_bake(bundles)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a folder", hint="name a new or existing folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way (/dev/null/x), no permission, a full disk
        raise UsageError(
            f"--out {out}: cannot create it ({exc.strerror})", hint="name a folder you can write"
        ) from exc
    images = out / "images"
    multi = []
    staged = make_staging_dir(images)
    try:
        for model in models:
            layout = staged / model.name
            digest, _ = stage_layout(list(model.sources), layout, LAYOUT_TAG)
            for _, _, manifest in model.devices:
                if not (layout / blob_name(manifest)).is_file():  # a per-device context
                    raise VerifyError(f"{layout}: {manifest} was not staged")
            multi.append(
                BakeTarget(
                    model.name,
                    model.name,
                    None,
                    tuple(p for _, p, _ in sorted(model.devices, key=lambda d: d[1])),
                    f"oci-layout://images/{model.name}@{digest}",
                    f"{model.name}:{model.version}",
                )
            )
        all_targets = tuple(sorted([*multi, *targets], key=lambda t: t.name))
        text = render_bake_file(all_targets, groups)
        staged.chmod(0o755)  # mkdtemp's 0700: buildx may run as another user
        cpuinfo = resources.files("packager.image").joinpath("data", CPUINFO).read_bytes()
        write_bytes(out / CPUINFO, cpuinfo)
        write_bytes(out / ".dockerignore", DOCKERIGNORE.encode())
        # The old bake file pins the old layouts' digests: unless it is the new one (same
        # bundles, same layouts) it goes, durably, before they do, so that a stop between here
        # and its replacement leaves no bake file rather than one naming images that are gone.
        hcl, new_hcl = out / "docker-bake.hcl", text.encode()
        same = (
            not hcl.is_symlink()
            and hcl.is_file()
            and hcl.stat().st_size == len(new_hcl)  # read only a file that may be the same
            and hcl.read_bytes() == new_hcl
        )
        if not same:
            hcl.unlink(missing_ok=True)
            fsync_dir(out)
        replace_dir(staged, images)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    write_bytes(hcl, new_hcl)
    dockerfile = out / "Dockerfile"
    written = not dockerfile.exists()
    if written:
        write_bytes(dockerfile, DOCKERFILE.encode())
    return BakeResult(out, out / "docker-bake.hcl", dockerfile, written, all_targets, groups)
