from __future__ import annotations

import pytest
from click.testing import CliRunner

from packager.commands.optimize import optimize_cmd, parse_inputs, parse_prune, parse_resize
from packager.errors import UsageError
from packager.models.torch_export import InputSpec
from packager.optimize.request import PruneOptions


def test_input_shapes_and_dynamic_dims_parse() -> None:
    specs = parse_inputs(("x=1,3,8,8", "ids=1,16:int64"), ("x:0", "ids:1", "ids:1"))
    assert specs == (
        InputSpec("x", (1, 3, 8, 8), "float32", (0,)),
        InputSpec("ids", (1, 16), "int64", (1,)),
    )


@pytest.mark.parametrize(
    ("shapes", "dynamic"), [(("x",), ()), (("x=1,a",), ()), (("x=1,0",), ()), (("x=1",), ("y:0",))]
)
def test_bad_input_shapes_are_usage_errors(
    shapes: tuple[str, ...], dynamic: tuple[str, ...]
) -> None:
    with pytest.raises(UsageError):
        parse_inputs(shapes, dynamic)


def test_prune_and_resize_parse() -> None:
    assert parse_prune(("l1=0.5", "l2-structured=0.25")) == PruneOptions(0.5, 0.25)
    assert parse_resize("224x160") == (224, 160)
    for bad in (("l3=0.5",), ("l1=1.5",), ("l1=x",)):
        with pytest.raises(UsageError):
            parse_prune(bad)
    with pytest.raises(UsageError):
        parse_resize("224")


def test_quantize_and_out_are_required() -> None:
    result = CliRunner().invoke(optimize_cmd, ["m.onnx", "--out", "o"])
    assert result.exit_code == 2 and "--quantize" in result.output
