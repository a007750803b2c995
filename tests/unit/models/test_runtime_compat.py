"""The runtime-compatibility check: the limits of the onnxruntime the image ships, checked against
generated models, re-measured with the host's onnxruntime when it is that same release, and the
conversions proven by loading their result in it."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

from packager.backends.linux.backend import runtime_requirements
from packager.errors import UnsupportedError
from packager.models import onnx_save
from packager.models.runtime_compat import (
    ONNXRUNTIME_SUPPORT,
    Loadable,
    RuntimeSupport,
    check,
    make_loadable,
    support_for,
)

PINNED = next(r.partition("==")[2] for r in runtime_requirements() if r.startswith("onnxruntime=="))
HOST = version("onnxruntime")
same_runtime = pytest.mark.skipif(
    HOST != PINNED, reason=f"host onnxruntime {HOST} is not the image's {PINNED}"
)


def relu_model(ir: int, opset: int, *, extra: tuple[tuple[str, int], ...] = ()) -> ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir  # make_model stamps onnx's own IR; the test picks it
    return model


def save(model: ModelProto, path: Path) -> Path:
    # No onnx.checker: onnx refuses IR 20 itself ("higher than the checker's"), which is the point.
    onnx.save(model, path)
    return path


def loads(model: ModelProto) -> bool:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


# --- the data ----------------------------------------------------------------------------------


def test_the_pinned_runtime_has_limits_on_record() -> None:
    support = support_for(PINNED)
    assert support.version == PINNED
    assert support.max_opset("") is not None and support.max_opset("ai.onnx") is not None
    assert "compatibility" in support.source


def test_an_unknown_runtime_version_is_refused_not_guessed() -> None:
    with pytest.raises(UnsupportedError, match=r"no compatibility data for onnxruntime 0\.0\.1"):
        support_for("0.0.1")


@same_runtime
def test_recorded_limits_are_what_the_runtime_really_loads() -> None:
    """Every limit on record is the last one the real onnxruntime accepts."""
    support = ONNXRUNTIME_SUPPORT[HOST]
    top = support.max_ir_version
    assert loads(relu_model(top, 17)) and not loads(relu_model(top + 1, 17))
    top_opset = support.max_opset("")
    assert top_opset is not None
    assert loads(relu_model(10, top_opset)) and not loads(relu_model(10, top_opset + 1))
    for domain, limit in support.max_opsets[1:]:
        assert loads(relu_model(10, 17, extra=((domain, limit),))), domain
        assert not loads(relu_model(10, 17, extra=((domain, limit + 1),))), domain


# --- check ---------------------------------------------------------------------------------------


def test_check_names_ir_and_opset_beyond_the_runtime() -> None:
    support = support_for(PINNED)
    found = check(relu_model(20, 30), support)
    assert not found.ok
    assert f"IR version 20 > {support.max_ir_version}" in found.problems
    assert f"opset 30 of ai.onnx > {support.max_opset('')}" in found.problems
    assert any("cannot convert opset 30" in b for b in found.blockers)
    assert check(relu_model(support.max_ir_version, 17), support).ok


def test_check_names_a_domain_opset_onnx_cannot_convert() -> None:
    support = support_for(PINNED)
    found = check(relu_model(10, 17, extra=(("ai.onnx.ml", 9),)), support)
    assert "opset 9 of ai.onnx.ml > 5" in found.problems
    assert any("only the ai.onnx opset" in b for b in found.blockers)


def test_check_names_operators_newer_than_the_runtime_opset() -> None:
    # RMSNormalization arrived in ai.onnx opset 23: a runtime stopping at 21 has no such op,
    # whatever opset the model is converted to.
    old = RuntimeSupport("9.9.9", 10, (("", 21),), source="test")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"])
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y], [scale]),
        opset_imports=[helper.make_opsetid("", 23)],
    )
    found = check(model, old)
    assert any("RMSNormalization" in b for b in found.blockers)


# --- make_loadable -------------------------------------------------------------------------------


def test_a_model_the_runtime_loads_is_kept_as_it_is(tmp_path: Path) -> None:
    path = save(relu_model(8, 17), tmp_path / "m.onnx")
    result = make_loadable(path, tmp_path / "work", support_for(PINNED), label="m.onnx")
    assert result.path == path and not result.converted
    assert not (tmp_path / "work").exists()


def _made_loadable(
    tmp: Path, model: ModelProto, name: str, premise: str
) -> tuple[RuntimeSupport, Loadable, ModelProto]:
    """``model``, which the pinned runtime refuses (``premise``), made loadable for it: the
    result loads in onnxruntime and still computes Relu. (support, result, converted model)"""
    path = save(model, tmp / name)
    assert not loads(onnx.load(path)), f"premise: {premise}"
    support = support_for(PINNED)
    result = make_loadable(path, tmp / "work", support, label=name)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.maximum(x, 0))
    return support, result, onnx.load(result.path)


@same_runtime
def test_ir_20_is_lowered_and_the_result_loads_in_the_shipped_runtime(tmp_path: Path) -> None:
    support, result, converted = _made_loadable(
        tmp_path, relu_model(20, 21), "m.onnx", "onnxruntime refuses IR 20"
    )
    assert result.converted and result.loaded_with == PINNED
    assert converted.ir_version == support.max_ir_version
    assert any("IR version lowered from 20" in n for n in result.notes)


def test_opset_30_is_refused_with_the_numbers(tmp_path: Path) -> None:
    path = save(relu_model(11, 30), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError) as raised:
        make_loadable(path, tmp_path / "work", support_for(PINNED), label="m.onnx")
    line = raised.value.one_line()
    assert raised.value.exit_code == 10
    assert "m.onnx" in line and "opset ai.onnx 30" in line and "IR version 11" in line
    assert f"onnxruntime {PINNED}" in line and "ai.onnx opset <= 28" in line and "IR <= 14" in line
    assert not (tmp_path / "work").exists()


def test_fields_from_a_newer_ir_are_refused_not_dropped(tmp_path: Path) -> None:
    model = relu_model(20, 21)
    # Field 100 of ModelProto does not exist in IR 14: a newer IR's feature onnx cannot read.
    data = model.SerializeToString() + bytes([0xA0, 0x06, 0x01])
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    with pytest.raises(UnsupportedError, match="fields of IR version 20"):
        make_loadable(path, tmp_path / "work", support_for(PINNED), label="m.onnx")


def test_opset_conversion_down_to_an_older_runtime(tmp_path: Path) -> None:
    """A runtime at opset 21 gets an opset-28 model converted by onnx.version_converter; the
    host's onnxruntime (which loads both) proves the converted file loads and computes the same."""
    older = RuntimeSupport(HOST, 10, (("", 21),), source="test: an older release's limits")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 28)]
    )
    model.ir_version = 11
    path = save(model, tmp_path / "m.onnx")
    result = make_loadable(path, tmp_path / "work", older, label="m.onnx")
    converted = onnx.load(result.path)
    assert result.converted and result.loaded_with == HOST
    assert [o.version for o in converted.opset_import if o.domain in ("", "ai.onnx")] == [21]
    assert converted.ir_version == 10
    feed = {"x": np.array([[-1, 2, -3], [4, -5, 6]], np.float32)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    after = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(after.run(None, feed)[0], before[0])


@same_runtime
def test_an_opset_5_model_is_converted_up_to_what_the_runtime_guarantees(tmp_path: Path) -> None:
    support, result, converted = _made_loadable(
        tmp_path, relu_model(3, 5), "old.onnx", "onnxruntime has no kernel for Relu-1"
    )
    assert [o.version for o in converted.opset_import] == [support.min_opset]
    assert any("from ai.onnx opset 5 to 7" in n for n in result.notes)


def test_a_host_with_another_runtime_checks_limits_and_says_it_did_not_load(
    tmp_path: Path,
) -> None:
    path = save(relu_model(8, 17), tmp_path / "m.onnx")
    result = make_loadable(
        path, tmp_path / "w", support_for(PINNED), label="m.onnx", host_version="0.0.0"
    )
    assert result.loaded_with is None
    assert any("not loaded with onnxruntime" in n and "0.0.0" in n for n in result.notes)


@same_runtime
def test_a_model_the_runtime_cannot_load_is_refused_naming_its_error(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.acme")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)]
    )
    path = save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedError, match=r"cannot load the model.*Frobnicate"):
        make_loadable(path, tmp_path / "w", support_for(PINNED), label="m.onnx")


@same_runtime
def test_a_large_model_converts_with_its_weights_in_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_save, "INLINE_LIMIT_BYTES", 64 * 1024)
    weight = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32)  # 128 KiB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 20
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.bin")
    result = make_loadable(path, tmp_path / "work", support_for(PINNED), label="m.onnx")
    assert onnx_save.model_files(result.path) == (result.path, result.path.with_name("m.onnx.data"))
    x = np.ones((1, 128), np.float32)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weight, rtol=1e-5)
