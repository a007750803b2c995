"""edgepack bundles in a real Docker engine (issue 13): Debian trixie's docker.io 26.1 with the
containerd image store, run as a private daemon (tests/integration/dockerd.py).

- ``docker load`` of the rpi4 (arm64) and industrial-pc (amd64) bundles: Docker's image ID is
  edgepack's manifest digest, and the platform is the target's.
- ``docker run`` of the amd64 image answers a real MNIST inference; the arm64 one runs under
  qemu-user with ``--init`` (tini as PID 1, so a guest crash cannot hang the container) and the
  arm64 /proc/cpuinfo text onnxruntime needs, and answers ready and an inference.
- The tools script keeps the system's apt configuration untouched, and the private daemon's
  forced stop (dockerd SIGKILLed under a running container) still leaves no process or mount.
- Registries (Debian's docker-registry on loopback): ``edgepack push`` of both bundles is one
  OCI index with both platforms, by the bundles' own digests, which docker pulls; ``--base
  docker://...@sha256:INDEX`` rebuilds byte-identically to ``--base oci-archive:``, and then
  offline from the cache.

Slow: about 2 minutes here (2 cores) with a cold edgepack cache, most of it the two bundle builds
(shared with the other integration tests through the session cache); dockerd starts in ~1.2 s,
each ``docker load`` takes 2-4 s, the amd64 container is ready in ~2 s and the arm64 one under
qemu in ~6 s.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.tools.qemu import ensure_binfmt
from tests.integration.conftest import REPO, build_mnist, edgepack, free_port_in
from tests.integration.dockerd import (
    TOOLS,
    Dockerd,
    Registry,
    mounts_under,
    private_dockerd,
    shim_sockets,
    start_dockerd,
    stop_dockerd,
    tools_missing,
)
from tests.integration.http_helpers import http_request, infer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CPUINFO_ARM64 = REPO / "packager" / "image" / "data" / "cpuinfo-arm64.txt"
PORTS = range(18900, 19000)  # this suite's loopback range for published container ports
TARGETS = {"rpi4": "linux/arm64/v8", "industrial-pc": "linux/amd64"}


def _wait_ready(daemon: Dockerd, name: str, base_url: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if http_request(f"{base_url}/v2/health/ready", timeout=5)[0] == 200:
            return time.monotonic() - started
        if not daemon.running(name):
            raise AssertionError(f"{name} exited before it was ready:\n{daemon.logs(name)}")
        time.sleep(0.25)
    raise AssertionError(f"{name} not ready within {timeout_s:.0f}s:\n{daemon.logs(name)}")


def _mnist(onnx_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The README's handwritten 8 as the model's input, and the scores the model's authors
    expect for it."""
    values = (onnx_dir / "media" / "mnist_28.csv").read_text().replace("\n", ",").split(",")
    pixels = np.asarray([float(v) for v in values if v.strip()], np.float32).reshape(1, 1, 28, 28)
    with (onnx_dir / "expected" / "Mnist_8_input_CPU.csv").open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda r: int(r["Index"]))
    return pixels, np.asarray([float(r["Value"]) for r in rows])


def _infer(base_url: str, pixels: np.ndarray) -> np.ndarray:
    scores = infer(base_url, "mnist", "Input3", pixels)
    assert scores.shape == (1, 10)
    return scores.reshape(-1)


@contextmanager
def _serving(
    daemon: Dockerd, name: str, image: str, run_args: list[str], timeout_s: float, ports: range
) -> Iterator[tuple[str, str]]:
    """A container of ``image`` publishing the runtime's 8080 on a free loopback port of
    ``ports``, once it answers ready: (container name, base URL)."""
    port = free_port_in(ports)
    published = [*run_args, "--publish", f"127.0.0.1:{port}:8080"]
    with daemon.container(name, image, run_args=published) as running:
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(daemon, running, base_url, timeout_s)
        yield running, base_url


@pytest.fixture(scope="module")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, onnx_dir: Path, edgepack_cache: Path
) -> dict[str, dict[str, Any]]:
    """The mnist bundle for each target: {target: its manifest.json}."""
    missing = tools_missing()
    if missing:  # before minutes of building
        pytest.fail(missing, pytrace=False)
    out = tmp_path_factory.mktemp("docker-bundles")
    manifests = {}
    for target, doc in build_mnist(onnx_dir, out, TARGETS, edgepack_cache).items():
        manifests[target] = json.loads((Path(doc["bundle"]) / "manifest.json").read_text())
        manifests[target]["bundle"] = doc["bundle"]
    return manifests


@pytest.fixture(scope="module")
def loaded(dockerd: Dockerd, bundles: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``docker load`` of each bundle's image.tar: {target: a tag naming the loaded image}."""
    tags = {}
    for target, manifest in bundles.items():
        proc = dockerd.docker("load", "-i", Path(manifest["bundle"]) / "image.tar", timeout=300)
        assert f"Loaded image: {manifest['image']['ref']}" in proc.stdout
        # Both bundles carry the same ref (edgepack/mnist:1.0.0): keep each under its own tag.
        tags[target] = f"edgepack-test/mnist-{target}:1.0.0"
        dockerd.docker("tag", manifest["image"]["ref"], tags[target], timeout=60)
    return tags


def test_docker_load_keeps_the_manifest_digest_as_image_id(
    dockerd: Dockerd, bundles: dict[str, dict[str, Any]], loaded: dict[str, str]
) -> None:
    for target, platform in TARGETS.items():
        info = dockerd.image(loaded[target])
        digest = bundles[target]["image"]["digest"]
        assert info["Id"] == digest, target
        repository = loaded[target].rsplit(":", 1)[0]
        assert f"{repository}@{digest}" in info["RepoDigests"]
        parts = [info["Os"], info["Architecture"]] + (
            [info["Variant"]] if "Variant" in info else []
        )
        assert "/".join(parts) == platform
        assert info["Config"]["User"] == "10001:10001"
    # The two platforms are two images, not one overwritten by the other.
    assert dockerd.image(loaded["rpi4"])["Id"] != dockerd.image(loaded["industrial-pc"])["Id"]


def test_docker_run_amd64_answers_an_inference(
    dockerd: Dockerd, loaded: dict[str, str], onnx_dir: Path
) -> None:
    pixels, expected = _mnist(onnx_dir)
    amd64 = loaded["industrial-pc"]
    with _serving(dockerd, "edgepack-test-docker-amd64", amd64, [], 120, PORTS) as (_, url):
        scores = _infer(url, pixels)
    np.testing.assert_allclose(scores, expected, atol=1e-3 * float(np.abs(expected).max()))
    assert int(np.argmax(scores)) == int(np.argmax(expected))


def test_docker_run_arm64_under_qemu_with_init_answers_ready(
    dockerd: Dockerd, loaded: dict[str, str], onnx_dir: Path
) -> None:
    ensure_binfmt("arm64")
    pixels, expected = _mnist(onnx_dir)
    run_args = [
        "--init",  # tini (host-native) as PID 1: qemu as PID 1 never exits on a guest crash
        "--platform",
        "linux/arm64/v8",
        # onnxruntime reads /proc/cpuinfo at import and crashes on the host's x86 text.
        "--volume",
        f"{CPUINFO_ARM64}:/proc/cpuinfo:ro",
    ]
    serving = _serving(dockerd, "edgepack-test-docker-arm64", loaded["rpi4"], run_args, 300, PORTS)
    with serving as (name, url):
        top = dockerd.docker("top", name, "-o", "pid,args", timeout=30).stdout.splitlines()
        scores = _infer(url, pixels)
    assert "docker-init" in top[1], top  # the first process of the container is tini
    assert any("qemu" in line and "edgepack_runtime.server" in line for line in top[2:]), top
    np.testing.assert_allclose(scores, expected, atol=1e-3 * float(np.abs(expected).max()))


def _tree_digest(*roots: Path) -> str:
    """Names, sizes and mtimes of every file under ``roots`` (what apt would change)."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*")) if root.exists() else []:
            stat = path.lstat()
            h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def test_docker_tools_script_uses_a_private_apt_configuration(tmp_path: Path) -> None:
    """A fresh run into another folder: trixie's packages come and the system's apt state
    (sources, lists, cache, dpkg status) stays as it was; a second run is a no-op."""
    system = [
        Path("/etc/apt"),
        Path("/var/lib/apt"),
        Path("/var/cache/apt"),
        Path("/var/lib/dpkg/status"),
    ]
    before = _tree_digest(*system)
    dest = tmp_path / "tools"
    script = REPO / ".ci" / "docker-tools.sh"
    first = subprocess.run([script, dest], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    versions = (dest / "VERSIONS").read_text().splitlines()
    assert versions[0] == (
        "packages: docker.io docker-cli containerd docker-buildx tini docker-registry"
    )
    assert any(v.startswith("docker.io=26.") for v in versions), versions
    assert not (dest / "apt").exists() and not (dest / "debs").exists()
    version = subprocess.run(
        [dest / "bin" / "dockerd", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert version.startswith("Docker version 26."), version
    again = subprocess.run([script, dest], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    assert _tree_digest(*system) == before
    assert (TOOLS / "VERSIONS").read_text() == (dest / "VERSIONS").read_text()


@pytest.fixture
def killed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    base = tmp_path_factory.mktemp("kill")
    daemon = start_dockerd(base / "d")
    try:
        yield daemon
    finally:
        stop_dockerd(daemon)  # a second time is harmless: nothing is left to remove


def _sleep_rootfs(tar: Path) -> Path:
    """A rootfs of the host's own sleep(1) and the libraries ldd names for it: an image that
    ``docker import`` takes in well under a second."""
    files = [Path("/bin/sleep")]
    ldd = subprocess.run(["ldd", "/bin/sleep"], capture_output=True, text=True, timeout=30)
    files += [Path(word) for word in ldd.stdout.split() if word.startswith("/")]
    with tarfile.open(tar, "w") as archive:
        for path in files:
            archive.add(path.resolve(), arcname=str(path))
    return tar


def test_private_dockerd_killed_under_a_container_leaves_nothing_behind(
    killed_daemon: Dockerd, tmp_path: Path
) -> None:
    """SIGKILL dockerd while a container runs: its containerd, shim (and socket), the
    container's process, overlay and netns mounts and the bridge stay behind; stop_dockerd
    kills, unmounts and deletes them by what they name, and says so."""
    daemon = killed_daemon
    daemon.docker(
        "import", _sleep_rootfs(tmp_path / "sleep.tar"), "edgepack-test/sleep:1", timeout=120
    )
    daemon.docker(
        "run", "-d", "--name", "edgepack-test-docker-sleeper", "--network", daemon.network,
        "edgepack-test/sleep:1", "/bin/sleep", "600", timeout=120,
    )  # fmt: skip
    assert mounts_under(daemon.root)
    (shim,) = shim_sockets(daemon)
    assert shim.is_socket()
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(timeout=30)
    problems = stop_dockerd(daemon)
    assert any("outlived dockerd" in p for p in problems), problems
    assert any("of a container outlived dockerd" in p for p in problems), problems
    assert any("was still mounted" in p for p in problems), problems
    assert any("shim socket" in p for p in problems), problems
    assert not mounts_under(daemon.root)
    assert not daemon.root.exists() and not shim.exists()
    assert not Path(f"/sys/class/net/{daemon.bridge}").exists()


def test_private_dockerd_stops_cleanly(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The ordinary stop reports nothing forced and removes its root; the host gains no
    docker0 and no /var/lib/docker."""
    with private_dockerd(tmp_path_factory.mktemp("clean")) as daemon:
        assert daemon.docker("info", "--format", "{{.Driver}}", timeout=30).stdout.strip() in (
            "overlayfs",
            "native",
        )  # the containerd snapshotters
        assert daemon.docker("buildx", "version", timeout=30).stdout.startswith("github.com")
        root = daemon.root
    assert not root.exists()
    assert not Path("/sys/class/net/docker0").exists()
    assert not Path("/var/lib/docker").exists()


# --- registries: edgepack push, --base docker:// -------------------------------------------------


def _skopeo_raw(ref: str) -> bytes:
    return subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", ref], capture_output=True,
        timeout=120, check=True,
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def pushed(loopback_registry: Registry, bundles: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``edgepack push`` of the rpi4 and industrial-pc bundles as one tag: its --json result."""
    destination = f"{loopback_registry.ref('fleet/mnist')}:1.0.0"
    proc = edgepack(
        "push",
        bundles["rpi4"]["bundle"],
        bundles["industrial-pc"]["bundle"],
        destination,
        "--json",
        env=loopback_registry.env,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_push_of_two_bundles_is_one_index_with_both_platforms(
    pushed: dict[str, Any],
    loopback_registry: Registry,
    bundles: dict[str, dict[str, Any]],
    dockerd: Dockerd,
) -> None:
    destination = f"{loopback_registry.ref('fleet/mnist')}:1.0.0"
    raw = _skopeo_raw(destination)
    assert pushed["digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    index = json.loads(raw)
    assert index["mediaType"] == pushed["media_type"] == "application/vnd.oci.image.index.v1+json"
    found = {
        "/".join([m["platform"]["os"], m["platform"]["architecture"]]
                 + ([m["platform"]["variant"]] if "variant" in m["platform"] else [])): m["digest"]
        for m in index["manifests"]
    }  # fmt: skip
    assert found == {
        platform: bundles[target]["image"]["digest"] for target, platform in TARGETS.items()
    }
    # Each platform's manifest is the bundle's own bytes, by digest.
    for target in TARGETS:
        digest = bundles[target]["image"]["digest"]
        manifest = _skopeo_raw(f"{loopback_registry.ref('fleet/mnist')}@{digest}")
        assert "sha256:" + hashlib.sha256(manifest).hexdigest() == digest
    # Docker pulls the tag (loopback registries are insecure to dockerd by default) and keeps
    # the index digest as the image ID.
    dockerd.docker("pull", destination.removeprefix("docker://"), timeout=300)
    assert dockerd.image(destination.removeprefix("docker://"))["Id"] == pushed["digest"]


def test_push_attaches_each_sbom_as_a_referrer_under_the_fallback_tag(
    pushed: dict[str, Any], loopback_registry: Registry, bundles: dict[str, dict[str, Any]]
) -> None:
    """Issue 15: docker-registry 2.8 has no referrers API, so the SBOM is found through the
    referrers tag schema: REPO:sha256-HEX names an index of artifacts whose subject is the image.
    docker pull of the unchanged tag:
    test_push_of_two_bundles_is_one_index_with_both_platforms."""
    repo = loopback_registry.ref("fleet/mnist")
    # The images are the bundles' own: the SBOM went next to them, not into them.
    assert {i["digest"] for i in pushed["images"]} == {
        b["image"]["digest"] for b in bundles.values()
    }
    for image in pushed["images"]:
        digest = image["digest"]
        index = json.loads(_skopeo_raw(f"{repo}:{digest.replace(':', '-')}"))
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
        (entry,) = index["manifests"]
        assert entry["digest"] == image["sbom"]
        raw = _skopeo_raw(f"{repo}@{entry['digest']}")
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == entry["digest"]
        artifact = json.loads(raw)
        assert artifact["artifactType"] == "application/vnd.cyclonedx+json"
        assert artifact["subject"]["digest"] == digest
        subject = _skopeo_raw(f"{repo}@{digest}")
        assert artifact["subject"]["size"] == len(subject)
        (layer,) = artifact["layers"]
        assert layer["mediaType"] == "application/vnd.cyclonedx+json"
        url = f"http://{loopback_registry.host}/v2/fleet/mnist/blobs/{layer['digest']}"
        status, blob = http_request(url, timeout=60)
        assert status == 200
        assert blob == (Path(image["bundle"]) / "sbom.cdx.json").read_bytes()


def test_push_of_one_bundle_is_its_image_and_two_of_one_platform_are_refused(
    loopback_registry: Registry, bundles: dict[str, dict[str, Any]]
) -> None:
    rpi4 = bundles["rpi4"]["bundle"]
    single = f"{loopback_registry.ref('fleet/single')}:1"
    proc = edgepack("push", rpi4, single, "--json", env=loopback_registry.env, timeout=600)
    result = json.loads(proc.stdout)
    assert result["digest"] == bundles["rpi4"]["image"]["digest"]
    assert result["media_type"] == "application/vnd.oci.image.manifest.v1+json"
    raw = _skopeo_raw(single)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == result["digest"]
    proc = edgepack("push", rpi4, rpi4, f"{loopback_registry.ref('fleet/x')}:1", check=False,
                    env=loopback_registry.env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "linux/arm64/v8 again" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_base_pulled_from_the_registry_rebuilds_byte_identically(
    pushed: dict[str, Any],
    loopback_registry: Registry,
    bundles: dict[str, dict[str, Any]],
    onnx_dir: Path,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """--base docker://REGISTRY/REPO@sha256:INDEX (skopeo takes the target's platform from the
    index into the cache) gives the bytes --base oci-archive: of the same image gives; then the
    cache alone serves it (--offline)."""
    cache = tmp_path_factory.mktemp("registry-cache")

    def run_build(
        base: str, out: str, *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return edgepack(
            "build",
            str(onnx_dir / "Network.onnx"),
            "--target",
            "rpi4",
            "--base",
            base,
            "--out",
            str(tmp_path / out),
            "--cache-dir",
            str(cache),
            *extra,
            check=check,
            env=loopback_registry.env,
        )

    def build(base: str, out: str, *extra: str) -> dict[str, Any]:
        proc = run_build(base, out, "--version", "2.0.0", "--json", *extra)
        document: dict[str, Any] = json.loads(proc.stdout)
        return document

    local = build(f"oci-archive:{Path(bundles['rpi4']['bundle']) / 'image.tar'}", "local")
    pinned = f"{loopback_registry.ref('fleet/mnist')}@{pushed['digest']}"
    pulled = build(pinned, "pulled")
    assert pulled["image"]["digest"] == local["image"]["digest"]
    assert (tmp_path / "pulled" / "image.tar").read_bytes() == (
        tmp_path / "local" / "image.tar"
    ).read_bytes()
    offline = build(pinned, "offline", "--offline")
    assert offline["image"]["digest"] == local["image"]["digest"]
    # A digest the registry does not have: one line, a tool failure, nothing written.
    missing = f"{loopback_registry.ref('fleet/mnist')}@sha256:{'0' * 64}"
    proc = run_build(missing, "missing", check=False)
    assert proc.returncode == 7, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --base {missing}: "), proc.stderr
    assert not (tmp_path / "missing").exists()
