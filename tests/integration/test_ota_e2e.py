"""OTA end to end with the real things: bundles from `edgepack build`, the repository written by
`edgepack ota init/publish` and served on loopback HTTP with Range support, the device agent run
as the standalone package `edgepack_agent` (what install.sh puts on a device) driving podman, and
the runtime inside the image answering the Open Inference Protocol.

v1 (mnist) is installed; v2 (a different model, same served name) is a model-only update that
moves about one layer and keeps v1 for rollback; v3 carries a valid ONNX file whose operator the
runtime's onnxruntime refuses at session creation, so the real runtime exits, the agent rolls back
to v2 by itself and reports the release as failed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from packager.ota.wheels import DEVICE_PACKAGE, agent_source_dir
from packager.tools.containers import find_engine
from tests.integration.conftest import build_json, edgepack, free_port
from tests.integration.http_helpers import http_json, infer
from tests.model_factory import float_model
from tests.unit.agent.helpers import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE_ID = "e2e-device-0001"
TRIAL_S = 3.0


# --- models --------------------------------------------------------------------------------------


def mlp_digits_model(path: Path, *, hidden: int = 512, seed: int = 7) -> Path:
    """A different digits classifier (an MLP, 784 -> hidden -> 10) with fixed random weights.

    Its size (about 1.6 MB of float32, which gzip barely shrinks) is that of a small real model:
    the testdata models are a few KB, where TUF metadata and the bundle's text files, not the
    model, would dominate what an update moves.
    """
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((784, hidden)) * 0.05).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.01).astype(np.float32)
    w2 = (rng.standard_normal((hidden, 10)) * 0.05).astype(np.float32)
    b2 = np.zeros(10, dtype=np.float32)
    nodes = [
        helper.make_node("Flatten", ["image"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["scores"]),
    ]
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    return float_model(
        path, nodes, {"image": [1, 1, 28, 28]}, {"scores": [1, 10]}, weights, name="digits_mlp"
    )


UNKNOWN_DOMAIN = "com.edgepack.e2e.unknown"


def unservable_model(path: Path) -> Path:
    """A well-formed ONNX model (onnx.checker accepts it) with an operator from a domain no
    runtime implements: onnxruntime refuses it when the session is created."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["image"], ["scores"], domain=UNKNOWN_DOMAIN)],
        "unservable",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 10])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(UNKNOWN_DOMAIN, 1)],
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    with pytest.raises(Exception, match="Frobnicate"):  # the premise of v3
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return path


def mnist_sample(onnx_dir: Path) -> np.ndarray:
    values = (onnx_dir / "media" / "mnist_28.csv").read_text().replace("\n", ",").split(",")
    return np.asarray([float(v) for v in values if v.strip()], np.float32).reshape(1, 1, 28, 28)


# --- the device ----------------------------------------------------------------------------------


@dataclass
class Device:
    root: Path
    lib: Path  # holds the agent as the package `edgepack_agent`, as on a device
    repo_url: str
    report_url: str
    port: int
    engine_args: tuple[str, ...]

    @property
    def url(self) -> str:
        """Where the installed runtime answers."""
        return f"http://127.0.0.1:{self.port}"

    def agent(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        # cwd and PYTHONPATH hold only the copied agent: it must run without the rest of packager.
        return subprocess.run(
            [sys.executable, "-m", DEVICE_PACKAGE, *args],
            cwd=self.lib,
            env={**os.environ, "PYTHONPATH": str(self.lib)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_once(self, *, ready_timeout_s: float = 180.0) -> dict[str, Any]:
        proc = self.agent(
            "run",
            "--root", str(self.root),
            "--repo", self.repo_url,
            "--device-id", DEVICE_ID,
            "--platform", "linux/amd64",
            "--engine", "podman",
            *(f"--engine-arg={arg}" for arg in self.engine_args),
            "--port", str(self.port),
            "--report-url", self.report_url,
            "--ready-timeout", str(ready_timeout_s),
            "--trial", str(TRIAL_S),
            "--poll", "0.5",
            "--once",
        )  # fmt: skip
        lines = proc.stdout.strip().splitlines()
        assert lines, f"agent printed no result (exit {proc.returncode}):\n{proc.stderr}"
        result: dict[str, Any] = json.loads(lines[-1])
        expected_rc = 3 if result["outcome"] in ("failed", "rolled-back", "refused") else 0
        assert proc.returncode == expected_rc, proc.stderr
        result["log"] = proc.stderr
        return result

    def state(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.agent("status", "--root", str(self.root)).stdout)
        return document


def _publish_and_install(
    device: Device, repo: Path, bundle: Path, sequence: int, figures: dict[str, Any]
) -> dict[str, Any]:
    """``edgepack ota publish`` of ``bundle`` as release ``sequence``, then one agent cycle that
    commits it; the time from publish to committed goes into ``figures``."""
    started = time.monotonic()
    published = json.loads(
        edgepack("ota", "publish", str(bundle), "--repo", str(repo), "--json").stdout
    )
    assert published["sequence"] == sequence
    result = device.run_once()
    figures[f"v{sequence}_publish_to_committed_s"] = round(time.monotonic() - started, 2)
    outcome = (result["outcome"], result["sequence"], result["installed"])
    assert outcome == ("committed", sequence, sequence), result
    return result


def container_image(name: str) -> str:
    proc = subprocess.run(
        ["podman", "inspect", "--format", "{{.ImageName}}", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def container_confinement(name: str) -> dict[str, Any]:
    """What podman itself says confines the container (not what the agent meant to pass)."""
    fields = {
        "read_only": "{{.HostConfig.ReadonlyRootfs}}",
        "memory": "{{.HostConfig.Memory}}",
        "pids": "{{.HostConfig.PidsLimit}}",
        "cap_add": "{{.HostConfig.CapAdd}}",
        "effective_caps": "{{.EffectiveCaps}}",
        "security_opt": "{{.HostConfig.SecurityOpt}}",
        "restart": "{{.HostConfig.RestartPolicy.Name}}",
        "tmpfs": "{{.HostConfig.Tmpfs}}",
    }
    proc = subprocess.run(
        ["podman", "inspect", "--format", "|".join(fields.values()), name],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(zip(fields, proc.stdout.strip().split("|"), strict=True))


def podman_image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], capture_output=True).returncode == 0


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def name() -> Iterator[str]:
    """A served name unique to this run: containers and image refs cannot clash with others."""
    served = f"digits-{secrets.token_hex(3)}"
    yield served
    subprocess.run(["podman", "rm", "-f", "-t", "1", f"edgepack-{served}"], capture_output=True)
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        subprocess.run(["podman", "rmi", "-f", f"edgepack/{served}:{version}"], capture_output=True)


@pytest.fixture(scope="module")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, onnx_dir: Path, edgepack_cache: Path, name: str
) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ota-bundles")
    models = {
        "1.0.0": onnx_dir / "mnist.onnx",
        "2.0.0": mlp_digits_model(out / "digits_mlp.onnx"),
        "3.0.0": unservable_model(out / "unservable.onnx"),
    }
    built: dict[str, Path] = {}
    for version, model in models.items():
        doc = build_json(
            str(model),
            "--target", "industrial-pc",
            "--name", name,
            "--version", version,
            "--out", str(out / version),
            "--cache-dir", str(edgepack_cache),
            # The build refuses a model its runtime cannot load; v3 is that model on purpose.
            *(["--force"] if version == "3.0.0" else []),
        )  # fmt: skip
        assert doc["platform"] == "linux/amd64"
        built[version] = Path(doc["bundle"])
    return built


# --- the test ------------------------------------------------------------------------------------


def _layers(bundle: Path) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = json.loads((bundle / "manifest.json").read_text())["image"][
        "layers"
    ]
    return layers


def _blob_requests(server: Server, since: int) -> set[str]:
    return {
        path.rsplit("/", 1)[-1]
        for path, _ in server.requests[since:]
        if "/targets/blobs/sha256/" in path
    }


def test_install_update_and_automatic_rollback_with_podman(
    tmp_path: Path, bundles: dict[str, Path], onnx_dir: Path, name: str
) -> None:
    repo = tmp_path / "repo"
    edgepack("ota", "init", str(repo))
    lib = tmp_path / "device-lib"
    shutil.copytree(
        agent_source_dir(), lib / DEVICE_PACKAGE, ignore=shutil.ignore_patterns("__pycache__")
    )
    figures: dict[str, Any] = {}
    sample = mnist_sample(onnx_dir)
    container = f"edgepack-{name}"
    with Server(repo / "repository").running() as server:
        device = Device(
            root=tmp_path / "device",
            lib=lib,
            repo_url=server.url,
            report_url=server.url + "reports",
            port=free_port(),
            engine_args=find_engine("podman").run_flags,
        )
        init = device.agent(
            "init",
            "--root", str(device.root),
            "--trusted-root", str(repo / "repository/metadata/1.root.json"),
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        ready_url = f"http://127.0.0.1:{device.port}/v2/health/ready"
        assert http_json(ready_url)[0] == 0  # nothing listens yet

        # v1: a first install moves the whole image, and the real runtime serves mnist.
        first = _publish_and_install(device, repo, bundles["1.0.0"], 1, figures)
        assert first["bytes_fetched"] >= sum(layer["size"] for layer in _layers(bundles["1.0.0"]))
        assert http_json(ready_url) == (200, {"ready": True})
        assert container_image(container).endswith(f"edgepack/{name}:1.0.0")
        # The agent started it with the confinement of the bundle's unit (confinement.json):
        # industrial-pc's [service] memory_max_mb = 4096, the pids limit, no capabilities.
        confined = container_confinement(container)
        assert confined["read_only"] == "true", confined
        assert confined["memory"] == str(4096 * 1024 * 1024), confined
        assert confined["pids"] == "256", confined
        assert confined["cap_add"] == "[]" and confined["effective_caps"] == "[]", confined
        assert "no-new-privileges" in confined["security_opt"], confined
        assert confined["restart"] == "unless-stopped", confined
        assert "/tmp:rw,size=64m" in confined["tmpfs"], confined
        status, meta = http_json(f"http://127.0.0.1:{device.port}/v2/models/{name}")
        assert status == 200 and meta["inputs"][0]["name"] == "Input3"
        assert int(np.argmax(infer(device.url, name, "Input3", sample))) == 8

        # v2: a different model under the same name; only its new layer (and small files) move.
        requests_before = len(server.requests)
        second = _publish_and_install(device, repo, bundles["2.0.0"], 2, figures)
        v1_layers, v2_layers = _layers(bundles["1.0.0"]), _layers(bundles["2.0.0"])
        assert [layer["digest"] for layer in v1_layers[:-1]] == [
            layer["digest"] for layer in v2_layers[:-1]
        ], "v1 and v2 must share every layer but the model's"
        model_layer = v2_layers[-1]
        assert model_layer["name"] == "model" and model_layer["digest"] != v1_layers[-1]["digest"]
        figures["v2_model_layer_bytes"] = model_layer["size"]
        figures["v2_bytes_fetched"] = second["bytes_fetched"]
        figures["v2_image_tar_bytes"] = (bundles["2.0.0"] / "image.tar").stat().st_size
        # Everything the agent read from the repository in the cycle counts, TUF metadata too.
        assert second["bytes_fetched"] <= 1.1 * model_layer["size"], figures
        fetched_blobs = _blob_requests(server, requests_before)
        shared = {layer["digest"].removeprefix("sha256:") for layer in v1_layers[:-1]}
        assert model_layer["digest"].removeprefix("sha256:") in fetched_blobs
        assert not fetched_blobs & shared, "a layer the device already had was downloaded again"
        figures["v2_phase_s"] = {k: round(v, 2) for k, v in second["phase_s"].items()}
        assert http_json(ready_url) == (200, {"ready": True})
        assert container_image(container).endswith(f"edgepack/{name}:2.0.0")
        status, meta = http_json(f"http://127.0.0.1:{device.port}/v2/models/{name}")
        assert status == 200 and meta["inputs"][0]["name"] == "image"
        host = ort.InferenceSession(
            str(bundles["2.0.0"].parent / "digits_mlp.onnx"), providers=["CPUExecutionProvider"]
        ).run(None, {"image": sample})[0]
        served = infer(device.url, name, "image", sample)
        np.testing.assert_allclose(served.reshape(-1), host.reshape(-1), rtol=1e-4, atol=1e-5)
        # The previous version is kept, staged and loaded, for rollback.
        state = device.state()
        assert state["installed"]["sequence"] == 2 and state["previous"]["sequence"] == 1
        assert os.readlink(device.root / "current") == "releases/2"
        assert os.readlink(device.root / "previous") == "releases/1"
        assert (device.root / "releases/1/image.tar").is_file()
        assert podman_image_exists(f"edgepack/{name}:1.0.0")

        # v3: the runtime cannot load its model and never becomes ready: automatic rollback.
        started = time.monotonic()
        edgepack("ota", "publish", str(bundles["3.0.0"]), "--repo", str(repo))
        third = device.run_once(ready_timeout_s=90.0)
        figures["v3_publish_to_rolled_back_s"] = round(time.monotonic() - started, 2)
        assert (third["outcome"], third["sequence"], third["installed"]) == ("rolled-back", 3, 2)
        # The real runtime exited (onnxruntime refused the model), and v2 came back ready.
        assert third["reason"] == "runtime container exited before becoming ready", third
        assert podman_image_exists(f"edgepack/{name}:3.0.0")  # v3 really was loaded and run
        assert http_json(ready_url) == (200, {"ready": True})
        assert container_image(container).endswith(f"edgepack/{name}:2.0.0")
        status, meta = http_json(f"http://127.0.0.1:{device.port}/v2/models/{name}")
        assert status == 200 and meta["inputs"][0]["name"] == "image"
        state = device.state()
        assert state["installed"]["sequence"] == 2 and state["previous"]["sequence"] == 1
        assert state["failed"] == [3] and state["pending"] is None
        assert os.readlink(device.root / "current") == "releases/2"
        assert os.readlink(device.root / "previous") == "releases/1"
        assert not (device.root / "releases/3").exists()
        # Never retried: the next cycle leaves v2 running.
        again = device.run_once()
        assert (again["outcome"], again["installed"]) == ("idle", 2), again

        outcomes = [(r["sequence"], r["outcome"]) for r in server.reports]
        assert outcomes == [(1, "committed"), (2, "committed"), (3, "rolled-back")]
        assert all(r["device_id"] == DEVICE_ID for r in server.reports)

    # The publisher reads the reports as a failed release of the latest sequence.
    with (repo / "reports" / "http.jsonl").open("w") as handle:
        for report in server.reports:
            handle.write(json.dumps(report) + "\n")
    status_doc = json.loads(edgepack("ota", "status", "--repo", str(repo), "--json").stdout)
    assert status_doc["latest"]["sequence"] == 3
    assert status_doc["latest"]["failed"] == 1 and status_doc["latest"]["committed"] == 0
    assert status_doc["devices"][DEVICE_ID]["outcome"] == "rolled-back"
    sys.stderr.write(f"OTA e2e figures: {json.dumps(figures, sort_keys=True)}\n")
