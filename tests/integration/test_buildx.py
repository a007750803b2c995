"""edgepack images in CI pipelines built with buildx (issue 13), on the private dockerd of
tests/integration/dockerd.py (its BuildKit, the ``docker`` driver):

- ``edgepack bake`` of the mnist rpi4 and industrial-pc bundles, a user Dockerfile ``FROM
  edgepack`` with an exec-form ``RUN`` that imports onnxruntime (under qemu for arm64, with the
  arm64 /proc/cpuinfo bind-mounted), built by ``docker buildx bake`` for linux/arm64 and
  linux/amd64 into one OCI archive holding one index: each platform's base layers are the
  bundle's, by digest.
- Two models x two devices in one ``docker buildx bake --push`` to the loopback registry; an
  image pulled back by digest with skopeo, loaded and served (an MNIST inference).
- ``Dockerfile.builder`` built from a Debian bookworm base made with mmdebstrap and ``docker
  import`` (the Docker Hub image cannot be pulled here), and run as users run it: the bundle it
  builds has the image digest of the host's build of the same inputs.

The daemon runs with ``--bridge=none``: RUN steps take ``--network=none`` (or host), containers
the daemon's own bridge network. Slow: the builder image takes minutes (see its test).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO, build_json, edgepack
from tests.integration.dockerd import Dockerd, Registry
from tests.integration.test_docker_engine import (  # noqa: F401  (a fixture)
    TARGETS,
    _infer,
    _mnist,
    _serving,
    bundles,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORTS = range(19200, 19300)  # this module's loopback range for published container ports
USER_DOCKERFILE = """\
FROM edgepack
RUN --network=none --mount=type=bind,source=cpuinfo-arm64.txt,target=/proc/cpuinfo \\
    ["python3", "-c", "import onnxruntime, platform; print('imported', onnxruntime.__version__, \
platform.machine())"]
"""


def _oci_archive(path: Path) -> dict[str, Any]:
    """{digest: parsed JSON} of the index and manifests in an OCI archive, plus its top index."""
    found: dict[str, Any] = {}
    with tarfile.open(path) as archive:
        top = json.load(archive.extractfile("index.json"))  # type: ignore[arg-type]
        for member in archive.getmembers():
            if member.name.startswith("blobs/sha256/") and member.size < 65536:
                data = archive.extractfile(member).read()  # type: ignore[union-attr]
                try:
                    found["sha256:" + member.name.rsplit("/", 1)[1]] = json.loads(data)
                except ValueError:
                    pass  # a small layer
    found["index.json"] = top
    return found


def _platforms(index: dict[str, Any]) -> dict[str, str]:
    """{os/arch: manifest digest}, attestation manifests (unknown/unknown) left out."""
    return {
        f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"]
        for m in index["manifests"]
        if m["platform"]["os"] != "unknown"
    }


def _bake(
    dockerd: Dockerd,
    folder: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """``docker buildx bake ARGS`` in the bake folder (its paths are relative to it)."""
    return dockerd.docker(
        "buildx", "bake", "--progress", "plain", *args, timeout=timeout, cwd=folder, env=env
    )


def test_user_dockerfile_built_for_two_platforms_into_one_index(
    dockerd: Dockerd,
    bundles: dict[str, dict[str, Any]],  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = tmp_path / "bake"
    doc = json.loads(
        edgepack(
            "bake", *(bundles[t]["bundle"] for t in TARGETS), "--out", str(folder), "--json"
        ).stdout
    )
    assert doc["dockerfile_written"]
    assert (folder / "Dockerfile").read_text().rstrip().endswith("FROM edgepack")
    (folder / "Dockerfile").write_text(USER_DOCKERFILE)
    # A second bake keeps the user's Dockerfile and writes the same bake file.
    first = (folder / "docker-bake.hcl").read_bytes()
    again = json.loads(
        edgepack(
            "bake", *(bundles[t]["bundle"] for t in TARGETS), "--out", str(folder), "--json"
        ).stdout
    )
    assert not again["dockerfile_written"]
    assert (folder / "Dockerfile").read_text() == USER_DOCKERFILE
    assert (folder / "docker-bake.hcl").read_bytes() == first
    (mnist,) = [t for t in doc["targets"] if t["name"] == "mnist"]
    assert sorted(mnist["platforms"]) == ["linux/amd64", "linux/arm64/v8"]

    (tmp_path / "oci").mkdir()
    started = time.monotonic()
    proc = _bake(dockerd, folder, "mnist", env={"OCI_DIR": str(tmp_path / "oci")})
    took = time.monotonic() - started
    # The RUN ran on both platforms, arm64 under qemu-user (the cpuinfo mount let it import).
    assert "imported" in proc.stderr and "aarch64" in proc.stderr and "x86_64" in proc.stderr
    blobs = _oci_archive(tmp_path / "oci" / "mnist.tar")
    (top,) = blobs["index.json"]["manifests"]
    index = blobs[top["digest"]]
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = _platforms(index)
    assert sorted(platforms) == ["linux/amd64", "linux/arm64"]
    for target, platform in TARGETS.items():
        manifest = blobs[platforms["/".join(platform.split("/")[:2])]]
        base = [layer["digest"] for layer in bundles[target]["image"]["layers"]]
        built = [layer["digest"] for layer in manifest["layers"]]
        assert built[: len(base)] == base, target  # edgepack's layers, byte-identical
        assert len(built) == len(base) + 1  # the RUN's (empty) layer
    print(f"two-platform bake to an OCI archive: {took:.1f}s")


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_a_bake_stopped_while_replacing_leaves_every_layout_whole(
    bundles: dict[str, dict[str, Any]],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebake stopped while the old layouts are being removed (a kill, a full disk) leaves
    ``images/`` whole: the old tree is moved aside before anything of it is removed. On the old
    code, which removed ``images/`` in place before moving the new one in, this stop left a
    half-deleted ``images/``. The same bundles stage the same bytes, so whole = equal."""
    import packager.bake
    import packager.staging

    folder = tmp_path / "bake"
    sources = tuple(Path(bundles[t]["bundle"]) for t in TARGETS)
    packager.bake.bake(sources, folder)
    before, hcl = _tree(folder / "images"), (folder / "docker-bake.hcl").read_bytes()
    real_rmtree = shutil.rmtree
    stops: list[str] = []

    def stopped_midway(path: Any, *args: Any, **kwargs: Any) -> None:
        if not stops and Path(path).name.lstrip(".").startswith("images"):
            stops.append(str(path))
            victim = next(p for p in Path(path).rglob("*") if p.is_file())
            victim.unlink()  # what a real removal had done when it was stopped
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        packager.bake.bake(sources, folder)
    monkeypatch.undo()
    assert stops, "the rebake never removed the old layouts"
    assert _tree(folder / "images") == before
    assert (folder / "docker-bake.hcl").read_bytes() == hcl
    # The next run tidies what the stopped one left beside images/ (its moved-aside tree).
    packager.bake.bake(sources, folder)
    assert _tree(folder / "images") == before
    assert sorted(p.name for p in folder.iterdir()) == [
        ".dockerignore", "Dockerfile", "cpuinfo-arm64.txt", "docker-bake.hcl", "images"
    ]


def _missing_layouts(folder: Path) -> list[str]:
    """Every ``images/MODEL@sha256:HEX`` the bake file names whose blob ``images/`` lacks."""
    text = (folder / "docker-bake.hcl").read_text()
    named = re.findall(r"images/([a-z0-9_-]+)@sha256:([0-9a-f]{64})", text)
    assert named, "the bake file names no layout"
    return [f"{m}@{d[:12]}" for m, d in named
            if not (folder / "images" / m / "blobs" / "sha256" / d).is_file()]


def test_a_rebake_stopped_after_the_swap_leaves_no_bake_file_naming_missing_images(
    bundles: dict[str, dict[str, Any]],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rebake of other bundles stopped (a kill) once the new ``images/`` is in place but before
    the new ``docker-bake.hcl`` is: the folder has no bake file, never the old one naming the old
    layouts' digests. Two bundles then one: the two-platform index and the second device's
    image are not in the new layout. On the old code the old bake file stayed, naming them."""
    import packager.bake

    folder = tmp_path / "bake"
    sources = tuple(Path(bundles[t]["bundle"]) for t in TARGETS)
    packager.bake.bake(sources, folder)
    assert not _missing_layouts(folder)
    real_replace_dir = packager.bake.replace_dir

    def stopped_after_the_swap(staging: Path, out: Path) -> None:
        real_replace_dir(staging, out)
        raise KeyboardInterrupt  # what a SIGKILL at this point leaves: nothing tidies up

    monkeypatch.setattr(packager.bake, "replace_dir", stopped_after_the_swap)
    with pytest.raises(KeyboardInterrupt):
        packager.bake.bake(sources[:1], folder)
    monkeypatch.undo()
    hcl = folder / "docker-bake.hcl"
    assert not hcl.exists(), f"a bake file naming missing images: {_missing_layouts(folder)}"
    packager.bake.bake(sources[:1], folder)
    assert not _missing_layouts(folder)


def test_an_out_folder_that_cannot_be_made_is_one_usage_line(
    bundles: dict[str, dict[str, Any]],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--out FILE/x`` (mkdir: NotADirectoryError) was an internal error, exit 1."""
    from packager.cli import main

    (tmp_path / "file").write_bytes(b"")
    out = tmp_path / "file" / "bake"
    with pytest.raises(SystemExit) as exited:
        main(["bake", str(bundles["rpi4"]["bundle"]), "--out", str(out), "--json"])
    assert exited.value.code == 2
    document = json.loads(capsys.readouterr().out)
    assert document["error"] == "usage"
    assert document["message"].startswith(f"--out {out}: cannot create it"), document


@pytest.fixture(scope="module")
def network_bundles(
    tmp_path_factory: pytest.TempPathFactory, onnx_dir: Path, edgepack_cache: Path
) -> dict[str, str]:
    """A second model (the shared Network.onnx, named ``network``) for both targets."""
    out = tmp_path_factory.mktemp("network-bundles")
    return {
        target: build_json(
            str(onnx_dir / "Network.onnx"),
            "--name",
            "network",
            "--target",
            target,
            "--out",
            str(out / target),
            "--version",
            "2.0.0",
            "--cache-dir",
            str(edgepack_cache),
        )["bundle"]
        for target in TARGETS
    }


def test_two_models_by_two_devices_in_one_bake_pushed_pulled_and_served(
    dockerd: Dockerd,
    loopback_registry: Registry,
    bundles: dict[str, dict[str, Any]],  # noqa: F811
    network_bundles: dict[str, str],
    onnx_dir: Path,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "fleet"
    edgepack(
        "bake",
        *(bundles[t]["bundle"] for t in TARGETS),
        *network_bundles.values(),
        "--out",
        str(folder),
    )
    registry = f"{loopback_registry.host}/fleet"
    metadata = tmp_path / "metadata.json"
    started = time.monotonic()
    # The default Dockerfile (FROM edgepack) as written; four model x device targets at once.
    _bake(
        dockerd,
        folder,
        "devices",
        "--push",
        "--metadata-file",
        str(metadata),
        env={"REGISTRY": registry},
    )
    took = time.monotonic() - started
    built = json.loads(metadata.read_text())
    names = {f"{m}-{t}" for m in ("mnist", "network") for t in TARGETS}
    assert names <= set(built), sorted(built)
    for name in names:
        model, device = name.split("-", 1)
        version = "1.0.0" if model == "mnist" else "2.0.0"
        digest = built[name]["containerimage.digest"]
        ref = f"docker://{registry}/{model}@{digest}"
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", ref],
            capture_output=True,
            timeout=120,
            check=True,
        ).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
        tagged = subprocess.run(
            [
                "skopeo",
                "inspect",
                "--raw",
                "--tls-verify=false",
                f"docker://{registry}/{model}:{version}-{device}",
            ],
            capture_output=True,
            timeout=120,
            check=True,
        ).stdout
        assert tagged == raw, name
    # One pulled back by digest with skopeo, loaded into the engine and served.
    pinned = f"docker://{registry}/mnist@{built['mnist-industrial-pc']['containerimage.digest']}"
    archive = tmp_path / "pulled.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            "--override-arch",
            "amd64",
            pinned,
            f"oci-archive:{archive}:docker.io/edgepack-test/pulled:1",
        ],
        capture_output=True,
        timeout=300,
        check=True,
    )
    # Fully qualified: docker's containerd store keeps an OCI ref.name as written, and looks
    # images up by their normalized (docker.io/...) names.
    assert "Loaded image: edgepack-test/pulled:1" in dockerd.docker(
        "load", "-i", archive, timeout=300
    ).stdout
    assert dockerd.image("edgepack-test/pulled:1")["Architecture"] == "amd64"
    pixels, expected = _mnist(onnx_dir)
    name = "edgepack-test-buildx-served"
    with _serving(dockerd, name, "edgepack-test/pulled:1", [], 120, PORTS) as (_, url):
        scores = _infer(url, pixels)
    assert int(scores.argmax()) == int(expected.argmax())
    print(f"two models x two devices, one bake, pushed: {took:.1f}s")


# --- Dockerfile.builder -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def builder_image(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``edgepack-test/builder``: Dockerfile.builder built once per session on a
    ``debian:bookworm-slim`` made here (mmdebstrap minbase + docker import), with the host's CA
    bundle as the optional build secret. Measured here (2 cores): mmdebstrap ~65 s, import
    ~15 s, build ~4-5 min."""
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is missing: run `make setup`", pytrace=False)
    work = tmp_path_factory.mktemp("builder")
    rootfs = work / "bookworm.tar"
    times = {}
    started = time.monotonic()
    subprocess.run(
        ["mmdebstrap", "--quiet", "--variant=minbase", "--mode=root", "bookworm", str(rootfs)],
        capture_output=True,
        timeout=900,
        check=True,
    )
    times["mmdebstrap"] = time.monotonic() - started
    started = time.monotonic()
    dockerd.docker("import", rootfs, "edgepack-test/bookworm-slim:12", timeout=300)
    rootfs.unlink()
    times["import"] = time.monotonic() - started
    # The Dockerfile's FROM names Docker Hub's image; the imported one stands in for it.
    dockerd.docker("tag", "edgepack-test/bookworm-slim:12", "debian:bookworm-slim", timeout=60)
    secret = []
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            secret = ["--secret", f"id=ca-bundle,src={candidate}"]
            break
    started = time.monotonic()
    dockerd.docker(
        "build",
        "--network",
        "host",
        "--file",
        REPO / "Dockerfile.builder",
        *secret,
        "--tag",
        "edgepack-test/builder",
        REPO,
        timeout=1500,
    )
    times["build"] = time.monotonic() - started
    print("Dockerfile.builder: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return "edgepack-test/builder"


def _layers(document: dict[str, Any]) -> dict[str, str]:
    return {layer["name"]: layer["digest"] for layer in document["image"]["layers"]}


def test_builder_image_builds_the_host_digest(
    dockerd: Dockerd,
    builder_image: str,
    onnx_dir: Path,
    tmp_path: Path,
) -> None:
    """``docker run --rm -v $PWD:/work edgepack-builder build ...``, cold (its own empty cache,
    online: Debian's .debs and PyPI's wheels), gives the image a host builds cold from the same
    inputs, byte for byte. The wheels' .pyc are the hard part: CPython's compiler output changes
    between patch releases (3.11.2 and 3.11.7 compile numpy's ``pad`` differently: measured), so
    both builds compile with the release the image ships (Debian 12's 3.11.2: the builder's own
    interpreter, and /usr/bin/python3.11 on this host whose pyenv Python is 3.11.7;
    packager.tools.python)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(onnx_dir / "mnist.onnx", work / "mnist.onnx")
    args = ["build", "mnist.onnx", "--target", "rpi4", "--version", "1.0.0", "--json"]
    host_cache = tmp_path / "host-cache"
    host = build_json(str(work / "mnist.onnx"), *args[2:-1], "--out", str(work / "host"),
                      "--cache-dir", str(host_cache))  # fmt: skip
    ca = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    tls = (
        ["--volume", f"{ca}:/ca.crt:ro", "--env", "PIP_CERT=/ca.crt",
         "--env", "SSL_CERT_FILE=/ca.crt"] if ca.is_file() else []
    )  # fmt: skip
    (work / "cache").mkdir()
    name = "edgepack-test-builder-run"
    dockerd.remove(name)
    started = time.monotonic()
    try:
        proc = dockerd.docker(
            "run", "--rm", "--name", name, "--network", "host", *tls,
            "--volume", f"{work}:/work", "--volume", f"{work / 'cache'}:/cache",
            builder_image, *args, "--out", "builder", timeout=900,
        )  # fmt: skip
        version = dockerd.docker(
            "run", "--rm", "--name", name, "--network", "none", "--entrypoint", "python3",
            builder_image, "-c", "import sys; print(sys.version.split()[0])", timeout=120,
        ).stdout.strip()  # fmt: skip
    finally:
        dockerd.remove(name)
    print(f"builder image: a cold rpi4 mnist build in {time.monotonic() - started:.0f}s")
    inside = json.loads(proc.stdout)
    print(f"builder CPython {version}, host CPython {sys.version.split()[0]}")
    assert _layers(host) == _layers(inside)
    assert inside["image"]["digest"] == host["image"]["digest"]
    builder_tar, host_tar = work / "builder" / "image.tar", work / "host" / "image.tar"
    assert builder_tar.read_bytes() == host_tar.read_bytes()
