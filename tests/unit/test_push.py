"""``edgepack push`` planning: the index of several platforms is the same bytes for the same
images (issue 13); each SBOM is an OCI 1.1 artifact whose subject is its image (issue 15)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from packager.push import (
    SBOM_ARTIFACT_TYPE,
    _Source,
    index_document,
    referrers_tag,
    sbom_referrer,
    stage_sbom_layout,
)


def test_index_lists_every_platform_in_the_order_given() -> None:
    entries = [
        ("sha256:" + "1" * 64, 1234, "linux/amd64"),
        ("sha256:" + "2" * 64, 987, "linux/arm64/v8"),
    ]
    index = index_document(entries)
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
    ]
    assert [(m["digest"], m["size"]) for m in index["manifests"]] == [e[:2] for e in entries]
    assert json.loads(json.dumps(index)) == index_document(list(entries))


def test_sbom_referrer_is_an_oci_artifact_whose_subject_is_the_image() -> None:
    subject = "sha256:" + "3" * 64
    sbom = b'{"bomFormat": "CycloneDX"}\n'
    manifest_bytes, index_bytes = sbom_referrer(subject, 1234, sbom)
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == SBOM_ARTIFACT_TYPE == "application/vnd.cyclonedx+json"
    # The OCI 1.1 empty config: "{}" inline.
    assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(b"{}").hexdigest()
    assert base64.b64decode(manifest["config"]["data"]) == b"{}"
    (layer,) = manifest["layers"]
    assert (layer["digest"], layer["size"]) == ("sha256:" + hashlib.sha256(sbom).hexdigest(), 27)
    assert manifest["subject"] == {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "digest": subject, "size": 1234}
    (entry,) = json.loads(index_bytes)["manifests"]
    assert entry["digest"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    assert entry["size"] == len(manifest_bytes)
    assert sbom_referrer(subject, 1234, sbom) == (manifest_bytes, index_bytes)
    assert referrers_tag(subject) == "sha256-" + "3" * 64


def test_sbom_layout_holds_each_bundles_sbom_and_skips_bundles_without(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "blobs" / "sha256").mkdir(parents=True)
    sources = []
    for n, sbom in enumerate([b"first sbom", None]):
        bundle = tmp_path / f"b{n}"
        bundle.mkdir()
        if sbom is not None:
            (bundle / "sbom.cdx.json").write_bytes(sbom)
        image_manifest = f"image manifest {n}".encode()
        digest = "sha256:" + hashlib.sha256(image_manifest).hexdigest()
        (images / "blobs" / "sha256" / digest[7:]).write_bytes(image_manifest)
        sources.append(_Source(bundle, bundle / "image.tar", "m", "1", "linux/amd64", digest))
    layout = tmp_path / "sbom"
    ((src, tag, artifact, index),) = stage_sbom_layout(sources, images, layout)
    assert src is sources[0]
    top = json.loads((layout / "index.json").read_bytes())
    (ref,) = top["manifests"]
    assert ref["annotations"]["org.opencontainers.image.ref.name"] == tag
    assert (layout / "blobs" / "sha256" / ref["digest"][7:]).read_bytes() == index
    manifest = json.loads((layout / "blobs" / "sha256" / artifact[7:]).read_bytes())
    assert manifest["subject"]["digest"] == sources[0].digest
    assert manifest["subject"]["size"] == len(b"image manifest 0")
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
