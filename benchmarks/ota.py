"""OTA figures on loopback: bytes moved (full install, model-only update, whole image tar), time
to verify and switch, and time from publish to committed on one device.

    .venv/bin/python benchmarks/ota.py [--model-mb 8] [--base-mb 40]

Bundles are synthetic OCI layouts (random, incompressible layers of the given sizes) and the
container engine is the test suite's fake engine, so the figures isolate the OTA machinery.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packager.agent.agent import Agent, init_device
from packager.ota.repo import Repository
from tests.unit.agent.helpers import (
    Server,
    config,
    free_port,
    kill_containers,
    make_engine,
)
from tests.unit.ota.synth import make_bundle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-mb", type=float, default=8)
    parser.add_argument("--base-mb", type=float, default=40)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    os.environ["FAKE_ENGINE_STATE"] = str(tmp / "engine")
    engine = make_engine(tmp / "engine")
    base = random.Random(0).randbytes(int(args.base_mb * 2**20))
    bundles = [
        make_bundle(
            tmp / f"b{i}",
            version=f"{i}.0.0",
            base=base,
            model=random.Random(i).randbytes(int(args.model_mb * 2**20)),
        )
        for i in (1, 2)
    ]
    repo = Repository.init(tmp / "repo")
    root = tmp / "device"
    init_device(root, repo.trusted_root)
    port = free_port()
    try:
        with Server(repo.path / "repository").running() as server:
            cfg = config(root, server.url, engine, port, trial_s=0.0)
            rows = []
            for bundle in bundles:
                start = time.perf_counter()
                repo.publish(bundle.path)
                result = Agent(cfg).run_once()
                total = time.perf_counter() - start
                assert result.outcome == "committed", result
                phases = result.extra["phase_s"]
                switch = sum(phases.get(p, 0.0) for p in ("verify", "stage", "switch", "commit"))
                rows.append((bundle, result.bytes_fetched, switch, total))
    finally:
        kill_containers(tmp / "engine")
    tar = (bundles[1].path / "image.tar").stat().st_size
    model_layer = bundles[1].layer_sizes["model"]
    print(f"image.tar (whole image)          {tar:>12,} bytes")
    print(f"new model layer (compressed)     {model_layer:>12,} bytes")
    print(f"full first install fetched       {rows[0][1]:>12,} bytes")
    print(
        f"model-only update fetched        {rows[1][1]:>12,} bytes"
        f"  ({rows[1][1] / model_layer:.3f}x model layer, {rows[1][1] / tar:.3f}x image.tar)"
    )
    for label, row in (("first install", rows[0]), ("model-only update", rows[1])):
        print(
            f"{label:<18} verify+stage+switch+commit {row[2]:.2f} s,"
            f" publish->committed {row[3]:.2f} s"
        )


if __name__ == "__main__":
    main()
