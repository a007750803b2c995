"""Build-time figures for `edgepack build` (issue: the spine).

Prints, for mnist (26 KB) and a ~50 MB model, side by side in one run:
- cold build time (empty cache: apt resolution, .deb and wheel downloads, base extraction);
- warm build time: the same cache and a changed model (same size, new bytes), as when a release
  engineer ships a retrained model: nothing is downloaded, only the model layer is new;
- the time of a rebuild of identical inputs (every layer from the cache);
- the image size, compressed and uncompressed, per layer;
- the ratio of the warm build time to the time `gzip -6` takes over the same new layer bytes
  (the runtime and model layers, the only ones a warm build writes): the practical floor.

Usage: python benchmarks/build.py [--target rpi4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent


def big_model(path: Path, side: int = 3584) -> Path:
    """A MatMul with a [side, side] float32 weight: 3584^2 * 4 bytes = 51.4 MB, incompressible."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((side, side)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", side])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", side])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def retrained(model: Path, dest: Path) -> Path:
    """The same model with different bytes (a new doc string): a new model layer to write."""
    proto = onnx.load_model(str(model))
    proto.doc_string = f"retrained {time.time_ns()}"
    onnx.save_model(proto, dest)
    return dest


def build(model: Path, target: str, out: Path, cache: Path) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "packager",
            "build",
            str(model),
            "--target",
            target,
            "--out",
            str(out),
            "--version",
            "1.0.0",
            "--cache-dir",
            str(cache),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {proc.stderr}")
    return elapsed, json.loads(proc.stdout)


def new_layer_bytes(archive: Path, digests: list[str], dest: Path) -> Path:
    """The uncompressed tar bytes of the given layers, concatenated into one file."""
    with tarfile.open(archive) as tar, dest.open("wb") as sink:
        for digest in digests:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':')[1]}")
            assert member is not None
            with gzip.open(io.BufferedReader(member)) as layer:  # type: ignore[arg-type]
                shutil.copyfileobj(layer, sink)
    return dest


def gzip6_seconds(path: Path, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        with path.open("rb") as source:
            subprocess.run(
                ["gzip", "-6", "-c"], stdin=source, stdout=subprocess.DEVNULL, check=True
            )
        best = min(best, time.perf_counter() - start)
    return best


def mib(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="rpi4")
    parser.add_argument("--keep", type=Path, help="keep the work directory here")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    models = {
        "mnist": REPO / "tests" / "data" / "mnist.onnx",
        "big-50MB": big_model(work / "big.onnx"),
    }
    rows = []
    for label, model in models.items():
        cache = work / f"cache-{label}"
        shutil.rmtree(cache, ignore_errors=True)
        cold_s, _ = build(model, args.target, work / f"{label}-cold", cache)
        same_s, _ = build(model, args.target, work / f"{label}-same", cache)
        new_model = retrained(model, work / f"{label}-v2.onnx")
        warm_s, warm = build(new_model, args.target, work / f"{label}-warm", cache)
        layers = warm["image"]["layers"]
        written = [layer for layer in layers if layer["name"] not in warm["image"]["cached_layers"]]
        raw = new_layer_bytes(
            Path(warm["image"]["archive"]),
            [layer["digest"] for layer in written],
            work / f"{label}.layers",
        )
        floor = gzip6_seconds(raw)
        rows.append(
            (label, model.stat().st_size, cold_s, same_s, warm_s, warm, written, raw, floor)
        )

    print(f"target: {args.target}; work dir: {work}")
    print()
    print(
        f"{'model':<10} {'model size':>12} {'cold build':>11} {'no-op':>8} {'warm build':>11} "
        f"{'new layers':>12} {'gzip -6':>9} {'warm/gzip':>10}"
    )
    for label, size, cold_s, same_s, warm_s, _, written, raw, floor in rows:
        names = "+".join(layer["name"] for layer in written)
        print(
            f"{label:<10} {mib(size):>12} {cold_s:>10.2f}s {same_s:>7.2f}s {warm_s:>10.2f}s "
            f"{mib(raw.stat().st_size):>12} {floor:>8.3f}s {warm_s / floor:>9.1f}x  ({names})"
        )
    for label, _, _, _, _, warm, _, _, _ in rows:
        print()
        image = warm["image"]
        print(f"{label}: image.tar {mib(image['size_bytes'])}; digest {image['digest']}")
        print(f"  {'layer':<8} {'compressed':>13} {'uncompressed':>13} {'ratio':>6}  cached")
        total_c = total_u = 0
        for layer in image["layers"]:
            total_c += layer["size"]
            total_u += layer["uncompressed_size"]
            cached = "yes" if layer["name"] in image["cached_layers"] else "no"
            print(
                f"  {layer['name']:<8} {mib(layer['size']):>13} "
                f"{mib(layer['uncompressed_size']):>13} "
                f"{layer['size'] / max(layer['uncompressed_size'], 1):>6.2f}  {cached}"
            )
        print(f"  {'total':<8} {mib(total_c):>13} {mib(total_u):>13}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
