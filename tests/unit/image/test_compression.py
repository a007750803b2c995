"""zstd layers (--compression zstd): same tar, smaller blob, the zstd media type, stable bytes."""

from __future__ import annotations

import json
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from packager.image.builder import build_image
from packager.image.layer import TarEntry, with_parents, write_layer
from packager.image.oci import MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD, layer_diff_id
from packager.tools import skopeo
from tests.unit.image.test_builder import make_base, make_spec


def _entries() -> list[TarEntry]:
    text = b"".join(f"line {i} of a compressible file\n".encode() for i in range(20000))
    return with_parents(
        [
            TarEntry("opt/a/text.txt", "file", 0o644, size=len(text), data=text),
            TarEntry("opt/a/link", "symlink", 0o777, linkname="text.txt"),
        ]
    )


def test_zstd_layer_holds_the_same_tar_and_is_byte_stable(tmp_path: Path) -> None:
    gz = write_layer(_entries(), tmp_path / "l.tgz", mtime=7)
    zs = write_layer(_entries(), tmp_path / "l.zst", mtime=7, compression="zstd")
    again = write_layer(_entries(), tmp_path / "l2.zst", mtime=7, compression="zstd")
    assert zs.diff_id == gz.diff_id  # the same uncompressed tar
    assert zs.uncompressed_size == gz.uncompressed_size
    assert zs.digest != gz.digest and zs.size < gz.size
    assert again.digest == zs.digest
    assert (tmp_path / "l.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
    # An independent decoder (the zstd CLI) gives the tar back.
    raw = subprocess.run(
        ["zstd", "-dc", str(tmp_path / "l.zst")], capture_output=True, check=True
    ).stdout
    tar = tmp_path / "l.tar"
    tar.write_bytes(raw)
    with tarfile.open(tar) as t:
        assert t.getnames() == ["opt", "opt/a", "opt/a/link", "opt/a/text.txt"]
    with (tmp_path / "l.zst").open("rb") as fh:
        assert layer_diff_id(fh, "zstd") == (zs.diff_id, zs.uncompressed_size)


def _layer_media_types(archive: Path, tmp: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]
    return [layer["mediaType"] for layer in manifest["layers"]]


def test_build_image_writes_zstd_layers_with_their_media_type(tmp_path: Path) -> None:
    base = make_base(tmp_path)
    spec = make_spec(tmp_path, base)
    gzip_image = build_image(spec, tmp_path / "g.tar", tmp_path / "cache")
    zstd_spec = replace(spec, compression="zstd")
    zstd_image = build_image(zstd_spec, tmp_path / "z.tar", tmp_path / "cache")
    again = build_image(zstd_spec, tmp_path / "z2.tar", tmp_path / "cache")
    assert again.manifest_digest == zstd_image.manifest_digest
    assert (tmp_path / "z.tar").read_bytes() == (tmp_path / "z2.tar").read_bytes()
    kinds = _layer_media_types(tmp_path / "z.tar", tmp_path)
    # The user's base layer is copied as it is (gzip); edgepack's own layers are zstd.
    assert kinds[0] == MEDIA_LAYER_GZIP
    assert kinds[1:] and set(kinds[1:]) == {MEDIA_LAYER_ZSTD}
    assert _layer_media_types(tmp_path / "g.tar", tmp_path)[1:] == [MEDIA_LAYER_GZIP] * (
        len(kinds) - 1
    )
    # Same tars (diff_ids), so the same image config apart from nothing: the cache kept them apart.
    assert [x.diff_id for x in zstd_image.layers] == [x.diff_id for x in gzip_image.layers]
    assert [x.digest for x in zstd_image.layers][1:] != [x.digest for x in gzip_image.layers][1:]


@pytest.mark.skipif(
    subprocess.run(["which", "skopeo"], capture_output=True).returncode != 0,
    reason="skopeo missing",
)
def test_skopeo_reads_a_zstd_image(tmp_path: Path) -> None:
    spec = replace(make_spec(tmp_path, make_base(tmp_path)), compression="zstd")
    image = build_image(spec, tmp_path / "z.tar", tmp_path / "cache")
    info = skopeo.inspect_oci_archive(image.archive)
    assert info["Digest"] == image.manifest_digest
    raw = skopeo.inspect_oci_archive(image.archive, raw=True)
    assert raw["layers"][-1]["mediaType"] == MEDIA_LAYER_ZSTD
    # skopeo copies (and digest-checks) every blob.
    skopeo.copy(f"oci-archive:{image.archive}", f"dir:{tmp_path / 'copy'}")
