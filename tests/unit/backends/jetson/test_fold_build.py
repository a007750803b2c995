"""``edgepack build`` for a Jetson target ships its model with the constants folded (polygraphy,
issue 12 point 2), in FP16 and INT8: the folded file is what is inspected, keyed
(``model_sha256``), shipped in the image and recorded in the manifest, and a rebuild gives the
same bytes.

STAND-INS (named so): NGC's JetPack containers cannot be pulled here, so the image is built on a
STAND-IN arm64 base (tests/jetson_standin.py: one tiny layer) for a TEST-ONLY copy of the shipped
jetson-orin-nano target whose CPython is 3.11 (the stand-in's). Everything else is real: real
polygraphy folding, the real mnist.onnx with an exporter-style shape subgraph added
(fold_models.py), run by real onnxruntime on the real handwritten 8 of the test data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from packager.backends.base import BuildRequest
from packager.build import run_source_steps
from packager.models.fold import tool_version
from packager.optimize import optimize_for_build
from packager.plan import plan_build
from packager.targets import load_target_file
from tests.cli_runner import run_cli
from tests.jetson_standin import stand_in_base, target_copy
from tests.oci_files import model_files, model_layer_files
from tests.unit.backends.jetson.fold_models import (
    INPUT,
    SHAPE_NODES,
    foldable_mnist,
    op_counts,
    unfoldable_mnist,
)
from tests.unit.backends.jetson.int8_models import digit, sample_dir

QDQ = ("QuantizeLinear", "DequantizeLinear")
MODEL = "digits.onnx"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("jetson-fold")
    return {
        "model": foldable_mnist(work / MODEL),
        "base": stand_in_base(work / "stand-in-base.tar"),
        "target": target_copy("jetson-orin-nano", work / "targets"),
        "calibration": sample_dir(work / "calibration", seed=1, count=16),
    }


def _build(setup: dict[str, Path], out: Path, capsys: pytest.CaptureFixture[str],
           *extra: str) -> tuple[str, str]:
    """``edgepack build`` in-process: (stdout, stderr); asserts exit 0."""
    code, stdout, stderr = run_cli(
        ["build", str(setup["model"]), "--target", str(setup["target"]),
         "--base", f"oci-archive:{setup['base']}", "--version", "1.0.0", "--out", str(out),
         *extra], capsys,
    )  # fmt: skip
    assert code == 0, stderr
    return stdout, stderr


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _shipped(bundle: Path, dest: Path) -> Path:
    """The one ONNX file the image ships (read back out of image.tar with tarfile; the
    optimizer names its output ``digits.int8-static.onnx``)."""
    (name,) = [Path(p).name for p in model_layer_files(bundle / "image.tar")
               if p.endswith(".onnx")]  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    return model_files(bundle / "image.tar", [name], dest)[name]


def _run(path: Path) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {INPUT: digit()})
    return np.asarray(scores)


def _built_twice(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[Path, dict[str, Any], str]:
    """Build, then rebuild with --json: the bundle, its manifest and the first build's stderr.
    The rebuild must be byte-identical, and its JSON must carry the manifest's folding record."""
    _, stderr = _build(setup, tmp_path / "a", capsys, *extra)
    stdout, _ = _build(setup, tmp_path / "b", capsys, *extra, "--json")
    bundle = tmp_path / "a"
    assert _tree(bundle) == _tree(tmp_path / "b"), "the rebuild is byte-identical"
    manifest: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    assert json.loads(stdout)["model"]["constant_folding"] == manifest["model"]["constant_folding"]
    return bundle, manifest, stderr


def _keyed(bundle: Path, manifest: dict[str, Any], shipped: Path) -> None:
    """The shipped file is the one inspected and keyed: its sha256 is the manifest's digest and
    the engine key's model_sha256."""
    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert manifest["model"]["digest"] == f"sha256:{digest}"
    assert manifest["device"]["engine_key"]["model_sha256"] == digest


def test_an_fp16_bundle_ships_the_folded_model_with_the_same_outputs(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = op_counts(setup["model"])
    assert all(source[op] == 1 for op in SHAPE_NODES)
    bundle, manifest, stderr = _built_twice(setup, tmp_path, capsys)
    shipped = _shipped(bundle, tmp_path / "shipped")
    counts = op_counts(shipped)
    # The shape subgraph and mnist's own constant weight Reshape became initializers.
    assert not set(SHAPE_NODES) & set(counts)
    before, after = sum(source.values()), sum(counts.values())
    assert (before, after) == (16, 11)
    assert manifest["model"]["constant_folding"] == {
        "tool": "polygraphy", "version": tool_version(), "ran": True,
        "nodes_before": before, "nodes_after": after,
    }
    assert f"folding constants (polygraphy {tool_version()}): 16 -> 11 nodes" in stderr
    _keyed(bundle, manifest, shipped)
    assert manifest["device"]["engine_key"]["precision"] == "fp16"
    expected = _run(setup["model"])
    assert expected.argmax() == 8  # the real handwritten 8
    np.testing.assert_allclose(_run(shipped), expected, rtol=1e-5, atol=1e-5)


def test_an_int8_bundle_is_folded_after_quantization_and_keeps_every_qdq_node(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ("--quantize", "int8-static", "--calibration", str(setup["calibration"]))
    bundle, manifest, stderr = _built_twice(setup, tmp_path, capsys, *extra)
    shipped = _shipped(bundle, tmp_path / "shipped")
    # The same optimization outside the build (the core's OptimizeStep: by target), unfolded.
    unfolded, _ = optimize_for_build(
        setup["model"], "int8-static", setup["calibration"], None, tmp_path / "optimize",
        target=load_target_file(setup["target"]),
    )
    counts, reference = op_counts(shipped), op_counts(unfolded)
    assert {op: counts.get(op) for op in QDQ} == {op: reference[op] for op in QDQ}
    assert reference["QuantizeLinear"] > 0
    folding = manifest["model"]["constant_folding"]
    assert folding["ran"] is True
    assert (folding["nodes_before"], folding["nodes_after"]) == (
        sum(reference.values()), sum(counts.values()))
    assert (f"folding constants (polygraphy {tool_version()}): {folding['nodes_before']} -> "
            f"{folding['nodes_after']} nodes") in stderr
    _keyed(bundle, manifest, shipped)
    assert manifest["device"]["engine_key"]["precision"] == "int8"
    np.testing.assert_allclose(_run(shipped), _run(unfolded), rtol=1e-5, atol=1e-5)


def test_a_model_polygraphy_cannot_fold_goes_on_unfolded_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Folding is an optimisation the engine builder does without: the build warns, keeps the
    model as it is and records ``ran: false`` with polygraphy's error; it never claims folding
    ran. (The target's own CPython, 3.10, so the runtime check is by IR and opset only: the
    host's onnxruntime is not the image's and never loads this model.)"""
    model = unfoldable_mnist(tmp_path / MODEL)
    target = target_copy("jetson-orin-nano", tmp_path / "targets", runs_here=False,
                         base="nvcr.io/nvidia/l4t-jetpack:r36.3.0@sha256:" + "ab" * 32)
    work = tmp_path / "work"
    work.mkdir()
    outcome = run_source_steps(plan_build(BuildRequest(model=model, target=str(target))), work)
    assert outcome.path == model
    assert outcome.folding == {
        "tool": "polygraphy", "version": tool_version(), "ran": False,
        "error": f"{MODEL}: polygraphy cannot fold the model's constants (KeyError: 99)",
    }
    err = capsys.readouterr().err
    assert ("warning: digits.onnx: polygraphy cannot fold the model's constants (KeyError: 99); "
            "the model ships unfolded") in " ".join(err.split())
    assert "folding constants (" not in err
    assert not list((work).rglob(MODEL)), "nothing half-written"
