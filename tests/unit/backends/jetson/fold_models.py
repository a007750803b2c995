"""Test models for constant folding, made from the real mnist.onnx
(../shared/testdata/onnx/mnist.onnx) with onnx.helper: no real model in the test data has the
shape-computing subgraph exporters write (``x.view(x.size(0), -1)`` in PyTorch), so one is added.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import TESTDATA

MNIST = TESTDATA / "onnx" / "mnist.onnx"
INPUT = "Input3"
OUTPUT = "Plus214_Output_0"
# mnist's flattening Reshape and the shape initializer it takes.
FLATTEN_INPUT = "Pooling160_Output_0"
FLATTEN_SHAPE = "Pooling160_Output_0_reshape0_shape"
# Nodes the shape subgraph adds (Shape, Gather, Unsqueeze, Concat), all computable at build time.
SHAPE_NODES = ("Shape", "Gather", "Unsqueeze", "Concat")


def foldable_mnist(path: Path) -> Path:
    """mnist.onnx whose flattening Reshape takes its target shape from
    Shape -> Gather -> Unsqueeze -> Concat on a constant ``[1, 256]`` tensor (as exporters write
    ``view(batch, -1)``) instead of a shape initializer: the same function, 4 more nodes, all
    foldable. Written to ``path``."""
    model = onnx.load(str(MNIST))
    graph = model.graph
    probe = np.zeros((1, 256), dtype=np.float32)  # only its shape matters
    graph.initializer.extend([
        numpy_helper.from_array(probe, "fold_probe"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "fold_batch_index"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "fold_rest"),
    ])
    # mnist is opset 7: Unsqueeze takes its axes as an attribute.
    shape_nodes = [
        helper.make_node("Shape", ["fold_probe"], ["fold_shape"], name="fold_shape"),
        helper.make_node("Gather", ["fold_shape", "fold_batch_index"], ["fold_batch"], axis=0,
                         name="fold_gather"),
        helper.make_node("Unsqueeze", ["fold_batch"], ["fold_batch_1d"], axes=[0],
                         name="fold_unsqueeze"),
        helper.make_node("Concat", ["fold_batch_1d", "fold_rest"], ["fold_target_shape"], axis=0,
                         name="fold_concat"),
    ]
    nodes = list(graph.node)
    flatten = next(i for i, n in enumerate(nodes) if n.op_type == "Reshape"
                   and list(n.input) == [FLATTEN_INPUT, FLATTEN_SHAPE])
    nodes[flatten].input[1] = "fold_target_shape"
    del graph.node[:]
    graph.node.extend([*nodes[:flatten], *shape_nodes, *nodes[flatten:]])
    kept = [t for t in graph.initializer if t.name != FLATTEN_SHAPE]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # IR version 3 (mnist's) lists every initializer among the graph's inputs too.
    inputs = [i for i in graph.input if i.name != FLATTEN_SHAPE]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims)
               for t in kept if t.name.startswith("fold_")]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def unfoldable_mnist(path: Path) -> Path:
    """mnist.onnx with a ``value_info`` whose element type (99) no ONNX release defines yet, as a
    newer exporter might annotate an intermediate tensor: onnx loads the file, and
    onnx-graphsurgeon (polygraphy's folding) fails on it with ``KeyError: 99``. Written to
    ``path``."""
    model = onnx.load(str(MNIST))
    model.graph.value_info.append(
        helper.make_tensor_value_info("ReLU32_Output_0", TensorProto.FLOAT, [1, 8, 28, 28])
    )
    model.graph.value_info[-1].type.tensor_type.elem_type = 99
    onnx.save(model, str(path))
    return path


def op_counts(path: Path) -> dict[str, int]:
    """{op_type: count} of the graph's top-level nodes."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
