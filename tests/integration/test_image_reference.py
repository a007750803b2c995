"""--name/--version at the edge of the OCI reference grammar build a bundle that real podman
loads under exactly that reference, and the text summary reports the built image's real sizes
(the figures the manifest records), not the pre-build estimate."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from packager.fit import human_bytes
from tests.integration.conftest import edgepack

pytestmark = [pytest.mark.integration]

# Allowed, and as odd as the grammar allows: '__' and a run of '-' in the name, '.', '-' and '_'
# in the tag.
NAME = "mnist__edge--case.v1"
VERSION = "1.0.0-rc.1_b2"


def test_edge_case_reference_loads_in_podman_and_summary_has_real_sizes(
    tmp_path: Path, onnx_dir: Path, edgepack_cache: Path
) -> None:
    out = tmp_path / "bundle"
    proc = edgepack(
        "build", str(onnx_dir / "mnist.onnx"), "--target", "industrial-pc", "--out", str(out),
        "--name", NAME, "--version", VERSION, "--cache-dir", str(edgepack_cache),
    )
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["image"]["ref"].endswith(f"edgepack/{NAME}:{VERSION}")

    # The summary's storage line: the manifest's (built image) figures, marked as such.
    storage = next(r for r in manifest["fit"]["resources"] if r["name"] == "storage")
    installed = storage["needed_parts"]["image (installed)"]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("storage:"))
    assert line.startswith(f"storage:  {human_bytes(storage['needed_bytes'])} of ")
    assert f"image (installed) {human_bytes(installed)}" in line and line.endswith("[built image]")
    assert "image (installed) 160.0 MiB" not in line  # the pre-build estimate (fit.py)

    edgepack("verify", str(out))
    ref = f"docker.io/edgepack/{NAME}:{VERSION}"
    try:
        loaded = subprocess.run(
            ["podman", "load", "-i", str(out / "image.tar")],
            capture_output=True, text=True, timeout=300,
        )
        assert loaded.returncode == 0, loaded.stderr
        assert re.search(rf"Loaded image: \S*edgepack/{re.escape(NAME)}:{re.escape(VERSION)}$",
                         loaded.stdout.strip(), re.M), loaded.stdout
        tags = subprocess.run(
            ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout.split()
        assert ref in tags
    finally:
        subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, timeout=120)
