"""Constant folding with the real polygraphy (onnx-graphsurgeon, onnxruntime) on real models:
light_squeezenet (weights computed by ConstantOfShape) and mnist with an exporter-style shape
subgraph added (tests/unit/backends/jetson/fold_models.py), run by real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from packager.errors import InputError, UnsupportedError
from packager.models.fold import FoldResult, fold_constants, tool_version
from tests.conftest import TESTDATA
from tests.unit.backends.jetson.fold_models import (
    INPUT,
    OUTPUT,
    SHAPE_NODES,
    foldable_mnist,
    op_counts,
    unfoldable_mnist,
)
from tests.unit.backends.jetson.int8_models import digit

SQUEEZENET = TESTDATA / "onnx" / "light_squeezenet.onnx"


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_fold_constants_materializes_constant_subgraphs(tmp_path: Path) -> None:
    dest = tmp_path / "folded.onnx"
    fold = fold_constants(SQUEEZENET, dest)
    ops = {n.op_type for n in onnx.load(str(dest)).graph.node}
    assert fold.folded > 0 and "ConstantOfShape" not in ops
    # The input the test data's README gives for the light models.
    x = (np.arange(3 * 224 * 224, dtype=np.float32) / (3 * 224 * 224)).reshape(1, 3, 224, 224)
    name = _session(SQUEEZENET).get_inputs()[0].name
    np.testing.assert_allclose(
        _session(dest).run(None, {name: x})[0], _session(SQUEEZENET).run(None, {name: x})[0],
        rtol=1e-5, atol=1e-6,
    )


def test_a_shape_subgraph_on_a_constant_folds_away_with_the_same_outputs(tmp_path: Path) -> None:
    source = foldable_mnist(tmp_path / "digits.onnx")
    dest = tmp_path / "out" / "digits.onnx"
    dest.parent.mkdir()
    fold = fold_constants(source, dest)
    counts = op_counts(dest)
    assert fold == FoldResult(16, 11) and fold.folded == 5 == sum(op_counts(source).values()) - 11
    assert not set(SHAPE_NODES) & set(counts)
    assert counts["Reshape"] == 1  # mnist's constant weight Reshape folded too
    (expected,) = _session(source).run([OUTPUT], {INPUT: digit()})
    (found,) = _session(dest).run([OUTPUT], {INPUT: digit()})
    assert expected.argmax() == 8
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6)
    assert fold.to_json() == {"tool": "polygraphy", "version": tool_version(), "ran": True,
                              "nodes_before": 16, "nodes_after": 11}


def test_the_same_model_folds_to_the_same_bytes_in_one_process(tmp_path: Path) -> None:
    """onnx-graphsurgeon numbers the names it makes up per graph: a second fold in the same
    process (a second build, a test session) must not get other names."""
    source = foldable_mnist(tmp_path / "digits.onnx")
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    fold_constants(source, first)
    fold_constants(SQUEEZENET, tmp_path / "other.onnx")
    fold_constants(source, second)
    assert first.read_bytes() == second.read_bytes()


def test_bad_inputs_are_input_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(InputError, match=r"broken\.onnx"):
        fold_constants(broken, tmp_path / "out.onnx")


def test_a_model_polygraphy_cannot_fold_is_one_unsupported_line(tmp_path: Path) -> None:
    model = unfoldable_mnist(tmp_path / "digits.onnx")
    with pytest.raises(UnsupportedError) as err:
        fold_constants(model, tmp_path / "out.onnx")
    assert err.value.one_line() == (
        "digits.onnx: polygraphy cannot fold the model's constants (KeyError: 99)"
    )
    assert not (tmp_path / "out.onnx").exists()


def test_folding_writes_nothing_outside_its_destination(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """onnxruntime's symbolic shape inference (polygraphy's default) saves
    sym_shape_infer_temp.onnx and two <uuid>.data files into the current directory when its
    inference is incomplete, as it is on this squeezenet: a build used to leave them in the
    user's working directory. And polygraphy's print() logging stays off stdout (--json)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fold_constants(SQUEEZENET, tmp_path / "folded.onnx")
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert (tmp_path / "folded.onnx").is_file()
    assert capsys.readouterr().out == ""


def _expanding(path: Path, side: int, copies: int = 1) -> Path:
    """``copies`` Expand nodes each blowing a constant 1.0 up to [side, side] float32, added to
    the input: a model of a few hundred bytes whose folded form holds copies x side^2 x 4
    bytes of ones."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, total = [], "x"
    for n in range(copies):
        nodes += [helper.make_node("Expand", ["one", "shape"], [f"big{n}"]),
                  helper.make_node("Add", [total, f"big{n}"], [f"sum{n}"])]
        total = f"sum{n}"
    nodes.append(helper.make_node("ReduceSum", [total], ["z"], keepdims=0))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                     numpy_helper.from_array(np.array([side, side], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_tensor_folding_would_blow_up_stays_computed(tmp_path: Path) -> None:
    """Before: a 200-byte model whose Expand makes a [2100, 2100] float32 (17 MiB) shipped as a
    17 MiB model (a [32768, 32768] one as 4 GiB). Now a tensor above MAX_FOLDED_TENSOR_BYTES is
    left to the run time, and the model computes the same."""
    from packager.models import fold as fold_module

    side = 2100
    assert side * side * 4 > fold_module.MAX_FOLDED_TENSOR_BYTES
    source = _expanding(tmp_path / "expand.onnx", side)
    dest = tmp_path / "folded.onnx"
    fold_constants(source, dest)
    assert dest.stat().st_size < 4096
    x = np.full((1, side), 0.5, np.float32)
    np.testing.assert_allclose(_session(dest).run(None, {"x": x})[0], 1.5 * side * side)


def test_folding_that_would_add_too_many_constants_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many tensors each under the threshold: 3 x 1 MiB folded against a 2 MiB allowance."""
    from packager.models import fold as fold_module

    monkeypatch.setattr(fold_module, "MAX_FOLD_GROWTH_BYTES", 2 * 1024 * 1024)
    source = _expanding(tmp_path / "expand.onnx", 512, copies=3)
    with pytest.raises(UnsupportedError) as err:
        fold_constants(source, tmp_path / "out.onnx")
    added = 3 * 512 * 512 * 4 - 4 - 16  # the ones, less the scalar and shape they replace
    assert err.value.one_line() == (
        f"expand.onnx: not folded: folding would add {added} bytes of constants "
        f"(more than {2 * 1024 * 1024})")
    assert not (tmp_path / "out.onnx").exists()
    monkeypatch.setattr(fold_module, "MAX_FOLD_GROWTH_BYTES", 4 * 1024 * 1024)
    assert fold_constants(source, tmp_path / "out.onnx").folded == 3


@pytest.mark.parametrize("op", ["RandomUniform", "RandomNormal"])
def test_a_random_draw_is_never_frozen_into_the_model(tmp_path: Path, op: str) -> None:
    """Before: onnxruntime drew once at build time and the draw shipped as a constant: the
    model's noise was the same on every run and every rebuild gave other bytes."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node(op, [], ["noise"], shape=[1, 4], name="noise"),
             helper.make_node("Add", ["x", "noise"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    source = tmp_path / "noisy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    with pytest.raises(UnsupportedError) as err:
        fold_constants(source, tmp_path / "out.onnx")
    assert err.value.one_line() == (
        f"noisy.onnx: not folded: its {op} node 'noise' draws random values, which folding "
        "would freeze into the model")
    assert not (tmp_path / "out.onnx").exists()
