"""``plan_build``: everything a build decides before it writes a byte, decided once.

The target is resolved once, its backend looked up once, the bundle's name, version, output and
cache directories fixed, the flags checked, and the source steps (conversion, runtime
compatibility, optimization) chosen by the backend. ``packager.build.execute`` runs the plan.
Nothing here writes a file or runs a tool; the model is not even loaded (its format comes from
its name, packager.models.model_format).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from packager.backends import get_backend
from packager.backends.base import (
    Backend,
    BuildRequest,
    ConvertStep,
    SourceModel,
    SourceStep,
    bundle_name,
)
from packager.errors import InputError, UsageError
from packager.models import code_form, model_format
from packager.models.trust import check_trusted
from packager.targets import VERSION_FORM, LoadedTarget, resolve_target


@dataclass(frozen=True)
class BuildPlan:
    """A build, decided: what :func:`packager.build.execute` runs."""

    request: BuildRequest  # with ``name`` and ``version`` as decided here (backends read them)
    target: LoadedTarget
    backend: Backend = field(compare=False, repr=False)  # the target's device class's backend
    name: str  # the bundle's (served model's) name, packager.backends.base.bundle_name
    version: str  # the image tag / bundle version
    out: Path  # absolute path of the finished bundle
    cache_dir: Path  # base layers, wheels, OTA agent wheels
    source: SourceModel  # the user's model, before any step
    steps: tuple[SourceStep, ...]  # in order; run in the build's work directory


def default_cache_dir() -> Path:
    """``$EDGEPACK_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgepack`` (``~/.cache/edgepack``)."""
    env = os.environ.get("EDGEPACK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack"


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


def output_dir(request: BuildRequest, name: str, version: str) -> Path:
    """``--out``, else ``out/NAME-VERSION``, absolute. UsageError (exit 2) when it cannot be a
    bundle: a component above it is a file, or it exists and holds no ``manifest.json``."""
    out = (request.out if request.out is not None else Path("out") / f"{name}-{version}")
    out = out.absolute()
    for parent in reversed(out.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(
                f"--out: {out}: {parent} is a file, not a directory",
                hint="choose an --out whose parent folders are directories",
            )
    if out.exists() and not (out / "manifest.json").is_file():
        raise UsageError(
            f"--out: {out} exists and is not an edgepack bundle",
            hint="choose another directory or remove it",
        )
    return out


def plan_build(request: BuildRequest) -> BuildPlan:
    """Check every flag and decide the build, without writing or running anything.

    Order (the first problem wins): ``--name``, ``--version`` (UsageError, exit 2), the target
    (TargetError, exit 4), the backend's own flags (``Backend.check_request``), the model file
    (InputError, exit 3), its format and the backend's source steps (UnsupportedError, exit 10),
    a PyTorch file or SavedModel without ``--trust-model-code`` (InputError: loading it runs
    code from it, packager.models.trust),
    ``--out`` (UsageError)."""
    name = bundle_name(request)
    version = check_version(request.version)
    target = resolve_target(request.target)
    backend = get_backend(target.device_class)
    decided = replace(request, name=name, version=version)
    backend.check_request(decided)
    if not request.model.exists():
        raise InputError(f"{request.model}: model file not found", hint="check the path")
    source = SourceModel(path=request.model, format=model_format(request.model))
    planned = backend.source_steps(decided, source, target)
    # A form whose loading runs code from the file (PyTorch, a SavedModel): refused before any
    # step runs unless the builder vouches for it.
    check_trusted(request.model, code_form(request.model), request.trust_model_code)
    # The builder's word is the request's, not a backend's to forget: every step that loads
    # the source carries it.
    steps = tuple(
        replace(step, trust_model_code=request.trust_model_code)
        if isinstance(step, ConvertStep)
        else step
        for step in planned
    )
    return BuildPlan(
        request=decided,
        target=target,
        backend=backend,
        name=name,
        version=version,
        out=output_dir(request, name, version),
        cache_dir=request.cache_dir or default_cache_dir(),
        source=source,
        steps=steps,
    )
