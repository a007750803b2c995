"""What a Jetson bundle's image is built on, and what serves in it, per JetPack generation.

The image's runtime is edgepack's Python server with its wheels; TensorRT's Python bindings come
from the JetPack container and exist only for its system CPython (3.6 on JetPack 4, 3.8 on
JetPack 5, 3.10 on JetPack 6). So:

- where edgepack's runtime runs on the base's CPython (>= :data:`RUNTIME_MIN_PYTHON`), the image
  is the JetPack container (pinned by digest) + wheels for that CPython + runtime + model, and the
  runtime serves the TensorRT engine the device builds on first boot ("tensorrt");
- where it does not, the image is edgepack's own Debian base (CPython 3.11) + the usual runtime,
  and the bundle serves with onnxruntime on the CPU ("onnxruntime-cpu"), said in ``targets show``
  and the build output. No engine is built: nothing in that image could load it.

Why 3.8: packager/runtime keeps to CPython 3.8 (no ``zip(strict=)``, no builtin generics or
``X | Y`` unions evaluated at run time; tests/unit/runtime/test_min_python.py checks it with
vermin and an AST walk), so JetPack 5 (3.8) and JetPack 6 (3.10) serve the TensorRT engine.
JetPack 4's 3.6 cannot even import it (``from __future__ import annotations`` and
``dataclasses`` are 3.7+), so it falls back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from packager.errors import TargetError
from packager.image.registry import parse_pinned
from packager.image.spec import RegistryBase
from packager.targets import CONTAINER_CONTRACTS, JetsonTarget

RUNTIME_MIN_PYTHON = (3, 8)

# The runtime's wheels per base CPython: the newest onnxruntime / numpy releases that publish a
# linux/aarch64 wheel for it within the base's glibc, checked with `pip download --only-binary=:all:
# --no-deps --python-version X.Y` and every --platform tag of packager.tools.pip.platform_tags
# ("arm64", glibc) (pip takes --platform literally: manylinux_2_31 alone matches no
# manylinux_2_17/2_27 wheel). 3.8 (JetPack 5, glibc 2.31): onnxruntime 1.19.2 (cp38
# manylinux_2_27/2_28 aarch64; 1.20.0 has no cp38 wheel) and numpy 1.24.4 (cp38 manylinux2014
# aarch64; 1.25 dropped 3.8), the last releases for 3.8. tests/integration/
# test_jetson_runtime_pins.py serves with exactly these versions. 3.11 takes
# packager/runtime/requirements.txt (Debian 12, the Linux images' pins).
WHEEL_PINS: dict[str, tuple[str, ...]] = {
    "3.8": ("onnxruntime==1.19.2", "numpy==1.24.4"),
    "3.10": ("onnxruntime==1.23.2", "numpy==2.2.6"),
}

Serving = Literal["tensorrt", "onnxruntime-cpu"]


@dataclass(frozen=True)
class ContainerChoice:
    """The image's base and interpreter for a Jetson target (pure data)."""

    serving: Serving
    python: str  # "3.8", "3.10", "3.11"
    glibc: tuple[int, int]
    # The JetPack container, pinned; None: edgepack's Debian base (the fallback generation) or
    # the user's --base.
    base: RegistryBase | None
    fallback_reason: str | None  # why the GPU is not used; None when it is

    @property
    def interpreter(self) -> str:
        return f"/usr/bin/python{self.python}"

    @property
    def builds_engine(self) -> bool:
        return self.serving == "tensorrt"


def _major_minor(version: str) -> tuple[int, int]:
    """``"3.8"`` -> ``(3, 8)``: a CPython or glibc version as the target file gives it."""
    major, minor = version.split(".")
    return int(major), int(minor)


def pinned_base(spec: JetsonTarget, source: str) -> RegistryBase:
    """``runtime.base`` as a pinned registry reference (``REPO[:TAG]@sha256:HEX`` ->
    ``docker://REPO@sha256:HEX``); TargetError naming the file and field when it has no digest."""
    ref = spec.runtime.base
    repo, at, digest = ref.partition("@")
    if not at:
        raise TargetError(
            f"{source}: runtime.base: {ref} is not pinned by digest, and edgepack builds only on "
            "a pinned base (same inputs, same image)",
            hint=f"pin it: skopeo inspect --raw docker://{ref} | sha256sum, then "
            f"base = \"{ref}@sha256:<hex>\" in the target file; or pass --base "
            "docker://REGISTRY/REPO@sha256:HEX or --base oci-archive:PATH",
        )
    # A tag next to the digest is documentation; the digest is what is pulled.
    name = re.sub(r":[A-Za-z0-9_][A-Za-z0-9._-]*$", "", repo) if "/" in repo else repo
    return parse_pinned(f"docker://{name}@{digest}", f"{source}: runtime.base")


def choose(spec: JetsonTarget, source: str, *, user_base: bool) -> ContainerChoice:
    """The container for ``spec``; with ``user_base`` (``--base``) the target's own base is
    neither needed nor checked. TargetError for an unpinned base the build would need."""
    runtime = spec.runtime
    glibc = _major_minor(runtime.glibc)
    if _major_minor(runtime.python) < RUNTIME_MIN_PYTHON:
        minimum = ".".join(str(p) for p in RUNTIME_MIN_PYTHON)
        reason = (
            f"JetPack {runtime.jetpack} (L4T {runtime.l4t}) ships CPython {runtime.python}, the "
            f"only one TensorRT's Python bindings exist for there, and edgepack's runtime needs "
            f"CPython >= {minimum}: the image is built on edgepack's Debian base and serves with "
            "onnxruntime on the CPU (engine: absent, fallback: onnxruntime-cpu); no TensorRT "
            "engine is built"
        )
        return ContainerChoice("onnxruntime-cpu", "3.11", (2, 36), None, reason)
    base = None if user_base else pinned_base(spec, source)
    return ContainerChoice("tensorrt", runtime.python, glibc, base, None)


def wheel_requirements(choice: ContainerChoice, default: tuple[str, ...]) -> tuple[str, ...]:
    """The runtime's pinned wheels for the image's CPython (``default``: requirements.txt's)."""
    if choice.python == "3.11":
        return default
    pins = WHEEL_PINS.get(choice.python)
    if pins is None:  # pragma: no cover - choose() picks only a pinned CPython (3.8, 3.10) or 3.11
        raise TargetError(f"no runtime wheels are pinned for CPython {choice.python}")
    return pins


def describe(
    spec: JetsonTarget, choice: ContainerChoice, user_base: str | None = None
) -> tuple[str, ...]:
    """Lines for ``targets show`` and the build: generation, container, range, serving. The base
    named is the one the image is built on: ``user_base`` (``--base``) when given, else
    edgepack's Debian base for the CPU fallback, else the target's ``runtime.base``."""
    runtime = spec.runtime
    low, below = runtime.l4t_range
    if user_base is not None:
        base = f"{user_base} (--base; CPython {choice.python} expected)"
    elif choice.fallback_reason:
        base = f"edgepack's Debian base (CPython {choice.python}), not {runtime.base}"
    else:
        base = f"{runtime.base} (CPython {runtime.python})"
    lines = [
        f"JetPack {runtime.jetpack}, L4T {runtime.l4t} (devices {low} up to, not incl., "
        f"{below}), TensorRT {runtime.tensorrt}, CUDA {runtime.cuda}, SM {spec.sm}, "
        f"{runtime.dla_cores} DLA core(s)",
        f"container ({runtime.generation}): {CONTAINER_CONTRACTS[runtime.generation]}; "
        f"base {base}",
    ]
    if choice.fallback_reason:
        lines.append(f"serving: onnxruntime-cpu fallback: {choice.fallback_reason}")
    else:
        lines.append(
            "serving: TensorRT engine built on the device at first boot (preflight, then "
            "trtexec), onnxruntime on the CPU until it is loaded"
        )
    return tuple(lines)
