"""Small ONNX models built in tests, for cases no real model covers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Expanded side of the "too big" model: a [SIDE, SIDE] float32 tensor is 1 GiB.
TOO_BIG_SIDE = 16384


def too_big_model(path: Path, side: int = TOO_BIG_SIDE) -> Path:
    """Write a tiny file whose activations need ~2 GiB: far over rpi-zero-2w's 300 MB.

    X [1,1] float32 -> E = Expand(X, [side, side]) -> Y = Add(E, X): X, E and Y are live together
    while the Add runs.
    """
    shape = numpy_helper.from_array(np.array([side, side], dtype=np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["X", "shape"], ["E"]),
            helper.make_node("Add", ["E", "X"], ["Y"]),
        ],
        "too_big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [side, side])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def float_model(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    outputs: dict[str, list[int]],
    weights: dict[str, np.ndarray],
    *,
    name: str = "graph",
    opset: int = 17,
) -> Path:
    """Save a checked IR-8 model of ``nodes`` whose inputs and outputs are float tensors
    ({name: shape}) and whose initializers are ``weights`` ({name: array})."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(array, n) for n, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def too_big_activation_bytes(side: int = TOO_BIG_SIDE) -> int:
    """The peak the estimate must find for :func:`too_big_model`: X, E and Y at 4 bytes an item."""
    return (1 + 2 * side * side) * 4


def sample_dir(directory: Path, **arrays: np.ndarray) -> Path:
    """A calibration or evaluation folder as the CLI takes it: each array as ``NAME.npy``."""
    directory.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)
    return directory
