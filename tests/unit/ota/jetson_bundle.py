"""A real Jetson bundle, built by ``edgepack build`` here, for the OTA and agent tests.

STAND-INS (named so): NGC's JetPack containers cannot be pulled here, so the image is built with
``--base oci-archive:`` of a STAND-IN arm64 base (one tiny layer, written by
tests/jetson_standin.py); and Debian has no CPython 3.10, so the target is a TEST-ONLY copy of the
shipped jetson-orin-nano target whose ``runtime.python`` / ``glibc`` are 3.11 / 2.36 (the wheels
edgepack's Linux images use). Every other field (L4T r36.3.0 and its range, TensorRT, SM 87) is
the shipped target's, so the bundle is what the GPU path builds: the engine key, the engine unit,
the device section and the GPU confinement.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TESTDATA
from tests.jetson_standin import stand_in_base, target_copy

MNIST = TESTDATA / "onnx" / "mnist.onnx"


def build_jetson_bundle(work: Path, *, target: str = "jetson-orin-nano") -> Path:
    """``edgepack build mnist.onnx --target <test-only copy> --base oci-archive:<stand-in>``,
    in-process; the bundle directory."""
    from packager.cli import main

    if not MNIST.is_file():
        pytest.skip(f"test data not found at {MNIST}")
    work.mkdir(parents=True, exist_ok=True)
    base = stand_in_base(work / "stand-in-base.tar")
    out = work / "bundle"
    with pytest.raises(SystemExit) as exited:
        main(["build", str(MNIST), "--target", str(target_copy(target, work / "targets")),
              "--base", f"oci-archive:{base}", "--version", "1.0.0", "--out", str(out),
              "--json"])  # fmt: skip
    assert exited.value.code == 0, f"edgepack build exited {exited.value.code}"
    return out
