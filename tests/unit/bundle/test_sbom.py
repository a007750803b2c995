"""The CycloneDX SBOM and the SLSA provenance (issue 15): built with the format's library,
checked by its own schema validator, byte-identical for the same inputs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from packager.bundle.provenance import (
    PROVENANCE_FILE,
    SLSA_PREDICATE,
    dependency,
    provenance_summary,
    write_provenance,
)
from packager.bundle.sbom import (
    ModelEntry,
    build_sbom,
    copyright_licences,
    sbom_summary,
    validate,
    wheel_licences,
)
from packager.bundle.signing import generate_keypair, load_public_key, load_signer
from packager.errors import VerifyError
from packager.image.spec import PackageRecord

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: zlib

Files: *
License: Zlib

Files: debian/*
License: Zlib

Files: contrib/*
License: GPL-2+
 The full text...
"""


def test_copyright_licences_read_dep5_only() -> None:
    assert copyright_licences(DEP5) == ("Zlib", "GPL-2+")
    assert copyright_licences("This is the Debian package of foo.\nLicense: GPL\n") == ()


def test_wheel_licence_from_metadata(tmp_path: Path) -> None:
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(
            "demo-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
            "Classifier: License :: OSI Approved :: MIT License\n",
        )
    assert wheel_licences(wheel) == ("MIT License",)


def _sbom(tmp_path: Path, epoch: int = 1700000000) -> str:
    packages = (
        PackageRecord("deb", "zlib1g", "1:1.2.13.dfsg-1", "arm64", "z.deb", "a" * 64),
        PackageRecord("wheel", "onnxruntime", "1.32.0", "linux_aarch64", "o.whl", "b" * 64),
    )
    return build_sbom(
        image_name="edgepack/demo",
        image_version="1.0.0",
        image_digest="sha256:" + "c" * 64,
        packages=packages,
        debian_suite="bookworm",
        model=ModelEntry("demo.onnx", "d" * 64, "/opt/edgepack/model/demo.onnx"),
        runtime_files={"/opt/edgepack/runtime/x.py": "e" * 64},
        cache_dir=tmp_path / "empty-cache",
        epoch=epoch,
    )


def test_sbom_is_valid_cyclonedx_and_reproducible(tmp_path: Path) -> None:
    text = _sbom(tmp_path)
    assert validate(text) is None
    assert text == _sbom(tmp_path)
    doc = json.loads(text)
    assert doc["metadata"]["timestamp"].startswith("2023-11-14T22:13:20")
    purls = {c.get("purl") for c in doc["components"]}
    assert "pkg:deb/debian/zlib1g@1:1.2.13.dfsg-1?arch=arm64&distro=bookworm" in purls
    assert "pkg:pypi/onnxruntime@1.32.0" in purls
    types = {c["name"]: c["type"] for c in doc["components"]}
    assert types["demo.onnx"] == "machine-learning-model"
    assert _sbom(tmp_path, epoch=0) != text  # the timestamp is SOURCE_DATE_EPOCH's
    broken = dict(doc, specVersion="1.6", components=[{"name": "x"}])
    assert validate(json.dumps(broken)) is not None
    (tmp_path / "sbom.cdx.json").write_text(text)
    summary = sbom_summary(tmp_path)
    assert summary is not None
    assert (summary["debian_packages"], summary["wheels"], summary["valid"]) == (1, 1, True)


def test_provenance_is_signed_and_reported(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k")
    other = generate_keypair(tmp_path / "k", "other")
    deps = [dependency("model:demo.onnx", "d" * 64),
            dependency("zlib1g", "a" * 64, "pkg:deb/debian/zlib1g@1?arch=arm64")]
    write_provenance(tmp_path, {"install.sh": "f" * 64}, {"target": "rpi4"}, deps, 5,
                     load_signer(pair.private))
    summary = provenance_summary(tmp_path, load_public_key(pair.public))
    assert summary is not None and summary["status"] == "verified"
    assert summary["inputs"] == ["model:demo.onnx sha256:dddddddddddd", "1 deb packages"]
    with pytest.raises(VerifyError, match="provenance"):
        provenance_summary(tmp_path, load_public_key(other.public))
    envelope = json.loads((tmp_path / PROVENANCE_FILE).read_text())
    import base64

    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["predicateType"] == SLSA_PREDICATE
    definition = statement["predicate"]["buildDefinition"]
    assert definition["internalParameters"] == {"SOURCE_DATE_EPOCH": 5}
    assert "startedOn" not in json.dumps(statement)
