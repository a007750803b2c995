"""``edgepack inspect`` of a .pt2 archive reads its JSON, a file from an untrusted source: every
size and dtype there is an int64 >= 0 (torch/_export/serde/schema.py), and anything else (a
float, Infinity, a negative, a bool, a string, a shape over int64 elements) is one InputError
(exit 3), never an internal error, a negative parameter count or minutes of big-int arithmetic."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from packager.errors import ExitCode, InputError
from packager.models.torch_info import inspect_torch


def _size(value: Any) -> dict[str, Any]:
    return {"as_int": value}


def _meta(sizes: list[Any], dtype: Any = 7) -> dict[str, Any]:
    return {"dtype": dtype, "sizes": [_size(s) for s in sizes]}


def _program(tmp_path: Path, x: dict[str, Any], weight: dict[str, Any]) -> Path:
    """A .pt2 archive as torch.export.save lays it out (the members inspect reads): one input
    ``x`` with tensor meta ``x``, one relu, one weight with tensor meta ``weight``."""
    program = {
        "graph_module": {
            "graph": {
                "nodes": [{"target": "torch.ops.aten.relu.default"}],
                "tensor_values": {"x": x, "relu": _meta([1, 4])},
            },
            "signature": {
                "input_specs": [{"user_input": {"arg": {"as_tensor": {"name": "x"}}}}],
                "output_specs": [{"user_output": {"arg": {"as_tensor": {"name": "relu"}}}}],
            },
        }
    }
    weights = {"config": {"w": {"tensor_meta": weight}}}
    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        # allow_nan: the JSON module writes Infinity/NaN as the literals a hostile file holds
        archive.writestr("m/models/model.json", json.dumps(program, allow_nan=True))
        archive.writestr("m/data/weights/model_weights_config.json", json.dumps(weights))
    return path


def test_an_honest_program_reads_its_tensors_and_weights(tmp_path: Path) -> None:
    info = inspect_torch(_program(tmp_path, _meta([1, 4]), _meta([3, 4])))
    assert [(t.name, t.dtype, t.shape) for t in info.inputs] == [("x", "float32", (1, 4))]
    assert (info.param_count, info.weights_bytes) == (12, 48)
    assert info.op_histogram == {"relu.default": 1}


@pytest.mark.parametrize(
    "value",
    [float("inf"), float("nan"), 1e308, 1.0, -3, True, "4", None, 2**63],
    ids=["inf", "nan", "1e308", "float", "negative", "bool", "string", "null", "over-int64"],
)
@pytest.mark.parametrize("where", ["input size", "weight size", "input dtype", "weight dtype"])
def test_a_size_or_dtype_that_is_not_an_int64_is_one_input_error(
    value: Any, where: str, tmp_path: Path
) -> None:
    x, weight = _meta([1, 4]), _meta([3, 4])
    target = x if where.startswith("input") else weight
    if where.endswith("size"):
        target["sizes"][0] = _size(value)
    else:
        target["dtype"] = value
    model = _program(tmp_path, x, weight)
    with pytest.raises(InputError) as raised:
        inspect_torch(model)
    line = raised.value.one_line()
    assert raised.value.exit_code == ExitCode.INPUT and "\n" not in line
    assert line.startswith(f"{model}: not a readable torch.export program (ValueError: a ")


@pytest.mark.parametrize("sizes", [[2**62, 2**62], [2**40] * 3, [2**62] * 2000])
def test_a_weight_over_int64_elements_is_refused_not_multiplied_out(
    sizes: list[int], tmp_path: Path
) -> None:
    """Each size fits int64, their product does not: no tensor has that many elements. (The
    old inspector multiplied a million such sizes for minutes, then failed to print the sum.)"""
    model = _program(tmp_path, _meta([1, 4]), _meta(sizes))
    with pytest.raises(InputError, match="over 2\\*\\*63 elements"):
        inspect_torch(model)


def test_an_empty_or_symbolic_weight_counts_no_elements(tmp_path: Path) -> None:
    weight = _meta([2**62, 2**62, 0])
    info = inspect_torch(_program(tmp_path, _meta([1, 4]), weight))
    assert (info.param_count, info.weights_bytes) == (0, 0)
    symbolic = {"dtype": 7, "sizes": [{"as_expr": {"expr_str": "s0"}}, _size(4)]}
    info = inspect_torch(_program(tmp_path, symbolic, _meta([3])))
    assert info.inputs[0].shape == ("s0", 4) and info.param_count == 3


def test_two_program_members_are_refused_not_guessed(tmp_path: Path) -> None:
    """torch.export.save writes one models/model.json; with two (or one name twice) inspect
    could show a decoy instead of the program torch would load, so it shows none."""
    path = _program(tmp_path, _meta([1, 4]), _meta([3, 4]))
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr("m/models/model.json", json.dumps({"graph_module": {}}))
    with pytest.raises(InputError, match=r"2 members end in /models/model\.json"):
        inspect_torch(path)
