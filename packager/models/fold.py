"""Constant folding of an ONNX model with polygraphy (its ONNX side, which needs no TensorRT).

``polygraphy surgeon sanitize --fold-constants`` through its Python API
(``polygraphy.backend.onnx.fold_constants``: onnx-graphsurgeon evaluates, with onnxruntime,
every subgraph whose inputs are all known at build time and replaces it by an initializer). A
device class asks for it with ``FoldConstantsStep`` (packager.backends.base); the core runs it
(packager.build.run_source_steps) before the model is inspected and digested, so the folded file
is the one inspected, keyed and shipped.

The same model gives the same bytes, in one process or several: onnx-graphsurgeon numbers the
names it makes up per graph (``Graph.name_idx``), not process-wide (tests/unit/models/test_fold.py
folds twice in one process and compares).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
from onnx import ModelProto, NodeProto

from packager.errors import InputError, UnsupportedError
from packager.models.onnx import _weights, all_nodes
from packager.models.onnx_save import save_onnx

TOOL = "polygraphy"
# Operators whose value is not a function of their inputs: onnxruntime would draw once at build
# time and folding would ship that one draw as a constant (and a rebuild other bytes); the MCU
# converter's own folding (packager.models.onnx_tflite) leaves them too. Dropout draws only when
# given a training_mode input.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})
# polygraphy's size_threshold (bytes): a tensor folding would make larger than this stays
# computed at run time (an Expand or Tile of a scalar makes gigabytes out of a few bytes;
# TensorRT folds what it wants itself). The largest tensor the test data's light_resnet50
# (weights computed by ConstantOfShape) folds to is 9 MiB.
MAX_FOLDED_TENSOR_BYTES = 16 * 1024 * 1024
# What folding may add to the model's stored tensors in all (bytes) before the model is kept
# unfolded: many tensors each under the threshold. light_resnet50's folded weights add 98 MiB.
MAX_FOLD_GROWTH_BYTES = 128 * 1024 * 1024


def tool_version() -> str:
    """The installed polygraphy's version ("0.53.6"): recorded beside what it folded."""
    return metadata.version(TOOL)


@dataclass(frozen=True)
class FoldResult:
    """:func:`fold_constants`: the graph's node counts before and after folding (top-level
    nodes, as ``len(model.graph.node)``)."""

    nodes_before: int
    nodes_after: int

    @property
    def folded(self) -> int:
        """How many nodes folding removed (0: nothing was foldable)."""
        return self.nodes_before - self.nodes_after

    def to_json(self) -> dict[str, Any]:
        """The manifest's record (``model.constant_folding``): tool, version, node counts."""
        return {
            "tool": TOOL,
            "version": tool_version(),
            "ran": True,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """polygraphy logs with print() on stdout, which must stay clean for --json; its warnings
    (e.g. no 'colored' module) are not the user's business either."""
    with contextlib.redirect_stdout(io.StringIO()):
        from polygraphy.logger import G_LOGGER  # type: ignore[import-untyped]

        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            yield


def fold_constants(source: Path, dest: Path) -> FoldResult:
    """polygraphy's ``surgeon sanitize --fold-constants`` (its Python API, through
    onnx-graphsurgeon and onnxruntime): every subgraph computable at build time becomes an
    initializer, so an engine builder (TensorRT's ONNX parser) meets fewer shape-computing
    nodes. Q/DQ pairs on weights are left as they are (onnx-graphsurgeon does not fold
    QuantizeLinear; tests check that the Q/DQ count is unchanged). ``source`` -> ``dest`` (may be
    the same path; a model above 2 GiB keeps its weights in ``dest.name + '.data'``,
    packager.models.onnx_save). Nothing is written anywhere else.

    A tensor above :data:`MAX_FOLDED_TENSOR_BYTES` is left computed.

    InputError (exit 3) for a model onnx cannot load; UnsupportedError (exit 10) naming the
    model and polygraphy's message when folding fails, and naming the model and why when it has
    a node that draws random values (:data:`RANDOM_OPS`) or when folding would add more than
    :data:`MAX_FOLD_GROWTH_BYTES` of constants (``dest`` is then not written)."""
    try:
        model = onnx.load(str(source), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError for bad files
        raise InputError(f"{source}: cannot load the ONNX model ({exc})") from exc
    before = len(model.graph.node)
    random = _draws_random(model)
    if random is not None:
        node = f"{random.op_type} node {random.name[:60]!r}" if random.name else random.op_type
        raise UnsupportedError(
            f"{source.name}: not folded: its {node} draws random values, which folding would "
            "freeze into the model"
        )
    stored = _weights(model)[1]  # before folding: polygraphy folds the model in place
    with quiet_polygraphy():
        from polygraphy.backend.onnx import (  # type: ignore[import-untyped]
            fold_constants as polygraphy_fold,
        )

        try:
            # onnx's shape inference, not onnxruntime's: the latter saves
            # sym_shape_infer_temp.onnx and a <uuid>.data into the current directory whenever
            # its inference is incomplete (onnxruntime/tools/symbolic_shape_infer.py), a write
            # outside the build's place that would also be left behind.
            folded = polygraphy_fold(
                model, num_passes=None, error_ok=False, allow_onnxruntime_shape_inference=False,
                size_threshold=MAX_FOLDED_TENSOR_BYTES,
            )
        except Exception as exc:  # polygraphy raises its PolygraphyException and others
            # The type too: some of its failures say no more than a KeyError's key ("99").
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise UnsupportedError(
                f"{source.name}: polygraphy cannot fold the model's constants ({message})"
            ) from exc
    grown = _weights(folded)[1] - stored
    if grown > MAX_FOLD_GROWTH_BYTES:
        raise UnsupportedError(
            f"{source.name}: not folded: folding would add {grown} bytes of constants (more "
            f"than {MAX_FOLD_GROWTH_BYTES})"
        )
    save_onnx(folded, dest)
    return FoldResult(before, len(folded.graph.node))


def _draws_random(model: ModelProto) -> NodeProto | None:
    """The first node of ``model`` (its graphs, subgraphs and functions) that draws random
    values (:data:`RANDOM_OPS`, a Dropout given ``training_mode``), or None."""
    for graph in (model.graph, *(onnx.GraphProto(node=f.node) for f in model.functions)):
        for node in all_nodes(graph):
            if node.domain in ("", "ai.onnx") and (
                node.op_type in RANDOM_OPS
                or (node.op_type == "Dropout" and len(node.input) > 2 and node.input[2])
            ):
                return node
    return None
