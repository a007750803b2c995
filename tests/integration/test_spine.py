"""The spine end to end: `edgepack build` -> real OCI image -> podman/skopeo -> runtime answers.

Everything here is the real thing: the real apt resolving Debian arm64/amd64 packages, wheels from
PyPI, `skopeo` and `umoci` reading the archive, `podman load` and `podman run` (arm64 under
qemu-user), and `tritonclient` (a client nobody here wrote) talking to the runtime.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from packager.tools import skopeo
from tests.integration.conftest import (
    REPO,
    build_json,
    build_mnist,
    edgepack,
    free_port,
    run_install_sh,
)
from tests.process_guard import Processes, suite_container

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _mnist_input(onnx_dir: Path) -> np.ndarray:
    values = (onnx_dir / "media" / "mnist_28.csv").read_text().replace("\n", ",").split(",")
    pixels = [float(v) for v in values if v.strip()]
    return np.asarray(pixels, dtype=np.float32).reshape(1, 1, 28, 28)


def _mnist_expected(onnx_dir: Path) -> np.ndarray:
    with (onnx_dir / "expected" / "Mnist_8_input_CPU.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle)]
    return np.asarray([float(r["Value"]) for r in sorted(rows, key=lambda r: int(r["Index"]))])


@pytest.fixture(scope="module")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, onnx_dir: Path, edgepack_cache: Path
) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bundles")
    return build_mnist(onnx_dir, out, ("rpi4", "industrial-pc"), edgepack_cache)


def test_build_json_document(bundles: dict[str, dict[str, Any]]) -> None:
    doc = bundles["rpi4"]
    assert doc["target"] == "rpi4"
    assert doc["platform"] == "linux/arm64/v8"
    assert doc["model_name"] == "mnist"
    image = doc["image"]
    assert Path(image["archive"]).is_file()
    assert image["archive"] == str(Path(doc["bundle"]) / "image.tar")
    assert image["digest"].startswith("sha256:") and len(image["digest"]) == 71
    assert image["size_bytes"] == Path(image["archive"]).stat().st_size
    assert bundles["industrial-pc"]["platform"] == "linux/amd64"
    bundle = Path(doc["bundle"])
    names = sorted(p.name for p in bundle.iterdir())
    assert names == sorted(
        [
            "image.tar",
            "edgepack-mnist.service",
            "install.sh",
            "supervise.py",
            "README.md",
            "SHA256SUMS",
            "manifest.json",
            "sbom.cdx.json",  # issue 15: SBOM and SLSA provenance in every bundle
            "provenance.intoto.json",
            "confinement.json",  # issue 9: one list of container flags for every starter
        ]
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["image"]["digest"] == image["digest"]
    assert manifest["target"] == {
        "name": "rpi4",
        "device_class": "linux-container",
        "platform": "linux/arm64/v8",
        # issue 10: the CPU model `edgepack run` emulates
        "cpu": {"cores": 4, "model": "cortex-a72", "qemu": "cortex-a72"},
    }
    assert {f["path"] for f in manifest["files"]} == set(names) - {"manifest.json"}


def test_skopeo_and_umoci_read_the_archive(
    bundles: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    for target, arch in (("rpi4", "arm64"), ("industrial-pc", "amd64")):
        archive = bundles[target]["image"]["archive"]
        info = skopeo.inspect_oci_archive(archive)
        assert info["Architecture"] == arch and info["Os"] == "linux"
        assert info["Digest"] == bundles[target]["image"]["digest"]
        labels = info["Labels"]
        assert labels["io.edgepack.target"] == target
        assert labels["io.edgepack.model.digest"].startswith("sha256:")
    # umoci unpacks the OCI layout into a runtime bundle: the files are where the image says.
    layout = tmp_path / "layout"
    with tarfile.open(bundles["rpi4"]["image"]["archive"]) as tar:
        tar.extractall(layout, filter="data")
    index = json.loads((layout / "index.json").read_text())
    tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(tmp_path / "rt")],
        capture_output=True,
        text=True,
        check=True,
    )
    rootfs = tmp_path / "rt" / "rootfs"
    assert (rootfs / "opt/edgepack/model/mnist.onnx").read_bytes() == (
        REPO / "tests/data/mnist.onnx"
    ).read_bytes()
    assert (rootfs / "usr/bin/python3.11").is_file()
    assert (rootfs / "opt/edgepack/runtime/edgepack_runtime/server.py").is_file()
    passwd = (rootfs / "etc/passwd").read_text()
    assert "edgepack:x:10001:10001" in passwd
    config = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert config["process"]["user"]["uid"] == 10001


def test_verify_passes_then_names_the_damaged_file(
    bundles: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    bundle = Path(bundles["industrial-pc"]["bundle"])
    ok = edgepack("verify", str(bundle), "--json")
    assert json.loads(ok.stdout)["ok"] is True
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    readme = copy / "README.md"
    readme.write_text(readme.read_text() + "tampered\n")
    bad = edgepack("verify", str(copy), check=False)
    assert bad.returncode == 8
    assert "README.md: size" in bad.stderr
    # A flipped byte inside the image archive is caught and the file named.
    shutil.copy(bundle / "README.md", readme)
    data = bytearray((copy / "image.tar").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "image.tar").write_bytes(bytes(data))
    bad = edgepack("verify", str(copy), check=False)
    assert bad.returncode == 8
    assert "image.tar: sha256" in bad.stderr


def test_rebuild_is_byte_identical_and_served_from_cache(
    bundles: dict[str, dict[str, Any]], onnx_dir: Path, edgepack_cache: Path, tmp_path: Path
) -> None:
    first = bundles["rpi4"]
    second = build_json(
        str(onnx_dir / "mnist.onnx"),
        "--target",
        "rpi4",
        "--out",
        str(tmp_path / "again"),
        "--version",
        "1.0.0",
        "--cache-dir",
        str(edgepack_cache),
    )
    assert second["image"]["digest"] == first["image"]["digest"]
    assert (Path(second["bundle"]) / "manifest.json").read_bytes() == (
        Path(first["bundle"]) / "manifest.json"
    ).read_bytes()
    assert (Path(second["bundle"]) / "image.tar").read_bytes() == (
        Path(first["bundle"]) / "image.tar"
    ).read_bytes()
    # Nothing downloaded or re-extracted: the base and wheel layers come from the cache.
    assert {"base", "wheels"} <= set(second["image"]["cached_layers"])


def test_model_change_rebuilds_only_the_model_layer(
    bundles: dict[str, dict[str, Any]], onnx_dir: Path, edgepack_cache: Path, tmp_path: Path
) -> None:
    other = build_json(
        str(onnx_dir / "Network.onnx"),
        "--target",
        "rpi4",
        "--name",
        "mnist",
        "--out",
        str(tmp_path / "net"),
        "--version",
        "1.0.0",
        "--cache-dir",
        str(edgepack_cache),
    )
    before = [layer["digest"] for layer in bundles["rpi4"]["image"]["layers"]]
    after = [layer["digest"] for layer in other["image"]["layers"]]
    assert len(before) == len(after)
    assert before[:-1] == after[:-1]
    assert before[-1] != after[-1]


def _serve(bundle: str, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "packager", "run", bundle, "--port", str(port), "--timeout", "600"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_ready(
    client: triton.InferenceServerClient, proc: subprocess.Popen[str], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"edgepack run exited: {proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            if client.is_server_ready():
                return
        except Exception:
            pass
        time.sleep(1.0)
    raise AssertionError("runtime not ready in time")


@pytest.mark.parametrize("target", ["rpi4", "industrial-pc"])
def test_runtime_in_the_image_answers_mnist(
    target: str,
    bundles: dict[str, dict[str, Any]],
    onnx_dir: Path,
    arm64_emulation: None,
    processes: Processes,
    cleanup_containers: list[str],
) -> None:
    port = free_port()
    cleanup_containers.append(f"edgepack-run-mnist-{port}")  # removed after the check below
    proc = processes.own(_serve(bundles[target]["bundle"], port))
    try:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=120.0)
        _wait_ready(client, proc, timeout=600)
        assert client.is_server_live()
        assert client.is_model_ready("mnist")
        metadata = client.get_model_metadata("mnist")
        assert metadata["inputs"][0]["name"] == "Input3"
        data = _mnist_input(onnx_dir)
        tensor = triton.InferInput("Input3", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data, binary_data=False)
        result = client.infer("mnist", [tensor])
        scores = result.as_numpy(metadata["outputs"][0]["name"]).reshape(-1)
        expected = _mnist_expected(onnx_dir)
        # The reference scores came from Windows ML; "about 1e-3" relative to their scale.
        np.testing.assert_allclose(scores, expected, atol=1e-3 * float(np.abs(expected).max()))
        # And the image's onnxruntime (arm64 under qemu, or amd64) agrees with the host's.
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_dir / "mnist.onnx"))
        host = session.run(None, {"Input3": data})[0].reshape(-1)
        np.testing.assert_allclose(scores, host, rtol=1e-4, atol=1e-3)
        assert int(np.argmax(scores)) == 8
        client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # `edgepack run` removes its container when stopped.
    name = f"edgepack-run-mnist-{port}"
    listed = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert name not in listed


def test_install_sh_loads_and_starts_with_podman(
    bundles: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The bundle's own install.sh on this host (no systemd here: --no-systemd)."""
    bundle = Path(bundles["industrial-pc"]["bundle"])
    port = 8080  # install.sh publishes the runtime's own port
    subprocess.run(["podman", "rm", "-f", "-t", "1", "edgepack-mnist"], capture_output=True)
    try:
        proc = run_install_sh(bundle, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"ready on http://127.0.0.1:{port}/v2/models/mnist" in proc.stdout
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "1", "edgepack-mnist"], capture_output=True)


def test_install_sh_refuses_a_damaged_bundle(
    bundles: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["industrial-pc"]["bundle"], copy)
    (copy / "README.md").write_text("changed\n")
    proc = subprocess.run(
        ["sh", str(copy / "install.sh"), "--engine", "podman", "--no-systemd"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stderr


def _notifications(
    server: socket.socket, until: Callable[[list[str]], bool], timeout: float
) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(messages):
        try:
            messages.append(server.recv(4096).decode())
        except TimeoutError:
            continue
    return messages


def test_supervisor_reports_ready_pings_watchdog_and_exits_when_the_runtime_dies(
    bundles: dict[str, dict[str, Any]], tmp_path: Path, processes: Processes
) -> None:
    """supervise.py as systemd runs it (Type=notify), with a real notify socket and podman."""
    from packager.tools.containers import find_engine

    suite_container("edgepack-mnist")  # what supervise.py runs: the session guard checks it

    bundle = Path(bundles["industrial-pc"]["bundle"])
    engine_args = [f"--engine-arg={a}" for a in find_engine("podman").run_flags]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify.sock"))
    server.settimeout(1.0)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1500000"}
    argv = [sys.executable, str(bundle / "supervise.py"), "--engine", "podman", *engine_args]

    def watchdogs(msgs: list[str]) -> int:
        return sum(m == "WATCHDOG=1" for m in msgs)

    proc = processes.own(
        subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
    try:
        msgs = _notifications(server, lambda m: watchdogs(m) >= 2, timeout=180)
        assert any(m.startswith("READY=1") for m in msgs), msgs
        assert watchdogs(msgs) >= 2
        # A hung runtime (frozen) gets no watchdog pings: systemd would kill and restart it.
        subprocess.run(["podman", "pause", "edgepack-mnist"], capture_output=True, check=True)
        time.sleep(3)  # let an in-flight probe finish
        _notifications(server, lambda m: False, timeout=1)  # drop pings sent before the freeze
        hung = _notifications(server, lambda m: False, timeout=5)
        assert watchdogs(hung) == 0, hung
        subprocess.run(["podman", "unpause", "edgepack-mnist"], capture_output=True, check=True)
        assert watchdogs(_notifications(server, lambda m: watchdogs(m) >= 1, timeout=30)) >= 1
        # A runtime that dies stops the supervisor with an error: systemd restarts the unit.
        subprocess.run(["podman", "kill", "edgepack-mnist"], capture_output=True, check=True)
        assert proc.wait(timeout=60) != 0
        # And a clean stop: SIGTERM -> STOPPING=1, the container stopped, exit 0.
        proc = processes.own(
            subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        _notifications(server, lambda m: any(x.startswith("READY=1") for x in m), timeout=180)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "STOPPING=1" in _notifications(server, lambda m: "STOPPING=1" in m, timeout=10)
        names = subprocess.run(
            ["podman", "ps", "-a", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert "edgepack-mnist" not in names
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["podman", "rm", "-f", "-t", "1", "edgepack-mnist"], capture_output=True)
        server.close()


def test_systemd_accepts_the_unit(bundles: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    bundle = Path(bundles["rpi4"]["bundle"])
    text = (bundle / "edgepack-mnist.service").read_text()
    unit = tmp_path / "edgepack-mnist.service"
    unit.write_text(text.replace("@ENGINE@", "/usr/bin/podman").replace("@ENGINE_ARGS@", ""))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Type=notify" in text and "WatchdogSec=30" in text


def test_user_base_image_gets_our_layers_on_top(
    bundles: dict[str, dict[str, Any]], onnx_dir: Path, edgepack_cache: Path, tmp_path: Path
) -> None:
    """--base oci-archive:PATH: a user's image (here: another bundle's) with our layers on top."""
    base = bundles["industrial-pc"]["image"]
    doc = build_json(
        str(onnx_dir / "Network.onnx"),
        "--target",
        "industrial-pc",
        "--base",
        f"oci-archive:{base['archive']}",
        "--out",
        str(tmp_path / "b"),
        "--cache-dir",
        str(edgepack_cache),
    )
    base_digests = [layer["digest"] for layer in base["layers"]]
    digests = [layer["digest"] for layer in doc["image"]["layers"]]
    assert digests[: len(base_digests)] == base_digests
    assert len(digests) > len(base_digests)
    info = skopeo.inspect_oci_archive(doc["image"]["archive"])
    assert info["Layers"] == digests
    assert edgepack("verify", doc["bundle"]).returncode == 0
    # An arm64 base under an amd64 target is refused with one line naming both.
    wrong = edgepack(
        "build",
        str(onnx_dir / "Network.onnx"),
        "--target",
        "industrial-pc",
        "--base",
        f"oci-archive:{bundles['rpi4']['image']['archive']}",
        "--out",
        str(tmp_path / "c"),
        "--cache-dir",
        str(edgepack_cache),
        check=False,
    )
    assert wrong.returncode == 3, wrong.stderr
    assert "arm64" in wrong.stderr and "amd64" in wrong.stderr
    assert not (tmp_path / "c").exists()
