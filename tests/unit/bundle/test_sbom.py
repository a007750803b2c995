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


@pytest.mark.parametrize("components", [
    [1, "x", None], [{"properties": 5}], [{"properties": [1, {"name": "edgepack:kind"}]}], {},
])
def test_a_hostile_sbom_is_summarised_as_invalid_not_a_traceback(
    tmp_path: Path, components: object
) -> None:
    """Before: a component or property that is not an object raised AttributeError out of
    `edgepack verify` (an internal error)."""
    (tmp_path / "sbom.cdx.json").write_text(json.dumps(
        {"bomFormat": "CycloneDX", "specVersion": "1.6", "components": components}))
    summary = sbom_summary(tmp_path)
    assert summary is not None and summary["valid"] is False
    assert summary["debian_packages"] == summary["wheels"] == summary["models"] == 0


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


def test_a_deeply_nested_sbom_is_summarised_as_invalid_not_a_traceback(tmp_path: Path) -> None:
    """Before: json.loads (and the schema validator's own parse) raised RecursionError out of
    `edgepack verify` (an internal error, exit 1) for "[[[[..." under 16 MiB."""
    (tmp_path / "sbom.cdx.json").write_text('{"components": ' + "[" * 100_000)
    summary = sbom_summary(tmp_path)
    assert summary is not None and summary["valid"] is False and summary["components"] == 0


def _unverified_provenance(root: Path, predicate: object) -> None:
    """An unsigned provenance envelope whose statement passes check_statement."""
    import base64

    statement = {"_type": "https://in-toto.io/Statement/v1",
                 "subject": [{"name": "install.sh", "digest": {"sha256": "f" * 64}}],
                 "predicateType": SLSA_PREDICATE, "predicate": predicate}
    payload = base64.b64encode(json.dumps(statement).encode()).decode()
    (root / PROVENANCE_FILE).write_text(json.dumps({"payload": payload, "signatures": []}))


@pytest.mark.parametrize("predicate", [
    {"buildDefinition": []},
    {"buildDefinition": {"resolvedDependencies": [1]}},
    {"buildDefinition": {"resolvedDependencies": "ab"}},
    {"buildDefinition": {"resolvedDependencies": [{"uri": "x"}]}},  # no name
    {"buildDefinition": {"resolvedDependencies": [{"name": "n", "digest": []}]}},
    {"buildDefinition": {"resolvedDependencies": [{"name": ["n"], "digest": {}}]}},
    {"runDetails": []},
])
def test_a_malformed_unverified_provenance_is_one_verify_error(
    tmp_path: Path, predicate: object
) -> None:
    """Without --key anyone's provenance is summarised. Before: a predicate not of the shape
    edgepack writes raised AttributeError/KeyError/TypeError out of `edgepack verify` (exit 1)."""
    _unverified_provenance(tmp_path, predicate)
    with pytest.raises(VerifyError) as raised:
        provenance_summary(tmp_path, None)
    assert raised.value.message.startswith(
        f"{tmp_path}: provenance: {PROVENANCE_FILE} is malformed (")
    assert raised.value.message.endswith("Error in its predicate)")


def test_a_deeply_nested_provenance_is_one_verify_error(tmp_path: Path) -> None:
    """Before: RecursionError (exit 1) out of json.loads."""
    (tmp_path / PROVENANCE_FILE).write_text("[" * 100_000)
    with pytest.raises(VerifyError) as raised:
        provenance_summary(tmp_path, None)
    assert raised.value.message == f"{tmp_path}: provenance: {PROVENANCE_FILE} is malformed"
