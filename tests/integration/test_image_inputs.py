"""What goes into an image from the user's side: a model's external data and a --base archive,
through the real CLI, the real image, podman and onnxruntime.

Needs network access to deb.debian.org and PyPI (a cold cache), podman and runc.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.image.oci import MEDIA_LAYER_GZIP, MEDIA_LAYER_TAR
from tests.image_factory import MIB, base_archive, gzip_bomb, plain_blob
from tests.integration.conftest import REPO, build_json, edgepack
from tests.oci_files import model_layer_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT = 18811  # this module's loopback port (18800-18899 are the image-input tests')
W_SHAPE = (64, 32)


def nested_model(folder: Path) -> tuple[Path, np.ndarray]:
    """``onnx.save(model, "m.onnx", save_as_external_data=True, location="weights/ext.bin")``."""
    weight = np.random.default_rng(7).standard_normal(W_SHAPE).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", W_SHAPE[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", W_SHAPE[1]])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").mkdir(exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights/ext.bin",
              size_threshold=0)
    assert (folder / "weights" / "ext.bin").stat().st_size == weight.nbytes
    return path, weight


def error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (progress lines start with '>')."""
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_nested_external_data_keeps_its_layout_and_the_runtime_gets_ready(
    tmp_path: Path, edgepack_cache: Path
) -> None:
    path, weight = nested_model(tmp_path / "src")
    doc = build_json(
        str(path), "--target", "industrial-pc", "--out", str(tmp_path / "bundle"),
        "--version", "1.0.0", "--cache-dir", str(edgepack_cache),
    )
    bundle = Path(doc["bundle"])
    files = model_layer_files(bundle / "image.tar")
    assert "opt/edgepack/model/weights/ext.bin" in files
    assert "opt/edgepack/model/ext.bin" not in files  # not flattened
    assert files["opt/edgepack/model/weights/ext.bin"] == weight.tobytes()

    # The model folder exactly as the image holds it loads in onnxruntime and computes x @ W.
    import onnxruntime as ort

    model_dir = tmp_path / "from-image"
    for name, data in files.items():
        if name.startswith("opt/edgepack/model/"):
            dest = model_dir / name.removeprefix("opt/edgepack/model/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    x = np.random.default_rng(1).standard_normal((2, W_SHAPE[0])).astype(np.float32)
    y = ort.InferenceSession(str(model_dir / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-5)

    verified = edgepack("verify", str(bundle), "--json")
    assert json.loads(verified.stdout)["ok"] is True
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["size_bytes"] == path.stat().st_size + weight.nbytes
    # The fit the bundle records counts the built image's real size, not the estimate.
    storage = next(r for r in manifest["fit"]["resources"] if r["name"] == "storage")
    unpacked = sum(layer["uncompressed_size"] for layer in manifest["image"]["layers"])
    assert storage["needed_parts"] == {
        "image (installed)": unpacked,
        "previous version": unpacked,
        "image.tar": (bundle / "image.tar").stat().st_size,
    }
    assert doc["fit"] == manifest["fit"]

    # The bundle's own runtime, in podman: ready, and one inference answers.
    run = edgepack("run", str(bundle), "--smoke-test", "--port", str(PORT), "--timeout", "300",
                   "--json", check=False, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr


def test_symlinked_external_data_is_refused_naming_model_tensor_and_location(
    tmp_path: Path,
) -> None:
    path, _ = nested_model(tmp_path / "src")
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    ext = tmp_path / "src" / "weights" / "ext.bin"
    ext.unlink()
    ext.symlink_to(secret)
    out = tmp_path / "bundle"
    proc = edgepack("build", str(path), "--target", "industrial-pc", "--out", str(out),
                    check=False)
    assert proc.returncode == 3, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and "tensor 'W'" in lines[0]
    assert "'weights/ext.bin'" in lines[0] and "symbolic link" in lines[0]
    assert not out.exists()
    as_json = edgepack("build", str(path), "--target", "industrial-pc", "--out", str(out),
                       "--json", check=False)
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["exit_code"] == 3


def small_target(tmp: Path, size_mb: int) -> Path:
    """industrial-pc with ``size_mb`` of storage and no reserve."""
    text = (REPO / "targets" / "industrial-pc.toml").read_text()
    text = text.replace('name = "industrial-pc"', 'name = "industrial-pc-small"')
    text = text.replace("size_mb = 131072", f"size_mb = {size_mb}\nreserved_mb = 0")
    path = tmp / "industrial-pc-small.toml"
    path.write_text(text)
    return path


def test_gzip_bomb_base_does_not_fit_and_is_not_inflated(tmp_path: Path) -> None:
    path, _ = nested_model(tmp_path / "src")
    bomb = gzip_bomb(tmp_path / "bomb.gz", 4096)  # about 4 MiB on disk, 4 GiB of zeros
    assert bomb.size < 5 * MIB and bomb.uncompressed_size == 4 << 30
    base = base_archive(tmp_path / "base.tar", [(bomb, MEDIA_LAYER_GZIP)])
    target = small_target(tmp_path, 2048)  # 2 GiB: the 160 MiB estimate x 3 fits easily
    out = tmp_path / "bundle"
    proc = edgepack(
        "build", str(path), "--target", str(target), "--base", f"oci-archive:{base}",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), check=False,
    )
    assert proc.returncode == 5, proc.stdout + proc.stderr
    [line] = error_lines(proc.stderr)
    # The base needs more than the 1 GiB an image may take (two copies in 2 GiB); both named.
    assert "more than 1.0 GiB unpacked" in line
    assert "industrial-pc-small has 2.0 GiB of storage (2048 MB ssd - 0 MB reserved)" in line
    assert bomb.digest in line
    assert not out.exists()


def test_gzip_layer_labelled_uncompressed_is_refused(tmp_path: Path) -> None:
    import gzip
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("etc/hostname")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"base\n"))
    blob = plain_blob(tmp_path / "l.tgz", gzip.compress(buf.getvalue(), mtime=0),
                      diff_id_of=buf.getvalue())
    base = base_archive(tmp_path / "base.tar", [(blob, MEDIA_LAYER_TAR)])
    path, _ = nested_model(tmp_path / "src")
    proc = edgepack(
        "build", str(path), "--target", "industrial-pc", "--base", f"oci-archive:{base}",
        "--out", str(tmp_path / "bundle"), "--cache-dir", str(tmp_path / "cache"), check=False,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "layer 0" in proc.stderr and "says tar, the bytes are gzip" in proc.stderr
    assert not (tmp_path / "bundle").exists()
