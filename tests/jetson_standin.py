"""STAND-INS for what a Jetson build needs and cannot have here, shared by the Jetson tests.

NGC's JetPack containers (l4t-base / l4t-jetpack) cannot be pulled here, and Debian has no
CPython 3.6/3.8/3.10, so the tests build on a STAND-IN base and for TEST-ONLY COPIES of the
shipped Jetson targets:
- :func:`stand_in_spec`: a STAND-IN JetPack base built with edgepack's own Debian-base code
  (Debian 12 arm64, CPython 3.11) plus a fake ``/etc/nv_tegra_release`` (:func:`release_line`);
- :func:`stand_in_base`: a tiny STAND-IN arm64 base archive (one layer, one marker file) for
  builds whose image is never run;
- :func:`target_copy`: a shipped target with the stand-in's CPython and the test's runtime keys.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from packager.backends.jetson.container import RUNTIME_MIN_PYTHON
from packager.image.oci import MEDIA_LAYER_TAR
from packager.image.spec import DebianBase, FileEntry, FileLayer, ImageConfig, ImageSpec
from packager.resources import targets_dir
from tests.image_factory import base_archive, one_file_tar, plain_blob
from tests.target_files import dump_toml


def release_line(l4t: str) -> bytes:
    """A STAND-IN ``/etc/nv_tegra_release`` for L4T ``l4t`` ("r36.3.0"), in L4T's own form."""
    major, minor, patch = l4t.removeprefix("r").split(".")
    return (f"# R{major} (release), REVISION: {minor}.{patch}, GCID: 0, BOARD: generic, "
            "EABI: aarch64, DATE: STAND-IN\n").encode()  # fmt: skip


def stand_in_spec(l4t: str, *files: FileEntry) -> ImageSpec:
    """The STAND-IN JetPack base of L4T ``l4t``: Debian 12 arm64 with CPython 3.11 and a fake
    ``/etc/nv_tegra_release``, plus ``files``; named ``stand-in/l4t:<l4t>``."""
    release = FileEntry(dest="/etc/nv_tegra_release", source=release_line(l4t))
    return ImageSpec(
        platform_os="linux", arch="arm64", variant="v8",
        base=DebianBase(packages=("python3.11-minimal", "libpython3.11-stdlib",
                                  "libstdc++6", "libgcc-s1")),
        wheels=None,
        layers=(FileLayer(name="stand-in-l4t", files=(release, *files)),),
        config=ImageConfig(user="0:0", entrypoint=("/bin/sh",)),
        ref_name=f"stand-in/l4t:{l4t}",
    )  # fmt: skip


def stand_in_base(out: Path) -> Path:
    """A STAND-IN arm64 base image archive written to ``out``: one layer holding a marker file
    (no L4T, CUDA or TensorRT: for bundles that are built and verified, never run)."""
    layer = one_file_tar("etc/edgepack-stand-in",
                         b"STAND-IN JetPack base: no L4T, CUDA or TensorRT here\n")  # fmt: skip
    blob = plain_blob(out.with_suffix(".layer"), layer)
    return base_archive(out, [(blob, MEDIA_LAYER_TAR)], arch="arm64", ref="stand-in/l4t:r36.3.0")


def target_copy(name: str, out: Path, *, runs_here: bool = True, **runtime: Any) -> Path:
    """A TEST-ONLY copy of the shipped Jetson target ``name``, written to ``out/<name>.toml``
    (same name, so the bundle is named for the target), its ``[runtime]`` keys updated with
    ``runtime`` (e.g. ``base``: the stand-in's pinned reference). CPython 3.11 / glibc 2.36
    (the stand-in's) when the image ``runs_here``, and for a target whose own CPython cannot run
    the runtime (JetPack 4's 3.6: 3.11 builds its GPU path at all); else the target's own
    CPython (JetPack 5's 3.8, 6's 3.10), so that the image carries that CPython's pinned wheels
    as on a device (built and verified, not run: the stand-in has no such interpreter)."""
    doc = tomllib.loads((targets_dir() / f"{name}.toml").read_text())
    own = doc["runtime"]["python"]
    if runs_here or tuple(map(int, own.split("."))) < RUNTIME_MIN_PYTHON:
        doc["runtime"].update(python="3.11", glibc="2.36")
    doc["runtime"].update(runtime)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.toml"
    path.write_text(dump_toml(doc))
    return path
