"""Model forms whose loading runs code (packager.models.trust): the one refusal, which forms are
refused, the plan's check, and the SavedModel inspector that never loads the model (a protobuf
parse of saved_model.pb), held against damaged and hostile files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from packager.backends.base import BuildRequest, ConvertStep
from packager.errors import ExitCode, InputError
from packager.models import code_form, model_format
from packager.models.trust import RUNS_CODE, TRUST_FLAG, check_trusted, untrusted_error
from packager.plan import plan_build


@pytest.mark.parametrize("form", sorted(RUNS_CODE))
def test_every_form_that_runs_code_is_refused_in_one_line(form: Any, tmp_path: Path) -> None:
    model = tmp_path / "model"
    with pytest.raises(InputError) as raised:
        check_trusted(model, form, trusted=False)
    error = raised.value
    line = error.one_line()
    assert error.exit_code == ExitCode.INPUT and line == untrusted_error(model, form).one_line()
    assert line.startswith(f"{model}: refused: this is ") and "\n" not in line
    assert "runs" in line and TRUST_FLAG in line and "model files are untrusted" in line
    check_trusted(model, form, trusted=True)  # the builder's word


def test_a_savedmodel_refusal_names_the_trusted_formats(tmp_path: Path) -> None:
    line = untrusted_error(tmp_path / "saved", "saved-model").one_line()
    assert "TensorFlow SavedModel" in line and "graph operations" in line
    assert ".tflite" in line and ".keras" in line and TRUST_FLAG in line


def test_which_forms_run_code(tmp_path: Path) -> None:
    """A directory the Keras route hands to TensorFlow is a SavedModel, with or without
    saved_model.pb (TensorFlow also reads saved_model.pbtxt / .cpb); a directory no TensorFlow
    loader reaches is not called one; PyTorch files by their contents; ONNX, TFLite and Keras
    files run none (None passes check_trusted)."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    assert code_form(saved) == "saved-model"
    (tmp_path / "other.keras").mkdir()
    assert code_form(tmp_path / "other.keras") == "saved-model"
    # Named .onnx: the ONNX reader refuses a directory ("is a directory, not an ONNX model
    # file"); without a suffix or saved_model.pb: model_format refuses it (exit 10).
    for name in ("dir.onnx", "plain"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "saved_model.pbtxt").write_bytes(b"")
        assert code_form(tmp_path / name) is None, name
    pt = tmp_path / "net.pt"
    pt.write_bytes(pickle.dumps([1]))
    assert code_form(pt) == "torch-pickle"
    for name in ("m.onnx", "m.tflite", "m.keras", "m.h5"):
        (tmp_path / name).write_bytes(b"x")
        assert code_form(tmp_path / name) is None, name
        check_trusted(tmp_path / name, None, trusted=False)


def _saved_dir(tmp_path: Path, data: bytes = b"\x08never parsed by planning") -> Path:
    saved = tmp_path / "saved"
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(data)
    return saved


def test_the_plan_refuses_a_savedmodel_unless_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    saved = _saved_dir(tmp_path)
    assert model_format(saved) == "keras"
    with pytest.raises(InputError) as raised:
        plan_build(BuildRequest(model=saved, target="nrf52840-dk"))
    assert raised.value.one_line().startswith(f"{saved}: refused: this is a TensorFlow SavedModel")
    plan = plan_build(BuildRequest(model=saved, target="nrf52840-dk", trust_model_code=True))
    assert plan.steps == (ConvertStep(route="keras", trust_model_code=True),)


def test_the_converter_checks_before_tensorflow_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert_to_int8_tflite refuses an untrusted SavedModel itself, whatever the plan did:
    TensorFlow is never imported for it."""
    from packager.models import keras

    def no_tensorflow() -> Any:
        raise AssertionError("TensorFlow was asked for")

    monkeypatch.setattr(keras, "_tensorflow", no_tensorflow)
    saved = _saved_dir(tmp_path)
    with pytest.raises(InputError, match="refused: this is a TensorFlow SavedModel"):
        keras.convert_to_int8_tflite(saved, tmp_path)


# --- the SavedModel inspector: a protobuf parse --------------------------------------------------


@pytest.fixture
def pb2() -> Any:
    pytest.importorskip("tensorflow")
    from tensorflow.core.protobuf import saved_model_pb2

    return saved_model_pb2


def _signature(
    meta: Any, inputs: dict[str, tuple[int, list[int]]], outputs: dict[str, str]
) -> None:
    signature = meta.signature_def["serving_default"]
    for key, (dtype, dims) in inputs.items():
        tensor = signature.inputs[key]
        tensor.name, tensor.dtype = f"{key}:0", dtype
        for d in dims:
            tensor.tensor_shape.dim.add().size = d
    for key, name in outputs.items():
        tensor = signature.outputs[key]
        tensor.name, tensor.dtype = name, 1
        tensor.tensor_shape.dim.add().size = 1


def _inspect(tmp_path: Path, saved: Any) -> Any:
    from packager.models.keras import inspect_keras

    return inspect_keras(_saved_dir(tmp_path, saved.SerializeToString()))


def test_the_graph_walk_follows_calls_once_and_counts_the_variables_it_reaches(
    pb2: Any, tmp_path: Path
) -> None:
    """A function that calls itself ends the walk; a variable off the signature's path and the
    saver's nodes are not counted; a hostile producer string is not shown."""
    saved = pb2.SavedModel()
    meta = saved.meta_graphs.add()
    meta.meta_info_def.tensorflow_version = "2.0\x1b[31m\nforged"
    _signature(meta, {"x": (1, [-1, 4])}, {"y": "call:0"})
    graph = meta.graph_def
    graph.node.add(name="x", op="Placeholder")
    var = graph.node.add(name="w", op="VarHandleOp")
    var.attr["dtype"].type = 1  # float32
    for d in (4, 3):
        var.attr["shape"].shape.dim.add().size = d
    unused = graph.node.add(name="unused", op="VarHandleOp")
    unused.attr["dtype"].type = 1
    unused.attr["shape"].shape.dim.add().size = 1000
    call = graph.node.add(name="call", op="StatefulPartitionedCall", input=["x", "w", "^ctrl"])
    call.attr["f"].func.name = "body"
    graph.node.add(name="ctrl", op="NoOp")
    graph.node.add(name="save", op="SaveV2", input=["unused"])
    body = graph.library.function.add()
    body.signature.name = "body"
    body.node_def.add(name="mm", op="MatMul")
    again = body.node_def.add(name="again", op="PartitionedCall")
    again.attr["f"].func.name = "body"
    info = _inspect(tmp_path, saved)
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("x", "float32", (None, 4))]
    assert [(t.name, t.shape) for t in info.outputs] == [("y", (1,))]
    assert info.op_histogram == {"MatMul": 1}
    assert (info.param_count, info.weights_bytes) == (12, 48)
    assert info.producer == "tensorflow unknown SavedModel"


def test_a_damaged_or_unsigned_savedmodel_is_one_input_error(pb2: Any, tmp_path: Path) -> None:
    from packager.models.keras import inspect_keras

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "saved_model.pb").write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(InputError, match="not a SavedModel protobuf"):
        inspect_keras(bad)
    unsigned = pb2.SavedModel()
    unsigned.meta_graphs.add()
    with pytest.raises(InputError, match="no serving_default signature"):
        _inspect(tmp_path, unsigned)
    unranked = pb2.SavedModel()
    _signature(unranked.meta_graphs.add(), {"x": (1, [])}, {"y": "y:0"})
    x = unranked.meta_graphs[0].signature_def["serving_default"].inputs["x"]
    x.tensor_shape.unknown_rank = True
    with pytest.raises(InputError, match="'x' is not a dense tensor of known rank"):
        inspect_keras(_saved_dir(tmp_path / "u", unranked.SerializeToString()))


def test_a_fifo_saved_model_pb_is_refused_not_waited_on(pb2: Any, tmp_path: Path) -> None:
    from packager.models.keras import inspect_keras

    saved = tmp_path / "saved"
    saved.mkdir()
    os.mkfifo(saved / "saved_model.pb")
    with pytest.raises(InputError, match="not a regular file"):
        inspect_keras(saved)


def test_a_variable_over_int64_elements_is_refused_not_wrapped(pb2: Any, tmp_path: Path) -> None:
    """A variable of shape [2**40] * 3: np.prod wrapped it around to 0 elements; no tensor has
    that many, so the file is damaged or hostile (InputError, exit 3)."""
    saved = pb2.SavedModel()
    meta = saved.meta_graphs.add()
    _signature(meta, {"x": (1, [1, 4])}, {"y": "read:0"})
    var = meta.graph_def.node.add(name="w", op="VarHandleOp")
    var.attr["dtype"].type = 1
    for _ in range(3):
        var.attr["shape"].shape.dim.add().size = 2**40
    meta.graph_def.node.add(name="read", op="ReadVariableOp", input=["w"])
    with pytest.raises(InputError, match="variable 'w' has over 2\\*\\*63 elements"):
        _inspect(tmp_path, saved)


def test_a_symlinked_or_oversized_saved_model_pb_is_refused_unread(
    pb2: Any, tmp_path: Path
) -> None:
    """The model's own saved_model.pb only: a link (here to a real, parsable SavedModel) is
    refused, not followed; a file over the 64 MiB bound is refused before protobuf parses it
    (a graph of many small nodes needs ~28x its size in memory)."""
    from packager.models.keras import inspect_keras

    honest = pb2.SavedModel()
    _signature(honest.meta_graphs.add(), {"x": (1, [1, 4])}, {"y": "y:0"})
    real = _saved_dir(tmp_path / "real", honest.SerializeToString())
    inspect_keras(real)  # the file the link points at reads fine
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "saved_model.pb").symlink_to(real / "saved_model.pb")
    with pytest.raises(InputError, match="symbolic link"):
        inspect_keras(linked)
    big = tmp_path / "big"
    big.mkdir()
    with (big / "saved_model.pb").open("wb") as handle:
        handle.truncate(64 * 1024 * 1024 + 1)  # sparse: no 64 MiB written
    with pytest.raises(InputError, match=r"67108864"):
        inspect_keras(big)
