"""Files read back out of an OCI image archive (image.tar) with tarfile, independently of the
writer: the first manifest of index.json, its layers (gzip or plain tar) and their files."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

MODEL_DIR = "opt/edgepack/model/"


def image_layers(archive: Path) -> list[dict[str, Any]]:
    """The layer descriptors of the archive's (first) image manifest, base first."""
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"].replace(":", "/")
        manifest = json.load(outer.extractfile(f"blobs/{digest}"))  # type: ignore[arg-type]
    layers: list[dict[str, Any]] = manifest["layers"]
    return layers


def layer_files(
    archive: Path, digest: str, keep: Callable[[str], bool] = lambda path: True
) -> dict[str, bytes]:
    """{path: bytes} of the regular files in the layer ``digest`` (``sha256:...``) whose path
    ``keep`` accepts (only those are read)."""
    with tarfile.open(archive) as outer:
        blob = outer.extractfile(f"blobs/{digest.replace(':', '/')}")
        assert blob is not None, f"{digest} is not in {archive}"
        with tarfile.open(fileobj=blob, mode="r:*") as layer:
            return {
                m.name: layer.extractfile(m).read()  # type: ignore[union-attr]
                for m in layer.getmembers()
                if m.isfile() and keep(m.name)
            }


def model_layer_files(archive: Path) -> dict[str, bytes]:
    """The files of the image's last layer (the model layer), by path."""
    return layer_files(archive, image_layers(archive)[-1]["digest"])


def model_files(archive: Path, names: Iterable[str], dest: Path) -> dict[str, Path]:
    """The files ``names`` of /opt/edgepack/model as the image ships them (a later layer's copy
    wins), written to ``dest/NAME``: {name: path}."""
    wanted = {MODEL_DIR + name for name in names}
    found: dict[str, Path] = {}
    for layer in image_layers(archive):
        files = layer_files(archive, layer["digest"], lambda path: path.lstrip("./") in wanted)
        for path, data in files.items():
            name = path.lstrip("./").removeprefix(MODEL_DIR)
            found[name] = dest / name
            found[name].write_bytes(data)
    assert {MODEL_DIR + name for name in found} == wanted, f"{sorted(wanted)}: not all in {archive}"
    return found
