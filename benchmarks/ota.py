"""OTA figures on loopback: bytes moved (full install, model-only update, whole image tar), time
to verify and switch, and time from publish to committed on one device.

    .venv/bin/python benchmarks/ota.py [--model-mb 8] [--base-mb 40]
    .venv/bin/python benchmarks/ota.py --real [--cache-dir DIR] [--v2-model PATH]

Synthetic (default): OCI layouts with random, incompressible layers of the given sizes and the
test suite's fake engine, so the figures isolate the OTA machinery.

--real: bundles built by `edgepack build` for industrial-pc (amd64; v1 serves
../shared/testdata/onnx/mnist.onnx, v2 serves another model under the same name, by default
Network.onnx), installed by the agent with podman, each release committed only after the real
runtime answered ready for the trial window. The testdata models are a few KB, so there the fixed
per-update cost (TUF metadata, release document, the bundle's text files) dominates the
model-only figure; pass a bigger --v2-model to see the ratio for a realistically sized model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packager.agent.agent import Agent, AgentConfig, init_device
from packager.ota.repo import Repository
from tests.unit.agent.helpers import (
    Server,
    config,
    free_port,
    kill_containers,
    make_engine,
)
from tests.unit.ota.synth import make_bundle

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = REPO_ROOT.parent / "shared" / "testdata" / "onnx"


@dataclass(frozen=True)
class Row:
    label: str
    bundle: Path
    bytes_fetched: int
    verify_switch_s: float  # verify + stage (assemble and load the image) + switch + commit
    trial_s: float
    publish_to_committed_s: float


def _model_layer_size(bundle: Path) -> int:
    layers = json.loads((bundle / "manifest.json").read_text())["image"]["layers"]
    return int(layers[-1]["size"])


def install_all(repo: Repository, bundles: list[tuple[str, Path]], make_config: Any) -> list[Row]:
    """Publish each bundle and run one agent cycle; every one must commit."""
    rows: list[Row] = []
    with Server(repo.path / "repository").running() as server:
        cfg: AgentConfig = make_config(server.url)
        for label, bundle in bundles:
            start = time.perf_counter()
            repo.publish(bundle)
            result = Agent(cfg).run_once()
            total = time.perf_counter() - start
            assert result.outcome == "committed", result
            phases = result.extra["phase_s"]
            switch = sum(phases.get(p, 0.0) for p in ("verify", "stage", "switch", "commit"))
            rows.append(
                Row(label, bundle, result.bytes_fetched, switch, phases.get("trial", 0.0), total)
            )
    return rows


def report(rows: list[Row], trial_window_s: float) -> None:
    first, update = rows
    tar = (update.bundle / "image.tar").stat().st_size
    model_layer = _model_layer_size(update.bundle)
    print(f"image.tar (whole image, v2)      {tar:>12,} bytes")
    print(f"new model layer (compressed)     {model_layer:>12,} bytes")
    print(f"full first install fetched       {first.bytes_fetched:>12,} bytes")
    print(
        f"model-only update fetched        {update.bytes_fetched:>12,} bytes"
        f"  ({update.bytes_fetched / model_layer:.3f}x model layer,"
        f" {update.bytes_fetched / tar:.4f}x image.tar,"
        f" {update.bytes_fetched - model_layer:,} bytes besides the layer)"
    )
    for row in rows:
        print(
            f"{row.label:<18} verify+stage+switch+commit {row.verify_switch_s:6.2f} s,"
            f" trial {row.trial_s:5.2f} s (window {trial_window_s:g} s),"
            f" publish->committed {row.publish_to_committed_s:6.2f} s"
        )


def synthetic(args: argparse.Namespace, tmp: Path) -> None:
    os.environ["FAKE_ENGINE_STATE"] = str(tmp / "engine")
    engine = make_engine(tmp / "engine")
    base = random.Random(0).randbytes(int(args.base_mb * 2**20))
    bundles = [
        (
            label,
            make_bundle(
                tmp / f"b{i}",
                version=f"{i}.0.0",
                base=base,
                model=random.Random(i).randbytes(int(args.model_mb * 2**20)),
            ).path,
        )
        for i, label in ((1, "first install"), (2, "model-only update"))
    ]
    repo = Repository.init(tmp / "repo")
    root = tmp / "device"
    init_device(root, repo.trusted_root)
    port = free_port()
    try:
        rows = install_all(repo, bundles, lambda url: config(root, url, engine, port, trial_s=0.0))
    finally:
        kill_containers(tmp / "engine")
    print(f"synthetic bundles: base {args.base_mb} MB, model {args.model_mb} MB, fake engine")
    report(rows, 0.0)


def _build(model: Path, name: str, version: str, out: Path, cache: Path) -> Path:
    proc = subprocess.run(
        [
            sys.executable, "-m", "packager", "build", str(model),
            "--target", "industrial-pc", "--name", name, "--version", version,
            "--out", str(out), "--cache-dir", str(cache), "--json",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"edgepack build {model} failed:\n{proc.stderr}")
    return Path(json.loads(proc.stdout)["bundle"])


def real(args: argparse.Namespace, tmp: Path) -> None:
    from packager.tools.containers import find_engine

    name = f"digits-bench-{secrets.token_hex(3)}"
    cache = args.cache_dir or tmp / "cache"
    models = [
        ("first install", args.v1_model, "1.0.0"),
        ("model-only update", args.v2_model, "2.0.0"),
    ]
    started = time.perf_counter()
    bundles = [
        (label, _build(model, name, version, tmp / version, cache))
        for label, model, version in models
    ]
    build_s = time.perf_counter() - started
    repo = Repository.init(tmp / "repo")
    root = tmp / "device"
    init_device(root, repo.trusted_root)
    port = free_port()
    engine_args = find_engine("podman").run_flags
    try:
        rows = install_all(
            repo,
            bundles,
            lambda url: config(
                root,
                url,
                Path("podman"),
                port,
                engine_args=engine_args,
                ready_timeout_s=180.0,
                trial_s=args.trial,
                poll_s=0.5,
                device_id="bench-device",
            ),
        )
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "1", f"edgepack-{name}"], capture_output=True)
        for _, _, version in models:
            subprocess.run(
                ["podman", "rmi", "-f", f"edgepack/{name}:{version}"], capture_output=True
            )
    print(
        f"real bundles (edgepack build, industrial-pc, {build_s:.1f} s to build both):"
        f" v1 {args.v1_model.name} -> v2 {args.v2_model.name}, podman {' '.join(engine_args)}"
    )
    report(rows, args.trial)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-mb", type=float, default=8)
    parser.add_argument("--base-mb", type=float, default=40)
    parser.add_argument("--real", action="store_true", help="edgepack build + podman")
    parser.add_argument("--cache-dir", type=Path, help="edgepack build cache (--real)")
    parser.add_argument("--v1-model", type=Path, default=TESTDATA / "mnist.onnx")
    parser.add_argument("--v2-model", type=Path, default=TESTDATA / "Network.onnx")
    parser.add_argument("--trial", type=float, default=3.0, help="trial window, s (--real)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    try:
        if args.real:
            real(args, tmp)
        else:
            synthetic(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
