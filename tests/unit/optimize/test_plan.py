from __future__ import annotations

from pathlib import Path

import pytest

from packager.errors import InputError, UnsupportedError, UsageError
from packager.models.torch_export import InputSpec
from packager.optimize.plan import (
    ConvertOpset,
    Evaluate,
    ExportTorch,
    LoadTorch,
    SourceInfo,
    plan_optimize,
)
from packager.optimize.request import OptimizeRequest, PruneOptions

ONNX7 = SourceInfo(Path("m.onnx"), "onnx", opset=7)
ONNX17 = SourceInfo(Path("m.onnx"), "onnx", opset=17)
TORCH = SourceInfo(Path("net.pt"), "torch-pickle")
X = (InputSpec("x", (1, 3, 8, 8)),)


def request(**kw: object) -> OptimizeRequest:
    base: dict[str, object] = {"model": Path("m.onnx"), "out": Path("out"), "quantize": "fp16"}
    base.update(kw)
    return OptimizeRequest(**base)  # type: ignore[arg-type]


def kinds(plan: object) -> list[str]:
    """The plan's step classes by name, in order."""
    return [type(step).__name__ for step in plan.steps]  # type: ignore[attr-defined]


def test_old_opset_is_converted_to_13_for_per_channel_qdq() -> None:
    plan = plan_optimize(request(quantize="int8-static", calibration=Path("cal")), ONNX7)
    assert kinds(plan) == [
        "LoadOnnx", "ConvertOpset", "Preprocess", "QuantizeInt8", "Evaluate", "Report",
    ]
    convert = plan.steps[1]
    assert isinstance(convert, ConvertOpset) and (convert.from_opset, convert.to_opset) == (7, 13)
    # Without --eval the calibration set is the only data, and the plan says it is not held out.
    evaluate = plan.steps[4]
    assert isinstance(evaluate, Evaluate) and not evaluate.held_out
    assert plan.model_name == "m.int8-static.onnx" and plan.baseline_name is None


@pytest.mark.parametrize(
    ("kw", "target"),
    [
        ({"quantize": "int8-static", "calibration": Path("c"), "per_channel": False}, 11),
        ({"quantize": "int8-static", "calibration": Path("c"), "quant_format": "QOperator"}, 11),
        ({"quantize": "int8-dynamic"}, 11),
    ],
)
def test_opset_target_follows_the_format(kw: dict[str, object], target: int) -> None:
    plan = plan_optimize(request(**kw), ONNX7)
    convert = [s for s in plan.steps if isinstance(s, ConvertOpset)]
    assert [c.to_opset for c in convert] == [target]


def test_new_opsets_and_fp16_need_no_conversion() -> None:
    assert "ConvertOpset" not in kinds(plan_optimize(request(quantize="int8-dynamic"), ONNX17))
    assert kinds(plan_optimize(request(), ONNX7)) == ["LoadOnnx", "ConvertFp16", "Report"]


def test_pytorch_with_pruning_exports_baseline_then_pruned() -> None:
    plan = plan_optimize(
        request(
            model=Path("net.pt"),
            quantize="int8-dynamic",
            inputs=X,
            prune=PruneOptions(l1_unstructured=0.5),
            eval_dir=Path("ev"),
            trust_model_code=True,
        ),
        TORCH,
    )
    assert kinds(plan) == [
        "LoadTorch", "ExportTorch", "Prune", "ExportTorch", "Preprocess", "QuantizeInt8",
        "Evaluate", "Report",
    ]
    roles = [s.role for s in plan.steps if isinstance(s, ExportTorch)]
    assert roles == ["baseline", "pruned"]
    assert plan.baseline_name == "net.fp32.onnx"
    assert all(isinstance(d, str) and d for d in plan.describe())


@pytest.mark.parametrize(
    "source",
    [TORCH, SourceInfo(Path("s.pt"), "torchscript"), SourceInfo(Path("p.pt2"), "exported-program")],
)
def test_a_pytorch_source_is_loaded_only_on_the_builders_word(source: SourceInfo) -> None:
    """Loading any PyTorch file runs code from it (torch 2.13): refused, exit 3, one line
    naming the file and both fixes; with trust_model_code the LoadTorch step carries it."""
    with pytest.raises(InputError) as raised:
        plan_optimize(request(model=source.path, quantize="int8-dynamic", inputs=X), source)
    line = raised.value.one_line()
    assert line.startswith(f"{source.path}: refused") and "runs code" in line
    assert "--trust-model-code" in line and "torch.onnx.export" in line
    plan = plan_optimize(
        request(model=source.path, quantize="int8-dynamic", inputs=X, trust_model_code=True),
        source,
    )
    assert plan.steps[0] == LoadTorch(source.path, source.kind, True)  # type: ignore[arg-type]
    assert "--trust-model-code" in plan.describe()[0]


@pytest.mark.parametrize(
    ("kw", "source", "error", "text"),
    [
        ({"quantize": "int8-static"}, ONNX17, UsageError, "needs --calibration"),
        ({"calibration": Path("c")}, ONNX17, UsageError, "only used by --quantize int8-static"),
        ({"min_top1_agreement": 0.9}, ONNX17, UsageError, "need --eval"),
        ({"eval_dir": Path("e"), "max_accuracy_drop": 2.0}, ONNX17, UsageError, "fraction"),
        ({"prune": PruneOptions(l1_unstructured=0.3)}, ONNX17, UnsupportedError, "PyTorch model"),
        ({"inputs": X}, ONNX17, UsageError, "for PyTorch models"),
        ({"model": Path("net.pt")}, TORCH, UsageError, "--input-shape"),
        (
            {"prune": PruneOptions(l2_structured=0.3), "inputs": X},
            SourceInfo(Path("s.pt"), "torchscript"),
            UnsupportedError,
            "needs the nn.Module",
        ),
        (
            {},
            SourceInfo(Path("c.onnx"), "onnx", 17, ("com.acme::Frobnicate",)),
            UnsupportedError,
            "com.acme::Frobnicate",
        ),
    ],
)
def test_invalid_requests_are_refused_before_any_work(
    kw: dict[str, object], source: SourceInfo, error: type[Exception], text: str
) -> None:
    with pytest.raises(error) as raised:
        plan_optimize(request(**kw), source)
    assert text in raised.value.one_line()  # type: ignore[attr-defined]
    assert not isinstance(raised.value, InputError) or error is InputError
