"""``edgepack bake`` planning and rendering (issue 13): what the bake file says, that nothing in
a bundle's names becomes HCL syntax, and one clear line for what cannot be a target or a tag.
Real bundles through real buildx: tests/integration/test_buildx.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.bake import BakeTarget, hcl_string, plan_bake, render_bake_file
from packager.bundle.manifest import write_manifest
from packager.cli import main
from packager.errors import UsageError, VerifyError
from tests.unit.bundle.meta import sample_meta

DIGEST = "sha256:" + "a" * 64


def _fake_bundle(root: Path, name: str, version: str = "1.0.0") -> Path:
    """A folder with only its manifest (and SHA256SUMS): enough for the checks made before
    verification."""
    root.mkdir(parents=True)
    write_manifest(root, sample_meta())
    # Then the names as a crafted manifest may carry them (past the writer's own checks).
    document = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**document, "name": name, "version": version}))
    return root


def test_hcl_strings_interpolate_nothing() -> None:
    assert hcl_string('a"b\\c') == '"a\\"b\\\\c"'
    assert hcl_string("${REGISTRY}%{if x}") == '"$${REGISTRY}%%{if x}"'
    assert hcl_string("x\ny") == '"x\\ny"'


def test_bake_file_names_each_target_its_platforms_context_and_tag() -> None:
    targets = (
        BakeTarget(
            "mnist",
            "mnist",
            None,
            ("linux/amd64", "linux/arm64/v8"),
            f"oci-layout://images/mnist@{DIGEST}",
            "mnist:1.0.0",
        ),
        BakeTarget(
            "mnist-rpi4",
            "mnist",
            "rpi4",
            ("linux/arm64/v8",),
            f"oci-layout://images/mnist@{DIGEST}",
            "mnist:1.0.0-rpi4",
        ),
    )
    text = render_bake_file(targets, {"default": ("mnist",), "devices": ("mnist-rpi4",)})
    assert text.count('target "') == 3  # the two and the shared "_edgepack"
    assert 'group "default" {\n  targets = ["mnist"]\n}' in text
    assert (
        f'contexts = {{ edgepack = "oci-layout://${{EDGEPACK_BAKE_DIR}}/images/mnist@{DIGEST}" }}'
        in text
    )
    assert 'platforms = ["linux/amd64", "linux/arm64/v8"]' in text
    assert 'tags = ["${REGISTRY}/mnist:1.0.0-rpi4"]' in text
    assert '["type=oci,dest=${OCI_DIR}/mnist-rpi4.tar"]' in text
    assert render_bake_file(targets, {"default": ("mnist",)}) == render_bake_file(
        targets, {"default": ("mnist",)}
    )


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("MNIST", "1.0.0"),
        ("mnist${x}", "1.0.0"),
        ("a b", "1"),
        ("mnist", "1.0\n"),
        ("mnist", "${REGISTRY}"),
        ("mnist", "-1"),
    ],
)
def test_names_that_cannot_be_a_target_or_tag_are_refused(
    tmp_path: Path, name: str, version: str
) -> None:
    bundle = _fake_bundle(tmp_path / "b", name, version)
    # The manifest's own types refuse most (packager.bundle.manifest.Label, exit 8); bake's
    # stricter rule the rest (exit 2).
    with pytest.raises((UsageError, VerifyError),
                       match=r"cannot name a bake target or image tag|(name|version): must match"):
        plan_bake((bundle,))


def test_two_versions_of_one_model_are_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _fake_bundle(tmp_path / "one", "mnist", "1.0.0")
    two = _fake_bundle(tmp_path / "two", "mnist", "2.0.0")
    with pytest.raises(SystemExit) as exited:
        main(["bake", str(one), str(two), "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error")]) == 1, err
    assert "bake one version of each model" in " ".join(err)
    assert not (tmp_path / "out").exists()
