"""A bundle built with --ota-repo installs the update agent offline (wheels in the bundle) and the
agent installs and starts the channel's release: real TUF repository on loopback, real podman."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, build_json, edgepack, run_install_sh
from tests.unit.agent.helpers import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ota_bundle_installs_agent_and_release(
    onnx_dir: Path, edgepack_cache: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    edgepack("ota", "init", str(repo))
    root_json = repo / "repository" / "metadata" / "1.root.json"
    assert root_json.is_file()
    device = tmp_path / "device"
    container = "edgepack-otademo"
    subprocess.run(["podman", "rm", "-f", "-t", "1", container], capture_output=True)
    with Server(repo / "repository").running() as server:
        doc = build_json(
            str(onnx_dir / "mnist.onnx"),
            "--target",
            "industrial-pc",
            "--name",
            "otademo",
            "--version",
            "1.0.0",
            "--ota-repo",
            server.url,
            "--ota-root",
            str(root_json),
            "--out",
            str(tmp_path / "bundle"),
            "--cache-dir",
            str(edgepack_cache),
        )
        bundle = Path(doc["bundle"])
        files = {f["path"] for f in json.loads((bundle / "manifest.json").read_text())["files"]}
        assert "ota/root.json" in files and "ota/lib/edgepack_agent/__main__.py" in files
        assert any(f.startswith("ota/wheels/tuf-") for f in files)
        assert any(f.startswith("ota/wheels/cryptography-") for f in files)
        edgepack("ota", "publish", str(bundle), "--repo", str(repo))
        try:
            proc = run_install_sh(bundle, extra_env={"EDGEPACK_ROOT": str(device)})
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "otademo 1.0.0 is ready" in proc.stdout
            # The agent came from the bundle's wheels (no pip on the "device") and committed v1.
            lib = device / "opt/edgepack/ota-agent/lib"
            assert (lib / "tuf").is_dir() and (lib / "edgepack_agent").is_dir()
            status = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgepack_agent",
                    "status",
                    "--root",
                    str(device / "var/lib/edgepack-ota"),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(lib)},
                cwd=REPO,
            )
            assert status.returncode == 0, status.stderr
            assert '"installed": 1' in status.stdout or '"sequence": 1' in status.stdout
        finally:
            subprocess.run(["podman", "rm", "-f", "-t", "1", container], capture_output=True)
