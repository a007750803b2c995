"""TensorRT-ready INT8 through edgepack's own optimizer and accuracy gate, judged by real
onnxruntime (a stand-in for TensorRT's int8 kernels, which need a GPU) and by the Q/DQ lint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from packager.backends.base import OptimizeStep
from packager.backends.jetson.int8 import plan_model
from packager.backends.jetson.qdq_lint import check_qdq, lint_qdq
from packager.errors import AccuracyError, UnsupportedError, UsageError
from packager.models.fold import fold_constants
from packager.optimize import optimize_for_build
from packager.optimize.cpu import (
    TENSORRT_EXTRA_OPTIONS,
    engine_int8_profile,
    tensorrt_int8_settings,
)
from packager.targets import resolve_target
from tests.unit.backends.jetson.int8_models import (
    INPUT,
    MNIST,
    sample_dir,
    tensorrt_int8,
    variants,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    return tensorrt_int8(tmp_path_factory.mktemp("trt-int8"))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_int8_model_passes_the_gate_and_matches_fp32_in_onnxruntime(
    built: tuple[Path, dict[str, object]],
) -> None:
    path, report = built
    evaluation = report["evaluation"]
    assert isinstance(evaluation, dict) and evaluation["passed"] is True
    assert evaluation["min_top1_agreement"] == 0.95
    # Independently of the optimizer's own figures: fresh inputs, real onnxruntime sessions.
    fp32, int8 = _session(MNIST), _session(path)
    agree, cosines = 0, []
    samples = variants(seed=7, count=32)
    for x in samples:
        (a,) = fp32.run(None, {INPUT: x})
        (b,) = int8.run(None, {INPUT: x})
        agree += int(a.argmax() == b.argmax())
        cosines.append(float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)))
    assert agree / len(samples) >= 0.9
    assert min(cosines) > 0.99


def test_the_report_records_the_tensorrt_profile(built: tuple[Path, dict[str, object]]) -> None:
    _, report = built
    settings = report["settings"]
    assert isinstance(settings, dict)
    assert settings["int8_profile"] == "tensorrt"
    assert settings["extra_options"] == dict(TENSORRT_EXTRA_OPTIONS)
    assert settings["activation_type"] == "QInt8" and settings["reduce_range"] is False
    assert "TensorRT" in str(settings["chosen_for"])
    json.dumps(report)  # the manifest takes it as JSON


def test_the_int8_model_has_tensorrts_form(built: tuple[Path, dict[str, object]]) -> None:
    path, _ = built
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain == "") >= 13
    ops = {n.op_type for n in model.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not any(op.startswith("QLinear") or "Integer" in op for op in ops)
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = onnx.numpy_helper.to_array(initializers[node.input[2]])
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        if node.op_type == "Conv":  # float bias, float weight behind a Q/DQ pair
            assert initializers[node.input[2]].data_type == onnx.TensorProto.FLOAT


def test_onnxruntimes_default_settings_are_not_tensorrt_ready(tmp_path: Path) -> None:
    """The same build with the CPU profile for the same Jetson target: the lint refuses it, so
    the TensorRT profile is what makes the difference."""
    calibration = sample_dir(tmp_path / "cal", seed=1, count=16)
    target = resolve_target("jetson-orin-nano")
    path, _ = optimize_for_build(
        MNIST, "int8-static", calibration, None, tmp_path / "w", target=target, int8_profile="cpu"
    )
    findings = lint_qdq(path, "8.6.2")
    errors = {f.rule for f in findings if f.severity == "error"}
    assert errors == {"quantized-bias", "zero-point-nonzero"}
    # int8 weights straight into DequantizeLinear: the weight form 8.x does not document.
    assert {f.rule for f in findings if f.severity == "warning"} == {"weight-form"}


def test_the_target_engine_selects_the_profile(tmp_path: Path) -> None:
    assert engine_int8_profile(resolve_target("jetson-orin-nano")) == "tensorrt"
    assert engine_int8_profile(resolve_target("rpi4")) == "cpu"
    assert engine_int8_profile(None) == "cpu"
    calibration = sample_dir(tmp_path / "cal", seed=1, count=16)
    path, report = optimize_for_build(  # as the core's OptimizeStep runs it: by target only
        MNIST, "int8-static", calibration, None, tmp_path / "w",
        target=resolve_target("jetson-xavier-nx"),
    )
    assert isinstance(report["settings"], dict)
    assert report["settings"]["int8_profile"] == "tensorrt"
    assert lint_qdq(path, "8.5.2") == ()


def test_dynamic_int8_is_refused_for_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="static Q/DQ"):
        optimize_for_build(
            MNIST, "int8-dynamic", None, None, tmp_path / "w", int8_profile="tensorrt"
        )


def test_the_gate_still_refuses_a_bad_result(
    built: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    """The same build with the gate at 100 % top-1 agreement must refuse when the measured INT8
    model flips an answer (measured on this host's kernels, not assumed)."""
    variants_ = built[1]["variants"]
    assert isinstance(variants_, list)
    if variants_[-1]["metrics"]["top1_agreement"] == 1.0:
        pytest.skip("no top-1 answer flips on this host's int8 kernels")
    calibration = sample_dir(tmp_path / "calibration", seed=1, count=16)
    evaluation = sample_dir(tmp_path / "eval", seed=2, count=24)
    with pytest.raises(AccuracyError, match="accuracy gate"):
        optimize_for_build(
            MNIST, "int8-static", calibration, evaluation, tmp_path / "w",
            int8_profile="tensorrt", min_top1_agreement=1.0,
        )
    assert not (tmp_path / "w" / "optimized").exists()  # nothing half-written


def test_every_extra_option_is_one_the_installed_quantizer_reads() -> None:
    """onnxruntime reads extra_options with dict.get: a renamed option would be ignored
    silently. Each key must appear in the installed quantizer's sources."""
    import onnxruntime.quantization as quantization

    sources = "".join(
        p.read_text(encoding="utf-8") for p in Path(quantization.__file__).parent.glob("*.py")
    )
    for name, _ in TENSORRT_EXTRA_OPTIONS:
        assert f'"{name}"' in sources, name
    assert tensorrt_int8_settings().extra_options == TENSORRT_EXTRA_OPTIONS


def test_plan_model_precisions() -> None:
    fp16 = plan_model(None, "fp16")
    assert fp16.optimize is None and fp16.precision == "fp16" and "--fp16" in fp16.reason
    assert plan_model("fp32", "fp16").precision == "fp32"
    int8 = plan_model("int8-static", "fp16", calibration=Path("cal"))
    assert int8.precision == "int8"
    assert int8.optimize == OptimizeStep("int8-static", int8.reason)
    assert plan_model(None, "int8", calibration=Path("c")).precision == "int8"
    with pytest.raises(UsageError, match="--calibration"):
        plan_model(None, "int8")
    with pytest.raises(UnsupportedError, match="static Q/DQ"):
        plan_model("int8-dynamic", "fp16")


def test_the_builds_fold_keeps_the_qdq_and_the_builds_lint_passes(
    built: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    """What ``edgepack build`` does to the optimizer's INT8 model, called as the build calls it:
    the FoldConstantsStep's polygraphy fold (packager.build -> packager.models.fold), then the
    plan's Q/DQ lint for the target's TensorRT (JetsonBackend.plan -> check_qdq). The whole
    build is tests/unit/backends/jetson/test_fold_build.py."""
    path, _ = built
    folded = tmp_path / "model.onnx"
    fold_constants(path, folded)
    assert check_qdq(folded, "8.6.2", sm=87) == ()

    def count(p: Path) -> int:
        nodes = onnx.load(str(p)).graph.node
        return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes)

    assert count(folded) == count(path) > 0  # folding left every Q/DQ pair in place
    x = variants(seed=3, count=1)[0]
    np.testing.assert_allclose(
        _session(folded).run(None, {INPUT: x})[0], _session(path).run(None, {INPUT: x})[0]
    )
