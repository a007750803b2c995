"""``edgepack inspect MODEL``: what the model needs (tensors, operators, weights, activations)."""

from __future__ import annotations

from pathlib import Path

import click

from packager.console import Table, console
from packager.fit import human_bytes
from packager.models import inspect_model
from packager.models.info import ModelInfo, TensorInfo

# The summary lists this many operator types; --json has them all.
TOP_OPERATORS = 10


@click.command("inspect")
# A plain path, not click.Path(exists=True): a missing model is our InputError (exit 3).
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as a JSON document.")
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Show a model's inputs, outputs, operators, weights and activation estimate."""
    console.configure(quiet=as_json)
    info = inspect_model(model)
    if as_json:
        console.json(info.to_json())
        return
    _render(info)


def _shape(tensor: TensorInfo) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in tensor.shape) + "]"


def _render(info: ModelInfo) -> None:
    summary = Table(title=f"{info.path.name} ({info.format})", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    summary.add_row("digest", info.digest)
    summary.add_row("size", human_bytes(info.size_bytes))
    summary.add_row("producer", info.producer or "-")
    summary.add_row("ir version", str(info.ir_version) if info.ir_version is not None else "-")
    summary.add_row(
        "opsets", ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(info.opsets.items()))
    )
    summary.add_row("parameters", f"{info.param_count:,}")
    summary.add_row("weights", human_bytes(info.weights_bytes))
    summary.add_row("activations (peak est.)", human_bytes(info.activation_bytes))
    external = ", ".join(str(p) for p in info.external_data)
    summary.add_row("external data", external or "-")
    console.table(summary)

    tensors = Table(title="inputs and outputs")
    for column in ("", "name", "dtype", "shape"):
        tensors.add_column(column)
    for role, group in (("input", info.inputs), ("output", info.outputs)):
        for t in group:
            tensors.add_row(role, t.name, t.dtype, _shape(t))
    console.table(tensors)

    ops = Table(title=f"operators ({sum(info.op_histogram.values())} nodes)")
    ops.add_column("operator")
    ops.add_column("count", justify="right")
    for op, count in list(info.op_histogram.items())[:TOP_OPERATORS]:
        ops.add_row(op, str(count))
    if len(info.op_histogram) > TOP_OPERATORS:
        ops.add_row(f"... {len(info.op_histogram) - TOP_OPERATORS} more types", "")
    console.table(ops)

    for note in info.notes:
        console.result(f"note: {note}")
