"""Test support for the TensorRT INT8 tests: calibration/evaluation sets made from the real
handwritten 8 that ships with mnist.onnx (../shared/testdata/onnx/media/mnist_28.csv), and
edgepack's TensorRT INT8 build of mnist.onnx (a small CNN: 2 Conv + ReLU + MaxPool, Gemm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from tests.conftest import TESTDATA

MNIST = TESTDATA / "onnx" / "mnist.onnx"
DIGIT_CSV = TESTDATA / "onnx" / "media" / "mnist_28.csv"
INPUT = "Input3"


def digit() -> NDArray[np.float32]:
    values = np.array(DIGIT_CSV.read_text().replace("\n", ",").strip(",").split(","), float)
    return values.reshape(1, 1, 28, 28).astype(np.float32)


def variants(seed: int, count: int) -> list[NDArray[np.float32]]:
    """The real digit shifted by up to 3 pixels, rescaled and with pixel noise: inputs in the
    model's 0..255 range that look like handwriting, not uniform noise."""
    rng = np.random.default_rng(seed)
    base = digit()
    out = []
    for _ in range(count):
        shifted = np.roll(base, tuple(rng.integers(-3, 4, size=2)), axis=(2, 3))
        noisy = shifted * rng.uniform(0.7, 1.2) + rng.normal(0, 12, size=base.shape)
        out.append(np.clip(noisy, 0, 255).astype(np.float32))
    return out


def sample_dir(directory: Path, seed: int, count: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(variants(seed, count)):
        np.save(directory / f"{i:03d}.npy", array)
    return directory


def tensorrt_int8(work: Path) -> tuple[Path, dict[str, object]]:
    """mnist.onnx through edgepack's optimizer with the TensorRT profile and a top-1 gate."""
    from packager.optimize import optimize_for_build

    calibration = sample_dir(work / "calibration", seed=1, count=16)
    evaluation = sample_dir(work / "eval", seed=2, count=24)
    # What the core's OptimizeStep runs for a Jetson target: its runtime engine, tensorrt,
    # picks the TensorRT INT8 profile (packager.optimize.cpu.engine_int8_profile).
    return optimize_for_build(
        MNIST, "int8-static", calibration, evaluation, work / "opt",
        int8_profile="tensorrt", min_top1_agreement=0.95,
    )
