"""build_image end to end without network: a small base archive stands in for a user's --base."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from packager.errors import InputError
from packager.image.builder import build_image, inspect_image_archive, verify_image_archive
from packager.image.cache import canonical_json
from packager.image.layer import TarEntry, with_parents, write_layer
from packager.image.oci import (
    MEDIA_CONFIG,
    MEDIA_LAYER_GZIP,
    sha256_of,
)
from packager.image.spec import (
    ArchiveBase,
    FileEntry,
    FileLayer,
    HealthCheck,
    ImageConfig,
    ImageSpec,
)
from tests.image_factory import Blob, base_archive

EPOCH = 1_700_000_000


def make_base(tmp: Path, arch: str = "arm64") -> Path:
    """A one-layer OCI archive with its own Env and WorkingDir, written by our own writer."""
    layer = write_layer(with_parents([
        TarEntry("etc/base-release", "file", 0o644, size=5, data=b"base\n"),
    ]), tmp / "base-layer.tgz", mtime=0)
    blob = Blob(layer.path, layer.digest, layer.size, layer.diff_id, layer.uncompressed_size)
    return base_archive(
        tmp / f"base-{arch}.tar", [(blob, MEDIA_LAYER_GZIP)], arch=arch,
        run_config={"Env": ["PATH=/bin", "BASE=1"], "WorkingDir": "/srv", "Cmd": ["sh"]},
        history=["base layer"],
    )


def make_spec(tmp: Path, base: Path, model: bytes = b"model-v1" * 1000) -> ImageSpec:
    (tmp / "model.onnx").write_bytes(model)
    return ImageSpec(
        platform_os="linux", arch="arm64", variant="v8",
        base=ArchiveBase(f"oci-archive:{base}", base, "oci-archive"),
        wheels=None,
        layers=(
            FileLayer("runtime", (FileEntry("/opt/edgepack/app/server.py", b"print('hi')\n"),),
                      dirs=(("/var/lib/edgepack", 0o750, 10001, 10001),),
                      symlinks=(("/opt/edgepack/current", "app"),)),
            FileLayer("model", (FileEntry("/opt/edgepack/model/model.onnx", tmp / "model.onnx",
                                          uid=10001, gid=10001),)),
        ),
        config=ImageConfig(
            user="10001:10001", entrypoint=("python3", "/opt/edgepack/app/server.py"),
            env=(("EDGEPACK_MODEL", "/opt/edgepack/model/model.onnx"),),
            exposed_ports=("8080/tcp",), labels=(("org.example.x", "y"),),
            healthcheck=HealthCheck(test=("CMD", "true"), interval_s=10, timeout_s=2,
                                    start_period_s=30, retries=4),
        ),
        ref_name="edgepack/mnist:1.0.0",
        annotations=(("org.opencontainers.image.version", "1.0.0"),),
        created_epoch=EPOCH,
    )


def read_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tf:
        fh = tf.extractfile(name)
        assert fh is not None
        return fh.read()


def read_json(archive: Path, name: str) -> Any:
    return json.loads(read_member(archive, name))


def blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def test_layout_cross_references(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, make_base(tmp_path))
    result = build_image(spec, tmp_path / "out" / "image.tar", tmp_path / "cache")
    archive = result.archive
    assert read_json(archive, "oci-layout") == {"imageLayoutVersion": "1.0.0"}
    index = read_json(archive, "index.json")
    (entry,) = index["manifests"]
    assert entry["digest"] == result.manifest_digest
    assert entry["annotations"] == {
        "io.containerd.image.name": "docker.io/edgepack/mnist:1.0.0",
        "org.opencontainers.image.ref.name": "1.0.0",
    }
    manifest_bytes = read_member(archive, blob(result.manifest_digest))
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == result.manifest_digest
    assert entry["size"] == len(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["annotations"] == {"org.opencontainers.image.version": "1.0.0"}
    assert manifest["config"]["digest"] == result.config_digest
    config = read_json(archive, blob(result.config_digest))
    layers = manifest["layers"]
    assert [lay["digest"] for lay in layers] == [lay.digest for lay in result.layers]
    assert [lay.name for lay in result.layers] == ["base-0", "runtime", "model"]
    for desc, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        data = read_member(archive, blob(desc["digest"]))
        assert len(data) == desc["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == desc["digest"]
        assert "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest() == diff_id
    legacy = read_json(archive, "manifest.json")
    assert legacy == [{"Config": blob(result.config_digest),
                       "RepoTags": ["edgepack/mnist:1.0.0"],
                       "Layers": [blob(lay["digest"]) for lay in layers]}]
    assert verify_image_archive(archive) == []
    assert result.size_bytes == archive.stat().st_size


def test_config_keeps_base_values_ours_override(tmp_path: Path) -> None:
    result = build_image(make_spec(tmp_path, make_base(tmp_path)), tmp_path / "i.tar",
                         tmp_path / "cache")
    info = inspect_image_archive(result.archive)
    assert (info["architecture"], info["variant"], info["os"]) == ("arm64", "v8", "linux")
    assert info["manifest_digest"] == result.manifest_digest
    cfg = info["config"]
    assert cfg["created"] == "2023-11-14T22:13:20Z"
    c = cfg["config"]
    assert c["Env"] == ["PATH=/bin", "BASE=1",
                        "EDGEPACK_MODEL=/opt/edgepack/model/model.onnx"]
    assert c["WorkingDir"] == "/srv"  # ours is the default "/", so the base's stays
    assert "Cmd" not in c  # a new entrypoint drops the base's Cmd, as docker does
    assert c["Entrypoint"] == ["python3", "/opt/edgepack/app/server.py"]
    assert c["User"] == "10001:10001"
    assert c["ExposedPorts"] == {"8080/tcp": {}}
    assert c["Healthcheck"] == {"Test": ["CMD", "true"], "Interval": 10_000_000_000,
                                "Timeout": 2_000_000_000, "StartPeriod": 30_000_000_000,
                                "Retries": 4}
    assert [h.get("comment") for h in cfg["history"]] == [None, "runtime", "model"]
    assert [lay["size"] for lay in info["layers"]] == [lay.size for lay in result.layers]


def test_two_builds_are_byte_identical_and_model_change_rebuilds_one_layer(
        tmp_path: Path) -> None:
    base = make_base(tmp_path)
    first = build_image(make_spec(tmp_path, base), tmp_path / "a.tar", tmp_path / "c1")
    second = build_image(make_spec(tmp_path, base), tmp_path / "b.tar", tmp_path / "c2")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert first.manifest_digest == second.manifest_digest
    warm = build_image(make_spec(tmp_path, base), tmp_path / "w.tar", tmp_path / "c1")
    assert [lay.cached for lay in warm.layers] == [True, True, True]
    changed = build_image(make_spec(tmp_path, base, b"model-v2"), tmp_path / "m.tar",
                          tmp_path / "c1")
    assert [lay.cached for lay in changed.layers] == [True, True, False]
    assert [lay.digest for lay in changed.layers[:2]] == [lay.digest for lay in first.layers[:2]]
    assert changed.layers[2].digest != first.layers[2].digest


def _flip_byte(archive: Path, member: str, at: int = 40) -> None:
    with tarfile.open(archive) as tf:
        offset = tf.getmember(member).offset_data
    with archive.open("r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_verify_names_a_flipped_layer_blob(tmp_path: Path) -> None:
    result = build_image(make_spec(tmp_path, make_base(tmp_path)), tmp_path / "i.tar",
                         tmp_path / "cache")
    model = blob(result.layers[-1].digest)
    _flip_byte(result.archive, model)
    problems = verify_image_archive(result.archive)
    assert problems and all(model in p for p in problems)


def test_verify_names_a_flipped_config(tmp_path: Path) -> None:
    result = build_image(make_spec(tmp_path, make_base(tmp_path)), tmp_path / "i.tar",
                         tmp_path / "cache")
    _flip_byte(result.archive, blob(result.config_digest), at=1)
    problems = verify_image_archive(result.archive)
    assert any(blob(result.config_digest) in p for p in problems)


def test_verify_rejects_a_non_archive(tmp_path: Path) -> None:
    bad = tmp_path / "x.tar"
    bad.write_bytes(b"not a tar")
    assert verify_image_archive(bad)[0].startswith(str(bad))


def test_base_of_another_architecture_is_refused(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, make_base(tmp_path, arch="amd64"))
    with pytest.raises(InputError, match=r"linux/amd64.*linux/arm64"):
        build_image(spec, tmp_path / "i.tar", tmp_path / "cache")
    assert not (tmp_path / "i.tar").exists()


def test_missing_base_and_missing_model_fail_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar"
    spec = make_spec(tmp_path, missing)
    with pytest.raises(InputError, match=r"nope\.tar"):
        build_image(spec, tmp_path / "o" / "i.tar", tmp_path / "cache")
    spec = make_spec(tmp_path, make_base(tmp_path))
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(InputError, match=r"model\.onnx.*layer 'model'"):
        build_image(spec, tmp_path / "o" / "i.tar", tmp_path / "cache")
    # Nothing half-written: no archive and no temp file next to where it would have gone.
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_oci_layout_directory_base_gives_the_same_image(tmp_path: Path) -> None:
    archive = make_base(tmp_path)
    layout = tmp_path / "layout"
    with tarfile.open(archive) as tf:
        tf.extractall(layout, filter="data")
    from_tar = build_image(make_spec(tmp_path, archive), tmp_path / "a.tar", tmp_path / "c1")
    spec = make_spec(tmp_path, archive)
    spec = ImageSpec(**{**spec.__dict__,
                        "base": ArchiveBase(str(layout), layout, "oci-layout")})
    from_dir = build_image(spec, tmp_path / "b.tar", tmp_path / "c2")
    assert from_dir.manifest_digest == from_tar.manifest_digest
    base_layer = from_dir.layers[0]
    with tarfile.open(archive) as tf:
        fh = tf.extractfile(blob(base_layer.digest))
        assert fh is not None
        assert base_layer.uncompressed_size == len(gzip.decompress(fh.read()))


def test_base_layer_with_wrong_diff_id_is_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    with tarfile.open(make_base(tmp_path)) as tf:
        tf.extractall(layout, filter="data")
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / blob(index["manifests"][0]["digest"])
    manifest = json.loads(manifest_path.read_text())
    config_path = layout / blob(manifest["config"]["digest"])
    config = json.loads(config_path.read_text())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    data = canonical_json(config)
    new_config = layout / blob(sha256_of(data))
    new_config.write_bytes(data)
    manifest["config"] = {"mediaType": MEDIA_CONFIG, "digest": sha256_of(data), "size": len(data)}
    mdata = canonical_json(manifest)
    (layout / blob(sha256_of(mdata))).write_bytes(mdata)
    index["manifests"][0].update(digest=sha256_of(mdata), size=len(mdata))
    (layout / "index.json").write_text(json.dumps(index))
    spec = make_spec(tmp_path, layout)
    spec = ImageSpec(**{**spec.__dict__, "base": ArchiveBase(str(layout), layout, "oci-layout")})
    with pytest.raises(InputError, match="diff_ids"):
        build_image(spec, tmp_path / "i.tar", tmp_path / "cache")


def test_the_file_layer_key_changes_exactly_when_the_blob_bytes_do(tmp_path: Path) -> None:
    """The key covers the entries, the mtime and the compression, which the blob's bytes are
    made of, and not the layer's name, which they are not: two layers with the same files share
    one blob (written here into separate caches to show the bytes really are the same)."""
    from dataclasses import replace

    from packager.image.builder import file_layer_entries, file_layer_key
    from packager.image.cache import ContentCache, store_layer
    from packager.image.layer import Compression

    (tmp_path / "model.onnx").write_bytes(b"weights" * 100)
    files = (FileEntry("/opt/edgepack/model/model.onnx", tmp_path / "model.onnx"),
             FileEntry("/opt/edgepack/app/run.py", b"print('hi')\n", mode=0o755))
    model = FileLayer("model", files)
    variants: dict[str, tuple[FileLayer, int, Compression]] = {
        "same": (model, EPOCH, "gzip"),
        "renamed": (FileLayer("other-name", files), EPOCH, "gzip"),
        "epoch": (model, EPOCH + 1, "gzip"),
        "zstd": (model, EPOCH, "zstd"),
        "mode": (replace(model, files=(files[0], replace(files[1], mode=0o644))), EPOCH, "gzip"),
        "content": (replace(model, files=(files[0], replace(files[1], source=b"print(1)\n"))),
                    EPOCH, "gzip"),
        "dir": (replace(model, dirs=(("/tmp", 0o1777, 0, 0),)), EPOCH, "gzip"),
    }
    keys, digests = {}, {}
    for name, (layer, epoch, compression) in variants.items():
        entries = file_layer_entries(layer)
        keys[name] = file_layer_key(entries, epoch, compression)
        blob = store_layer(ContentCache(tmp_path / f"cache-{name}"), "file-layer", keys[name],
                           entries, mtime=epoch, label=layer.name, compression=compression)
        digests[name] = blob.digest
    assert keys["renamed"] == keys["same"] and digests["renamed"] == digests["same"]
    changed = [n for n in variants if n not in ("same", "renamed")]
    assert len({keys[n] for n in changed} | {keys["same"]}) == len(changed) + 1
    assert len({digests[n] for n in changed} | {digests["same"]}) == len(changed) + 1
