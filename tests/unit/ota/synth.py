"""Small but real bundles for OTA tests: an OCI image layout in image.tar plus the bundle files,
with the manifest written by the project's own manifest writer (the spine's schema)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from packager.bundle.manifest import BundleMeta, write_manifest


@dataclass(frozen=True)
class SynthBundle:
    path: Path
    ref: str
    layer_sizes: dict[str, int]  # layer name -> compressed bytes


def _layer(path: str, content: bytes) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(path)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    uncompressed = raw.getvalue()
    return gzip.compress(uncompressed, mtime=0), "sha256:" + hashlib.sha256(
        uncompressed
    ).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_bundle(
    out: Path,
    *,
    name: str = "demo",
    version: str = "1.0.0",
    model: bytes = b"model-1",
    runtime: bytes = b"runtime-1",
    base: bytes = b"base-1" * 1000,
    ready: str = "yes",
    platform: str = "linux/amd64",
    confinement: bytes | None = None,
) -> SynthBundle:
    """``ready`` is read by the fake engine: "yes" serves ready, "never" answers 503 forever."""
    out.mkdir(parents=True)
    ref = f"edgepack/{name}:{version}"
    blobs: dict[str, bytes] = {}
    layers = []
    records = []  # the bundle manifest's image.layers
    sizes: dict[str, int] = {}
    diff_ids = []
    for layer_name, path, content in (
        ("base", "usr/lib/base.bin", base),
        ("runtime", "opt/edgepack/runtime.py", runtime),
        ("model", "opt/edgepack/model/model.onnx", model),
    ):
        blob, diff_id = _layer(path, content)
        digest = hashlib.sha256(blob).hexdigest()
        blobs[digest] = blob
        sizes[layer_name] = len(blob)
        diff_ids.append(diff_id)
        records.append({"name": layer_name, "digest": f"sha256:{digest}", "diff_id": diff_id,
                        "size": len(blob), "uncompressed_size": len(gzip.decompress(blob))})
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": f"sha256:{digest}",
                "size": len(blob),
            }
        )
    config = json.dumps(
        {
            "architecture": platform.split("/")[1],
            "os": "linux",
            "config": {"Labels": {"edgepack.test.ready": ready}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        sort_keys=True,
    ).encode()
    config_digest = hashlib.sha256(config).hexdigest()
    blobs[config_digest] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{config_digest}",
                "size": len(config),
            },
            "layers": layers,
        },
        sort_keys=True,
    ).encode()
    manifest_digest = hashlib.sha256(manifest).hexdigest()
    blobs[manifest_digest] = manifest
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{manifest_digest}",
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    docker = [
        {
            "Config": f"blobs/sha256/{config_digest}",
            "RepoTags": [ref],
            "Layers": [f"blobs/sha256/{layer['digest'][7:]}" for layer in layers],
        }
    ]
    with tarfile.open(out / "image.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", json.dumps(index).encode())
        _add(tar, "manifest.json", json.dumps(docker).encode())
        for digest, blob in sorted(blobs.items()):
            _add(tar, f"blobs/sha256/{digest}", blob)
    (out / f"edgepack-{name}.service").write_text(f"[Service]\nExecStart=/bin/true {ref}\n")
    (out / "install.sh").write_text("#!/bin/sh\necho install\n")
    (out / "install.sh").chmod(0o755)
    (out / "README.md").write_text(f"# {name} {version}\n")
    if confinement is not None:  # what the Linux backend writes (packager.agent.confinement)
        (out / "confinement.json").write_bytes(confinement)
    write_manifest(
        out,
        BundleMeta.model_validate({
            "name": name,
            "version": version,
            "target": {
                "name": "industrial-pc",
                "device_class": "linux-container",
                "platform": platform,
            },
            "model": {
                "source": "model.onnx",
                "format": "onnx",
                "digest": "sha256:" + hashlib.sha256(model).hexdigest(),
                "size_bytes": len(model),
                "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
            },
            "fit": {"target": "industrial-pc", "fits": True, "resources": []},
            "image": {
                "archive": "image.tar",
                "digest": f"sha256:{manifest_digest}",
                "config_digest": f"sha256:{config_digest}",
                "ref": ref,
                "platform": platform,
                "size_bytes": (out / "image.tar").stat().st_size,
                "port": 8080,
                "layers": records,
            },
        }),
    )
    return SynthBundle(out, ref, sizes)
