"""Jetson bundles built for real, on a STAND-IN JetPack base served by a loopback registry.

What cannot exist here, and its stand-in (named so everywhere below):
- NGC's registry and the JetPack containers (l4t-base / l4t-jetpack): a STAND-IN base image, built
  once per session with edgepack's own Debian-base code (tests/jetson_standin.py: Debian 12
  arm64, CPython 3.11) plus a fake
  ``/etc/nv_tegra_release`` (the target's L4T release) and a fake
  ``/usr/src/tensorrt/bin/trtexec`` (a shell script that only says it is a stand-in). Debian has no
  CPython 3.6/3.8/3.10, so the stand-in cannot carry the real bases' interpreters: the test builds
  TEST-ONLY COPIES of the shipped Jetson targets whose ``runtime.base`` is the stand-in's digest
  in the loopback registry. The bundle builds keep JetPack 5's and 6's own CPython (3.8, 3.10),
  so their images carry the real pinned cp38/cp310 aarch64 wheels (built and verified, not run);
  JetPack 4's copy (3.6 cannot run the runtime) and the image served under qemu take 3.11
  (glibc 2.36), the stand-in's. Every other field (L4T, TensorRT, SM, DLA, workspace) is the
  shipped target's, so the GPU path of every generation is what is built: the image on the
  pulled base, the engine key, the engine unit.
- The registry: Debian's ``docker-registry`` on 127.0.0.1 (ports 19400-19499), plain HTTP, the base
  pushed by skopeo and pulled BY DIGEST by edgepack through skopeo.
- A GPU: none; the arm64 image runs under qemu in podman and serves mnist through the
  onnxruntime fallback, which the runtime reports as "engine: absent, fallback: onnxruntime-cpu".
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from packager.backends.jetson.container import WHEEL_PINS
from packager.image.builder import build_image
from packager.image.spec import FileEntry
from packager.resources import targets_dir
from tests.integration.conftest import REPO, build_json, edgepack, free_port_in
from tests.integration.dockerd import Registry, running_registry
from tests.jetson_standin import stand_in_spec, target_copy
from tests.oci_files import model_files, model_layer_files
from tests.process_guard import Processes, terminate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MNIST = Path("/work/shared/testdata/onnx/mnist.onnx")
TARGETS = ("jetson-nano", "jetson-xavier-nx", "jetson-orin-nano")
PORTS = range(19400, 19500)
STAND_IN_TRTEXEC = b"#!/bin/sh\necho 'STAND-IN trtexec: no TensorRT in this image' >&2\nexit 1\n"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    # Ports 19400-19449 for the registry, 19450-19499 for served containers.
    root = tmp_path_factory.mktemp("jetson-registry")
    with running_registry(root, range(19400, 19450)) as server:
        yield server


def _skopeo(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def stand_in_bases(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory, edgepack_cache: Path
) -> dict[str, str]:
    """One STAND-IN base per L4T release, pushed to the loopback registry: {target: REPO@DIGEST}."""
    work = tmp_path_factory.mktemp("stand-in")
    refs = {}
    for target in TARGETS:
        doc = tomllib.loads((targets_dir() / f"{target}.toml").read_text())
        l4t = doc["runtime"]["l4t"]
        spec = stand_in_spec(l4t, FileEntry(dest="/usr/src/tensorrt/bin/trtexec",
                                             source=STAND_IN_TRTEXEC, mode=0o755))  # fmt: skip
        archive = work / f"{l4t}.tar"
        build_image(spec, archive, edgepack_cache)
        dest = f"{registry.ref('stand-in/l4t')}:{l4t}"
        _skopeo("copy", "--quiet", "--dest-tls-verify=false", f"oci-archive:{archive}", dest,
                env=registry.env)
        raw = _skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}", dest,
                      env=registry.env).strip()
        assert raw.startswith("sha256:")
        refs[target] = f"{registry.host}/stand-in/l4t:{l4t}@{raw}"
    return refs


def _calibration(tmp: Path) -> Path:
    eight = np.loadtxt(MNIST.parent / "media" / "mnist_28.csv", delimiter=",",
                       dtype=np.float32).reshape(1, 1, 28, 28)
    rng = np.random.default_rng(1)
    folder = tmp / "calibration"
    folder.mkdir(exist_ok=True)
    shifted = [np.roll(eight, tuple(rng.integers(-3, 4, size=2)), axis=(2, 3)) for _ in range(16)]
    np.save(folder / "set.npy", np.concatenate(shifted))
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
@pytest.mark.parametrize("target", TARGETS)
def test_jetson_bundle_on_a_stand_in_base_pulled_by_digest_verifies_and_rebuilds_identically(
    target: str, precision: str, stand_in_bases: dict[str, str], registry: Registry,
    tmp_path: Path, edgepack_cache: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", registry.env["CONTAINERS_REGISTRIES_CONF"])
    path = target_copy(target, tmp_path / "targets", base=stand_in_bases[target], runs_here=False)
    extra = ["--quantize", "int8-static", "--calibration", str(_calibration(tmp_path))] \
        if precision == "int8" else []
    args = [str(MNIST), "--target", str(path), "--cache-dir", str(edgepack_cache), *extra]
    started = time.monotonic()
    doc = build_json(*args, "--out", str(tmp_path / "a"))
    build_s = time.monotonic() - started
    bundle = Path(doc["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    device = manifest["device"]
    # The base came from the registry by digest: its layers are the image's first ones.
    repo, _, digest = stand_in_bases[target].partition("@")
    pulled = json.loads(_skopeo("inspect", "--raw", "--tls-verify=false",
                                f"docker://{repo.rsplit(':', 1)[0]}@{digest}", env=registry.env))
    base_layers = [layer["digest"] for layer in pulled["layers"]]
    image_layers = [layer["digest"] for layer in manifest["image"]["layers"]]
    assert image_layers[: len(base_layers)] == base_layers
    assert device["serving"] == "tensorrt"
    own = tomllib.loads(path.read_text())["runtime"]["python"]
    if own in WHEEL_PINS:  # the target's own CPython: the image carries its pinned wheels
        sbom = json.loads((bundle / "sbom.cdx.json").read_text())
        files = [prop["value"] for component in sbom["components"]
                 for prop in component.get("properties", ())
                 if prop["name"] == "edgepack:wheel:file"]  # fmt: skip
        tag = "cp" + own.replace(".", "")
        for pin in WHEEL_PINS[own]:
            name, _, version = pin.partition("==")
            assert any(f.startswith(f"{name}-{version}-{tag}-{tag}-") and f.endswith(
                "aarch64.whl") for f in files), (pin, files)
    key = device["engine_key"]
    assert key["precision"] == precision
    assert key["model_sha256"] == manifest["model"]["digest"].removeprefix("sha256:")
    # The constants were folded (polygraphy) before the model was keyed and shipped; mnist's
    # constant weight Reshape folds in FP32 (INT8: onnxruntime's pre-processing already has).
    folding = manifest["model"]["constant_folding"]
    assert folding["tool"] == "polygraphy" and folding["ran"] is True
    assert doc["model"]["constant_folding"] == folding
    if precision == "fp16":
        assert (folding["nodes_before"], folding["nodes_after"]) == (12, 11)
    (name,) = [Path(p).name for p in model_layer_files(bundle / "image.tar")
               if p.endswith(".onnx")]  # fmt: skip
    (tmp_path / "shipped").mkdir()
    shipped = model_files(bundle / "image.tar", [name], tmp_path / "shipped")[name]
    assert len(onnx.load(str(shipped)).graph.node) == folding["nodes_after"]
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == key["model_sha256"]
    assert (bundle / f"edgepack-{manifest['name']}-engine.service").is_file()
    service = (bundle / f"edgepack-{manifest['name']}.service").read_text()
    assert f"After=edgepack-{manifest['name']}-engine.service" in service
    assert f"Wants=edgepack-{manifest['name']}-engine.service" in service
    assert edgepack("verify", str(bundle)).returncode == 0
    again = build_json(*args, "--out", str(tmp_path / "b"))
    first, second = _tree(bundle), _tree(Path(again["bundle"]))
    assert first == second, "the rebuild is byte-identical"
    print(f"{target} {precision}: build {build_s:.1f}s, image.tar "
          f"{(bundle / 'image.tar').stat().st_size} bytes")


def test_the_arm64_image_serves_mnist_under_qemu_through_the_onnxruntime_fallback(
    stand_in_bases: dict[str, str], registry: Registry, tmp_path: Path, edgepack_cache: Path,
    monkeypatch: pytest.MonkeyPatch, arm64_emulation: None, processes: Processes,
    cleanup_containers: list[str],
) -> None:
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", registry.env["CONTAINERS_REGISTRIES_CONF"])
    path = target_copy("jetson-orin-nano", tmp_path / "t", base=stand_in_bases["jetson-orin-nano"])
    doc = build_json(str(MNIST), "--target", str(path), "--cache-dir", str(edgepack_cache),
                     "--out", str(tmp_path / "bundle"))
    port = free_port_in(range(19450, 19500))
    cleanup_containers.append(f"edgepack-run-{doc['model_name']}-{port}")
    started = time.monotonic()
    proc = processes.own(subprocess.Popen(
        [sys.executable, "-m", "packager", "run", doc["bundle"], "--port", str(port),
         "--timeout", "900"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() - started < 900, "runtime not ready"
            time.sleep(1.0)
        ready_s = time.monotonic() - started
        with urllib.request.urlopen(f"{url}/v2/health/report", timeout=30) as response:
            report: dict[str, Any] = json.loads(response.read())
        assert report["engine"] == "engine: absent, fallback: onnxruntime-cpu"
        eight = np.loadtxt(MNIST.parent / "media" / "mnist_28.csv", delimiter=",",
                           dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28],
                                       "datatype": "FP32", "data": eight.ravel().tolist()}]})
        request = urllib.request.Request(f"{url}/v2/models/{doc['model_name']}/infer",
                                         data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            outputs = json.loads(response.read())["outputs"]
        assert int(np.argmax(outputs[0]["data"])) == 8
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            assert 'state="absent"' in response.read().decode()
        print(f"ready under qemu after {ready_s:.1f}s")
    finally:
        terminate(proc, grace_s=120)
