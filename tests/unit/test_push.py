"""``edgepack push`` planning: the index of several platforms is the same bytes for the same
images (issue 13)."""

from __future__ import annotations

import json

from packager.push import index_document


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
