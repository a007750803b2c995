from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from packager.errors import InputError, UnsupportedError
from packager.models import INSPECTORS, inspect_model
from packager.models.onnx import inspect_onnx
from tests.model_factory import too_big_activation_bytes, too_big_model

F32 = 4  # bytes per float32 item


def _sha256(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return "sha256:" + h.hexdigest()


def _save(graph: onnx.GraphProto, path: Path, opset: int = 13) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


# --- the real models ----------------------------------------------------------------------------


def test_every_testdata_model_inspects(onnx_dir: Path) -> None:
    models = sorted(onnx_dir.glob("*.onnx"))
    assert len(models) >= 4
    for path in models:
        info = inspect_model(path)
        proto = onnx.load(path)
        assert info.format == "onnx"
        assert info.digest == _sha256(path)
        assert info.size_bytes == path.stat().st_size
        assert info.external_data == ()
        initializers = {t.name for t in proto.graph.initializer}
        assert [t.name for t in info.inputs] == [
            v.name for v in proto.graph.input if v.name not in initializers
        ]
        assert [t.name for t in info.outputs] == [v.name for v in proto.graph.output]
        assert info.opsets == {o.domain: o.version for o in proto.opset_import}
        assert info.op_histogram == dict(Counter(n.op_type for n in proto.graph.node))
        counts = list(info.op_histogram.values())
        assert counts == sorted(counts, reverse=True), path.name
        assert info.activation_bytes > 0
        assert info.ir_version == proto.ir_version
        info.to_json()  # must be serializable data, not protobuf objects


def test_mnist_tensors_and_params(onnx_dir: Path) -> None:
    path = onnx_dir / "mnist.onnx"
    info = inspect_onnx(path)
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [
        ("Input3", "float32", (1, 1, 28, 28))
    ]
    assert [(t.dtype, t.shape) for t in info.outputs] == [("float32", (1, 10))]
    arrays = [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer]
    assert info.param_count == sum(a.size for a in arrays)
    assert info.weights_bytes == sum(a.nbytes for a in arrays)
    assert info.producer is not None and "CNTK" in info.producer


def test_network_has_dynamic_batch(onnx_dir: Path) -> None:
    info = inspect_onnx(onnx_dir / "Network.onnx")
    (inp,) = info.inputs
    assert inp.shape == ("batch_size", 4) and inp.is_dynamic
    assert info.outputs[0].shape[0] == "batch_size"
    assert any("batch_size" in n and "as 1" in n for n in info.notes)


def test_resnet50_histogram_counts_conv(onnx_dir: Path) -> None:
    path = onnx_dir / "light_resnet50.onnx"
    info = inspect_onnx(path)
    convs = sum(1 for n in onnx.load(path).graph.node if n.op_type == "Conv")
    assert convs > 0
    assert info.op_histogram["Conv"] == convs
    assert info.inputs[0].shape == (1, 3, 224, 224)


# --- external data ------------------------------------------------------------------------------


def _external_model(tmp_path: Path, *, one_file: bool = True) -> tuple[Path, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["H"]),
            helper.make_node("MatMul", ["H", "W2"], ["Y"]),
        ],
        "ext",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=one_file,
        location="ext.weights" if one_file else None,
        size_threshold=0,
    )
    return path, [w1, w2]


def test_external_data_single_file(tmp_path: Path) -> None:
    path, weights = _external_model(tmp_path)
    data = tmp_path / "ext.weights"
    info = inspect_onnx(path)
    assert info.external_data == (data,)
    assert info.param_count == sum(w.size for w in weights)
    assert info.weights_bytes == sum(w.nbytes for w in weights)
    assert info.size_bytes == path.stat().st_size + data.stat().st_size
    assert info.digest == _sha256(path, data)


def test_external_data_files_sorted_in_digest(tmp_path: Path) -> None:
    path, _ = _external_model(tmp_path, one_file=False)
    files = sorted(p for p in tmp_path.iterdir() if p != path)
    assert len(files) == 2
    info = inspect_onnx(path)
    assert list(info.external_data) == files
    assert info.digest == _sha256(path, *files)


def test_missing_external_data_file(tmp_path: Path) -> None:
    path, _ = _external_model(tmp_path)
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(InputError) as err:
        inspect_onnx(path)
    assert str(path) in err.value.one_line() and "ext.weights" in err.value.one_line()


def test_truncated_external_data_file(tmp_path: Path) -> None:
    path, _ = _external_model(tmp_path)
    data = tmp_path / "ext.weights"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match=r"ext\.weights"):
        inspect_onnx(path)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "missing", "directory"])
def test_bad_model_file_is_one_line_input_error(onnx_dir: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.onnx"
    if kind == "truncated":
        path.write_bytes((onnx_dir / "mnist.onnx").read_bytes()[:1000])
    elif kind == "text":
        path.write_text("this is not a model\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(InputError) as err:
        inspect_onnx(path)
    line = err.value.one_line()
    assert "\n" not in line
    assert line.startswith(f"{path}: ")
    if kind in ("truncated", "text", "empty"):
        assert "not a valid ONNX model" in line


def test_dispatch_by_suffix(onnx_dir: Path, tmp_path: Path) -> None:
    upper = tmp_path / "MNIST.ONNX"
    upper.write_bytes((onnx_dir / "mnist.onnx").read_bytes())
    assert inspect_model(upper).inputs[0].name == "Input3"
    with pytest.raises(UnsupportedError) as err:
        inspect_model(tmp_path / "model.bin")  # .pt is read since issue 10 (build takes it)
    for suffix in INSPECTORS:
        assert suffix in err.value.one_line()


def test_importing_models_does_not_import_onnx(repo_root: Path) -> None:
    code = "import sys, packager.models; print('onnx' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


# --- activation estimate ------------------------------------------------------------------------


def _chain_nodes() -> list[onnx.NodeProto]:
    shape = numpy_helper.from_array(np.array([10, 100], dtype=np.int64))
    return [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Neg", ["X"], ["Z"]),  # a graph output: live to the end
        helper.make_node("Expand", ["X", "shape"], ["A"]),
        helper.make_node("Relu", ["A"], ["B"]),  # A's last use
        helper.make_node("Add", ["B", "X"], ["C"]),  # X's and B's last use
        helper.make_node("Relu", ["C"], ["Y"]),
    ]


def _chain_graph(nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
    return helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 100])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, None),
        ],
    )


# Live sets per node: Neg {X,Z} · Expand {X,Z,A} · Relu {X,Z,A,B} · Add {X,Z,B,C} · Relu {Z,C,Y}.
# The peak is at the first Relu (the Add ties): X and Z are [1,100], A and B [10,100].
CHAIN_PEAK = F32 * (100 + 100 + 1000 + 1000)


def test_activation_peak_of_hand_built_graph(tmp_path: Path) -> None:
    info = inspect_onnx(_save(_chain_graph(_chain_nodes()), tmp_path / "chain.onnx"))
    assert info.activation_bytes == CHAIN_PEAK
    # The Constant's [2] int64 is a weight, not an activation.
    assert info.weights_bytes == 2 * 8 and info.param_count == 2


def test_activation_peak_ignores_stored_node_order(tmp_path: Path) -> None:
    shuffled = list(reversed(_chain_nodes()))
    info = inspect_onnx(_save(_chain_graph(shuffled), tmp_path / "shuffled.onnx"))
    assert info.activation_bytes == CHAIN_PEAK


def test_too_big_factory_model(tmp_path: Path) -> None:
    path = too_big_model(tmp_path / "big.onnx")
    assert path.stat().st_size < 4096
    assert inspect_onnx(path).activation_bytes == too_big_activation_bytes()


def test_unknown_shape_counts_zero_with_note(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Mystery", ["X"], ["M"], domain="com.example"),
            helper.make_node("Relu", ["X"], ["Y"]),
        ],
        "mystery",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 50])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 50])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)],
    )
    model.ir_version = 8
    path = tmp_path / "mystery.onnx"
    onnx.save_model(model, path)
    info = inspect_onnx(path)
    # X and Y are live together at the Relu; M's size is unknown and counts 0.
    assert info.activation_bytes == F32 * (50 + 50)
    assert any("unknown shape" in n and n.endswith(": M") for n in info.notes)
    assert info.opsets == {"": 13, "com.example": 1}
    assert info.op_histogram == {"com.example.Mystery": 1, "Relu": 1}


def test_histogram_includes_subgraph_ops(tmp_path: Path) -> None:
    def branch(op: str, name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["X", "X"], [name])],
            name,
            [],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])],
        )

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["X"], ["S"], keepdims=0),
            helper.make_node("Cast", ["S"], ["cond"], to=TensorProto.BOOL),
            helper.make_node(
                "If",
                ["cond"],
                ["Y"],
                then_branch=branch("Add", "then_out"),
                else_branch=branch("Sub", "else_out"),
            ),
        ],
        "with_if",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
    )
    info = inspect_onnx(_save(graph, tmp_path / "if.onnx"))
    assert info.op_histogram == {"Add": 1, "Cast": 1, "If": 1, "ReduceSum": 1, "Sub": 1}
    # X is read inside the branches, so it is still live while the If runs: X, cond and Y.
    assert info.activation_bytes >= F32 * (4 + 4)


# --- external data locations: the model's layout, and nothing outside its folder ----------------


def _nested_model(folder: Path, location: str = "weights/ext.bin") -> Path:
    """A model saved the way users do: ``onnx.save(..., location="weights/ext.bin")``."""
    path, _ = _external_model(folder)
    model = onnx.load(str(path))  # inlines the weights
    (folder / "ext.weights").unlink()
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, path, save_as_external_data=True, location=location, size_threshold=0
    )
    return path


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor at ``location`` (onnx.save refuses to write such models)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def test_nested_external_data_keeps_its_relative_location(tmp_path: Path) -> None:
    path = _nested_model(tmp_path)
    info = inspect_onnx(path)
    assert info.external_data == (tmp_path / "weights" / "ext.bin",)
    assert info.external_data[0].relative_to(path.parent).as_posix() == "weights/ext.bin"


def test_external_data_symlink_to_a_host_file_is_refused(tmp_path: Path) -> None:
    path, _ = _external_model(tmp_path)
    (tmp_path / "ext.weights").unlink()
    secret = tmp_path.parent / f"{tmp_path.name}-secret"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 1000)
    (tmp_path / "ext.weights").symlink_to(secret)
    with pytest.raises(InputError) as err:
        inspect_onnx(path)
    line = err.value.one_line()
    assert err.value.exit_code == 3
    assert str(path) in line and "'W1'" in line and "'ext.weights'" in line
    assert "symbolic link" in line and "\n" not in line


def test_external_data_through_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = _nested_model(model_dir)
    elsewhere = tmp_path / "elsewhere"
    (model_dir / "weights").rename(elsewhere)
    (model_dir / "weights").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(InputError, match=r"'weights' is a symbolic link"):
        inspect_onnx(path)


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("../outside.bin", r"'\.\.'"),
        ("weights/../../outside.bin", r"'\.\.'"),
        ("C:\\weights\\ext.bin", "absolute"),
        ("weights\\ext.bin", "may use only letters"),
        ("ext\n.bin", "may use only letters"),
    ],
)
def test_external_data_location_outside_the_folder_is_refused(
    tmp_path: Path, location: str, why: str
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path, _ = _external_model(model_dir)
    (tmp_path / "outside.bin").write_bytes((model_dir / "ext.weights").read_bytes())
    _relocate(path, location)
    with pytest.raises(InputError, match=why) as err:
        inspect_onnx(path)
    line = err.value.one_line()
    assert str(path) in line and "tensor 'W1'" in line and repr(location) in line


def test_external_data_that_is_a_folder_or_fifo_is_refused(tmp_path: Path) -> None:
    path, _ = _external_model(tmp_path)
    (tmp_path / "ext.weights").unlink()
    os.mkfifo(tmp_path / "ext.weights")
    with pytest.raises(InputError, match="not a regular file"):
        inspect_onnx(path)
