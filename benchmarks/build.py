"""Build-time figures for `edgepack build` (issue: the spine).

Prints, for mnist (26 KB) and a ~50 MB model, side by side in one run:
- cold build time (empty cache: apt resolution, .deb and wheel downloads, base extraction);
- warm build time: the same cache and a changed model (same size, new bytes), as when a release
  engineer ships a retrained model: nothing is downloaded, only the model layer is new;
- the time of a rebuild of identical inputs (every layer from the cache);
- the image size, compressed and uncompressed, per layer;
- the ratio of the warm build time to the time `gzip -6` takes over the same new layer bytes
  (the runtime and model layers, the only ones a warm build writes): the practical floor;
- (issue 16) the mnist image before/after the layer policy (`--no-slim` vs the default), each
  layer compressed and uncompressed, the same slim image with `--compression zstd`, and the
  runtime's cold start (time to ready, `edgepack run --smoke-test`, under qemu for an arm64
  target) of the full and the slim image, alternated, as a ratio.
- (issue 13) the same arm64 mnist image built the way CI pipelines build it today, `docker
  buildx build` of a Dockerfile FROM a local python base with `pip install onnxruntime` under
  qemu-user, vs `edgepack build`, cold and warm, side by side, as a ratio (`--buildx-only`).

Usage: python benchmarks/build.py [--target rpi4] [--keep DIR] [--starts N] [--slim-only]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import statistics
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


def build(
    model: Path, target: str, out: Path, cache: Path, *flags: str
) -> tuple[float, dict[str, Any]]:
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
            *flags,
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


def cold_start(bundle: Path, port: int) -> float:
    """Seconds from `podman run` to a ready runtime (`edgepack run --smoke-test`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "packager", "run", str(bundle), "--smoke-test", "--json",
         "--engine", "podman", "--port", str(port), "--timeout", "900"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"edgepack run failed: {proc.stderr}")
    return float(json.loads(proc.stdout)["ready_after_s"])


def slim_report(target: str, work: Path, starts: int) -> None:
    """Issue 16: full (--no-slim) vs slim image, gzip and zstd, and cold start side by side."""
    model = REPO / "tests" / "data" / "mnist.onnx"
    cache = work / "cache-slim"
    variants = {
        "full": build(model, target, work / "mnist-full", cache, "--no-slim")[1],
        "slim": build(model, target, work / "mnist-slim", cache)[1],
        "slim+zstd": build(model, target, work / "mnist-zstd", cache, "--compression", "zstd")[1],
    }
    print()
    print(f"layer policy ({target} mnist): compressed / uncompressed bytes per layer")
    header = "".join(f" {name:>24}" for name in variants)
    print(f"  {'layer':<8}{header}")
    names = [layer["name"] for layer in variants["full"]["image"]["layers"]]
    for index, name in enumerate(names):
        cells = ""
        for doc in variants.values():
            layer = doc["image"]["layers"][index]
            cells += f" {layer['size']:>11} / {layer['uncompressed_size']:>10}"
        print(f"  {name:<8}{cells}")
    cells = "".join(f" {doc['image']['size_bytes']:>11} {'(image.tar)':>12}"
                    for doc in variants.values())
    print(f"  {'archive':<8}{cells}")
    if starts <= 0:
        return
    # Alternate full and slim so that load on the machine hits both alike; best of N each.
    times: dict[str, list[float]] = {"full": [], "slim": []}
    for _ in range(starts):
        for label in ("full", "slim"):
            times[label].append(cold_start(Path(variants[label]["bundle"]), 19090))
    best = {label: min(values) for label, values in times.items()}
    median = {label: statistics.median(values) for label, values in times.items()}
    print()
    print(f"cold start to ready ({target}, {starts} alternated starts each):")
    for label, values in times.items():
        print(f"  {label:<5} best {best[label]:6.1f}s  median {median[label]:6.1f}s  "
              f"(all: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  slim/full: best {best['slim'] / best['full']:.2f}, "
          f"median {median['slim'] / median['full']:.2f}")


# --- issue 13: a buildx Dockerfile build (the way users do it today) vs edgepack build ----------

BUILDX_DOCKERFILE = """\
FROM edgepack-bench/python-arm64:bookworm
COPY requirements.txt /tmp/requirements.txt
# Under qemu-user: pip (and every RUN) executes arm64 code on this amd64 host.
RUN --mount=type=secret,id=ca-bundle \\
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \\
    python3 -m pip install --no-cache-dir --break-system-packages --no-deps \\
      -r /tmp/requirements.txt
COPY edgepack_runtime /opt/edgepack/edgepack_runtime
COPY model.onnx /opt/model/model.onnx
ENV PYTHONPATH=/opt/edgepack
USER 10001:10001
CMD ["python3", "-m", "edgepack_runtime.server"]
"""


def python_base(work: Path, given: Path | None) -> tuple[Path, float]:
    """An arm64 Debian bookworm rootfs with python3 and pip (the stand-in for Docker Hub's
    ``python:3.11-slim``, which cannot be pulled here): mmdebstrap minbase under qemu (needs
    arch-test, in the Makefile's apt list)."""
    if given is not None:
        return given, 0.0
    tar = work / "bookworm-arm64-python.tar"
    start = time.perf_counter()
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root", "--architectures=arm64",
         "--include=python3,python3-pip,ca-certificates", "bookworm", str(tar)],
        check=True, timeout=1800,
    )
    return tar, time.perf_counter() - start


def buildx_report(work: Path, base_tar: Path | None) -> None:
    """The rpi4 mnist bundle's content (onnxruntime + numpy pins, the runtime, the model) built
    as an arm64 image by ``docker buildx build`` from a local python base, pip under qemu, vs
    ``edgepack build``; both cold (nothing cached, every wheel downloaded) and warm (a new model
    over a warm cache). One private dockerd (tests/integration/dockerd.py), one run."""
    sys.path.insert(0, str(REPO))
    from tests.integration.dockerd import private_dockerd  # the test harness's daemon

    tar, base_s = python_base(work, base_tar)
    context = work / "buildx-context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir()
    (context / "Dockerfile").write_text(BUILDX_DOCKERFILE)
    shutil.copy(REPO / "packager" / "runtime" / "requirements.txt", context)
    shutil.copytree(REPO / "packager" / "runtime", context / "edgepack_runtime",
                    ignore=shutil.ignore_patterns("__pycache__", "requirements.txt"))
    model = REPO / "tests" / "data" / "mnist.onnx"
    shutil.copy(model, context / "model.onnx")
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    secret = ["--secret", f"id=ca-bundle,src={ca}"] if ca.is_file() else []
    timings: dict[str, float] = {}
    with private_dockerd(work) as daemon:
        daemon.docker("import", "--platform", "linux/arm64", tar,
                      "edgepack-bench/python-arm64:bookworm", timeout=600)

        def buildx(label: str, *flags: str) -> None:
            start = time.perf_counter()
            daemon.docker("buildx", "build", "--platform", "linux/arm64", "--network", "host",
                          *secret, *flags, "--output",
                          f"type=oci,dest={work / (label + '.oci.tar')}", context, timeout=3600)
            timings[f"buildx {label}"] = time.perf_counter() - start

        buildx("cold", "--no-cache")
        retrained(model, context / "model.onnx")
        buildx("warm")
    cache = work / "cache-buildx-row"
    shutil.rmtree(cache, ignore_errors=True)
    timings["edgepack cold"], _ = build(model, "rpi4", work / "bx-cold", cache)
    timings["edgepack warm"], _ = build(retrained(model, work / "bx-v2.onnx"), "rpi4",
                                        work / "bx-warm", cache)
    print()
    print("arm64 mnist image: docker buildx (FROM a local python base, pip install under qemu)"
          " vs edgepack build, one run")
    if base_s:
        print(f"  (making the local python base, mmdebstrap under qemu, uncounted: {base_s:.0f}s)")
    for kind in ("cold", "warm"):
        docker_s, edgepack_s = timings[f"buildx {kind}"], timings[f"edgepack {kind}"]
        print(f"  {kind}: buildx {docker_s:7.1f}s   edgepack {edgepack_s:7.1f}s   "
              f"buildx/edgepack {docker_s / edgepack_s:5.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="rpi4")
    parser.add_argument("--keep", type=Path, help="keep the work directory here")
    parser.add_argument("--starts", type=int, default=3, help="cold starts per image (0: none)")
    parser.add_argument("--slim-only", action="store_true", help="only the issue-16 figures")
    parser.add_argument("--buildx-only", action="store_true", help="only the issue-13 row")
    parser.add_argument("--no-buildx", action="store_true", help="leave out the issue-13 row")
    parser.add_argument("--python-base", type=Path,
                        help="issue 13: an arm64 bookworm rootfs tar with python3 and pip")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgepack-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.buildx_only:
        buildx_report(work, args.python_base)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.slim_only:
        slim_report(args.target, work, args.starts)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return
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
    slim_report(args.target, work, args.starts)
    if not args.no_buildx:
        buildx_report(work, args.python_base)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
