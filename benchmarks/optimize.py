"""Size, latency and accuracy of each optimization variant of mnist.onnx on this host.

    .venv/bin/python benchmarks/optimize.py [--runs 200]

Runs the real ``edgepack optimize`` pipeline once per variant (fp16, int8-dynamic, int8-static
QDQ and QOperator) and prints one table. Latency is onnxruntime on this CPU, one thread, median;
on a shared machine it is noisy, so compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from packager.console import console
from packager.optimize import OptimizeRequest, optimize
from packager.optimize.request import QuantFormatName, Quantize

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "onnx"


def _datasets(root: Path) -> tuple[Path, Path]:
    """Calibration: shifted copies of the README's 8 and noise; eval: other shifts and noise."""
    eight = np.loadtxt(TESTDATA / "media" / "mnist_28.csv", delimiter=",", dtype=np.float32)
    eight = eight.reshape(28, 28)
    rng = np.random.default_rng(0)

    def batch(count: int) -> np.ndarray:
        images = []
        for i in range(count):
            shifted = np.roll(eight, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
            noise = rng.uniform(0, 255, size=(28, 28)) * (rng.random((28, 28)) < 0.1)
            image = shifted if i % 2 == 0 else np.clip(0.6 * shifted + noise, 0, 255)
            images.append(image.astype(np.float32))
        return np.stack(images)[:, None]

    calibration, evaluation = root / "calibration", root / "eval"
    calibration.mkdir()
    evaluation.mkdir()
    np.save(calibration / "set.npy", batch(32))
    np.save(evaluation / "set.npy", batch(64))
    return calibration, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    console.configure(quiet=True)
    variants: list[tuple[str, Quantize, QuantFormatName]] = [
        ("fp16", "fp16", "QDQ"),
        ("int8-dynamic", "int8-dynamic", "QDQ"),
        ("int8-static QDQ", "int8-static", "QDQ"),
        ("int8-static QOperator", "int8-static", "QOperator"),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calibration, evaluation = _datasets(root)
        for label, quantize, fmt in variants:
            result = optimize(
                OptimizeRequest(
                    model=TESTDATA / "mnist.onnx",
                    out=root / label.replace(" ", "-"),
                    quantize=quantize,
                    quant_format=fmt,
                    calibration=calibration if quantize == "int8-static" else None,
                    eval_dir=evaluation,
                    latency_runs=args.runs,
                )
            )
            fp32, final = result.report.variants[0], result.report.variants[-1]
            if not rows:
                rows.append(("fp32", fp32.size_bytes, fp32.latency_ms, 1.0, None, None))
            metrics = final.metrics
            assert metrics is not None
            rows.append(
                (
                    label,
                    final.size_bytes,
                    final.latency_ms,
                    fp32.latency_ms / final.latency_ms,
                    metrics.top1_agreement,
                    metrics.max_abs_error,
                )
            )
    header = f"{'variant':<22} {'size B':>8} {'size %':>7} {'median ms':>10} {'speed-up':>9} "
    header += f"{'top-1 vs fp32':>14} {'max abs err':>12}"
    print(f"mnist.onnx, onnxruntime CPU, 1 thread, median of {args.runs} runs")
    print(header)
    base_size = rows[0][1]
    for name, size, latency, speedup, agreement, error in rows:
        agree = "-" if agreement is None else f"{agreement:.2%}"
        err = "-" if error is None else f"{error:.4g}"
        print(
            f"{name:<22} {size:>8,} {size / base_size:>7.0%} {latency:>10.4f} "
            f"{speedup:>8.2f}x {agree:>14} {err:>12}"
        )


if __name__ == "__main__":
    main()
