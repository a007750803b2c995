from __future__ import annotations

import base64
import hashlib
import sys
import tarfile
import zipfile
from pathlib import Path

from packager.image.cache import ContentCache, cached_layer
from packager.image.layer import tree_entries, with_parents, write_layer
from packager.image.spec import WheelSet
from packager.image.wheels import bytecode_compiler, install_wheels, lock_key, scheme
from packager.tools.pip import platform_tags


def make_wheel(dest: Path) -> Path:
    """A minimal, valid pure-Python wheel with a console script (RECORD hashes included)."""
    files = {
        "demo/__init__.py": b"def main() -> None:\n    print('demo')\n",
        "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": (b"Wheel-Version: 1.0\nGenerator: test\n"
                                     b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        "demo-1.0.dist-info/entry_points.txt": b"[console_scripts]\ndemo = demo:main\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("demo-1.0.dist-info/RECORD,,")
    files["demo-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_install_uses_the_image_scheme_and_interpreter(tmp_path: Path) -> None:
    wheels = WheelSet(requirements=("demo==1.0",), site_packages="/opt/sp",
                      interpreter="/usr/bin/python3.11")
    root = tmp_path / "root"
    install_wheels([make_wheel(tmp_path)], wheels, root)
    assert (root / "opt/sp/demo/__init__.py").is_file()
    script = (root / "usr/local/bin/demo").read_text()
    assert script.startswith("#!/usr/bin/python3.11\n")
    assert (root / "opt/sp/demo-1.0.dist-info/INSTALLER").read_text() == "edgepack\n"
    record = (root / "opt/sp/demo-1.0.dist-info/RECORD").read_text()
    assert "../../usr/local/bin/demo" in record  # relative to site-packages, not the host
    assert str(tmp_path) not in record


def test_installed_layer_is_reproducible(tmp_path: Path) -> None:
    wheels = WheelSet(requirements=("demo==1.0",))
    wheel = make_wheel(tmp_path)
    digests = []
    for run in ("a", "b"):
        root = tmp_path / run
        install_wheels([wheel], wheels, root)
        blob = write_layer(with_parents(tree_entries(root)), tmp_path / f"{run}.tgz", mtime=0)
        digests.append(blob.digest)
    assert digests[0] == digests[1]
    with tarfile.open(tmp_path / "a.tgz") as tf:
        assert tf.getmember("usr/local/bin/demo").mode == 0o755


def test_scheme_and_platform_tags() -> None:
    s = scheme(Path("/stage"), WheelSet(requirements=()))
    assert s["purelib"] == s["platlib"] == "/stage/opt/edgepack/site-packages"
    assert s["scripts"] == "/stage/usr/local/bin"
    arm = platform_tags("arm64")
    assert arm[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in arm
    assert "manylinux2014_aarch64" in arm and not any("x86_64" in t for t in arm)
    assert "manylinux1_x86_64" in platform_tags("amd64")


def test_lock_key_tracks_platform_and_pins() -> None:
    a = WheelSet(requirements=("numpy==2.2.1", "onnxruntime==1.20.1"))
    b = WheelSet(requirements=("onnxruntime==1.20.1", "numpy==2.2.1"))
    assert lock_key(a, "arm64") == lock_key(b, "arm64")
    assert lock_key(a, "arm64") != lock_key(a, "amd64")
    assert lock_key(a, "arm64") != lock_key(WheelSet(requirements=("numpy==2.2.2",)), "arm64")


def test_bytecode_only_for_the_hosts_python() -> None:
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert bytecode_compiler(WheelSet(requirements=(), python_version=host)) == sys.executable
    assert bytecode_compiler(WheelSet(requirements=(), python_version="3.9")) is None


def test_cache_drops_corrupt_blobs_and_stale_layer_records(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    src = tmp_path / "f"
    src.write_bytes(b"hello")
    digest, size = cache.adopt_file(src)
    assert cache.verified_blob(digest) == cache.blob_path(digest)
    cache.blob_path(digest).write_bytes(b"jello")
    assert cache.verified_blob(digest) is None
    assert not cache.blob_path(digest).exists()
    cache.put_record("file-layer", "k", {"digest": digest, "diff_id": digest, "size": size,
                                         "uncompressed_size": 1})
    assert cached_layer(cache, "file-layer", "k") is None  # the blob is gone
