"""Real images from real Debian packages and PyPI wheels, loaded and run by real engines.

Needs network access to deb.debian.org and PyPI, and skopeo, umoci, podman, runc and
qemu-user-static (arm64 runs under qemu through binfmt_misc).
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from packager.errors import ToolFailedError
from packager.image.builder import build_image, inspect_image_archive, verify_image_archive
from packager.image.debian import DEFAULT_PYTHON_PACKAGES
from packager.image.emulation import arm64_cpuinfo
from packager.image.spec import (
    DebianBase,
    FileEntry,
    FileLayer,
    ImageConfig,
    ImageResult,
    ImageSpec,
    WheelSet,
)
from packager.tools import skopeo, umoci
from packager.tools.base import Tool

pytestmark = pytest.mark.integration

PODMAN = Tool("podman", "podman", "podman")
WHEELS = ("onnxruntime==1.20.1", "numpy==2.2.1")
EPOCH = 1_700_000_000
REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO.parent / "shared" / "testdata"
IMPORT_CHECK = (
    "import numpy, onnxruntime; print(onnxruntime.get_available_providers(), numpy.__version__)"
)


def make_spec(arch: str) -> ImageSpec:
    model = TESTDATA / "onnx" / "mnist.onnx"
    return ImageSpec(
        platform_os="linux",
        arch=arch,
        variant="v8" if arch == "arm64" else None,  # type: ignore[arg-type]
        base=DebianBase(packages=DEFAULT_PYTHON_PACKAGES),
        wheels=WheelSet(requirements=WHEELS),
        layers=(
            FileLayer(
                "model", (FileEntry("/opt/edgepack/model/mnist.onnx", model, uid=10001, gid=10001),)
            ),
        ),
        config=ImageConfig(
            user="10001:10001", entrypoint=("python3.11",), cmd=("-c", IMPORT_CHECK)
        ),
        ref_name=f"edgepack/it-{arch}:1.0",
        created_epoch=EPOCH,
    )


@dataclass(frozen=True)
class Built:
    result: ImageResult
    cache: Path
    seconds: float


def _build(tmp: Path, arch: str) -> Built:
    cache = tmp / "cache"
    started = time.monotonic()
    result = build_image(make_spec(arch), tmp / "image.tar", cache)
    return Built(result, cache, time.monotonic() - started)


@pytest.fixture(scope="module")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("arm64"), "arm64")


@pytest.fixture(scope="module")
def amd64(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("amd64"), "amd64")


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """podman with its own storage, so tests neither see nor leave images elsewhere."""
    root = tmp_path_factory.mktemp("podman")
    flags = [
        "--root",
        str(root / "storage"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        "vfs",
    ]
    yield flags
    PODMAN.run([*flags, "system", "reset", "--force"], check=False)


@pytest.fixture(scope="module")
def qemu_arm64() -> None:
    from packager.tools.qemu import ensure_binfmt

    ensure_binfmt("arm64")


def test_cold_build_is_valid_and_layers_are_in_order(arm64: Built) -> None:
    result = arm64.result
    assert [layer.name for layer in result.layers] == ["base", "wheels", "model"]
    assert not any(layer.cached for layer in result.layers)
    assert verify_image_archive(result.archive) == []
    info = inspect_image_archive(result.archive)
    assert (info["architecture"], info["variant"]) == ("arm64", "v8")
    base, wheels, _model = result.layers
    print(
        f"\narm64 cold build {arm64.seconds:.1f}s; base {base.size}/{base.uncompressed_size} B, "
        f"wheels {wheels.size}/{wheels.uncompressed_size} B (compressed/uncompressed), "
        f"archive {result.size_bytes} B"
    )


def test_warm_build_calls_no_external_program_and_is_identical(
    arm64: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Tool, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"warm build ran {self.name}")

    monkeypatch.setattr(Tool, "run", refuse)
    monkeypatch.setattr(Tool, "popen", refuse)
    started = time.monotonic()
    warm = build_image(make_spec("arm64"), tmp_path / "again.tar", arm64.cache)
    print(f"\narm64 warm build {time.monotonic() - started:.2f}s")
    assert [layer.cached for layer in warm.layers] == [True, True, True]
    assert warm.manifest_digest == arm64.result.manifest_digest
    assert (tmp_path / "again.tar").read_bytes() == arm64.result.archive.read_bytes()


def test_skopeo_reports_the_platform_and_digest(arm64: Built) -> None:
    info = skopeo.inspect_oci_archive(arm64.result.archive)
    assert info["Architecture"] == "arm64"
    assert info["Os"] == "linux"
    assert info["Digest"] == arm64.result.manifest_digest
    assert info["Layers"] == [layer.digest for layer in arm64.result.layers]


def test_umoci_unpacks_merged_usr_rootfs(arm64: Built, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    with tarfile.open(arm64.result.archive) as tf:
        tf.extractall(layout, filter="data")
    rootfs = umoci.unpack(layout, "1.0", tmp_path / "bundle")
    assert (rootfs / "bin").readlink() == Path("usr/bin")
    assert (rootfs / "lib").readlink() == Path("usr/lib")
    assert (rootfs / "usr/bin/python3.11").is_file()
    assert (rootfs / "usr/lib/ld-linux-aarch64.so.1").exists()  # merged from ./lib
    assert (rootfs / "opt/edgepack/site-packages/onnxruntime/__init__.py").is_file()
    assert (rootfs / "opt/edgepack/model/mnist.onnx").read_bytes() == (
        TESTDATA / "onnx" / "mnist.onnx"
    ).read_bytes()
    assert "edgepack:x:10001:10001:" in (rootfs / "etc/passwd").read_text()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert not (rootfs / "usr/share/man").exists()
    assert "Package: libc6" in (rootfs / "var/lib/dpkg/status").read_text()
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["process"]["user"]["uid"] == 10001


def _podman_run(
    podman: list[str], image: str, *options: str, command: tuple[str, ...] = ()
) -> str:
    """``podman run --rm [OPTIONS] IMAGE [COMMAND]`` with this sandbox's runtime and limits."""
    args = [
        *podman,
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        *options,
        image,
        *command,
    ]
    try:
        proc = PODMAN.run(args, timeout=600)
    except ToolFailedError as exc:
        pytest.fail(f"podman run failed: {exc.one_line()}")
    return proc.stdout.decode()


def test_arm64_image_runs_numpy_and_onnxruntime_under_qemu(
    arm64: Built, podman: list[str], qemu_arm64: None
) -> None:
    load = PODMAN.run([*podman, "load", "-i", arm64.result.archive], timeout=600)
    assert b"edgepack/it-arm64:1.0" in load.stdout + load.stderr
    out = _podman_run(
        podman,
        "docker.io/edgepack/it-arm64:1.0",
        "--arch",
        "arm64",
        "-v",
        f"{arm64_cpuinfo()}:/proc/cpuinfo:ro",
    )
    assert "CPUExecutionProvider" in out and "2.2.1" in out
    machine = _podman_run(
        podman,
        "docker.io/edgepack/it-arm64:1.0",
        "--entrypoint",
        "python3",
        command=("-c", "import os, platform; print(platform.machine(), os.getuid())"),
    )
    assert machine.split() == ["aarch64", "10001"]


def test_amd64_image_builds_and_runs_natively(amd64: Built, podman: list[str]) -> None:
    assert skopeo.inspect_oci_archive(amd64.result.archive)["Architecture"] == "amd64"
    assert verify_image_archive(amd64.result.archive) == []
    PODMAN.run([*podman, "load", "-i", amd64.result.archive], timeout=600)
    out = _podman_run(podman, "docker.io/edgepack/it-amd64:1.0", "--arch", "amd64")
    assert "CPUExecutionProvider" in out


def test_emulated_arm64_cpuinfo_is_plausible() -> None:
    text = arm64_cpuinfo().read_text()
    assert text.count("processor\t:") == 4
    assert "CPU part\t: 0xd08" in text and "Features\t: fp asimd" in text


def test_unknown_debian_package_is_named(tmp_path: Path) -> None:
    from packager.image.cache import ContentCache
    from packager.image.debian import build_base_layer

    with pytest.raises(ToolFailedError, match="no-such-package-edgepack"):
        build_base_layer(DebianBase(packages=("no-such-package-edgepack",)), "arm64", (), 0,
                         ContentCache(tmp_path / "cache"))


def test_missing_wheel_is_named(tmp_path: Path) -> None:
    from packager.tools import pip

    with pytest.raises(ToolFailedError, match="onnxruntime"):
        pip.download(["onnxruntime==0.0.1"], tmp_path, arch="arm64", python_version="3.11",
                     with_deps=False)
