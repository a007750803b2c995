"""INT8 settings follow the target's ISA (packager.optimize.cpu): onnxruntime's quantization
guide, "Data type selection" and FAQ "When to use reduce-range and per-channel quantization?"
(onnxruntime.ai docs/performance/model-optimizations/quantization.md): reduce_range "is designed
for the U8S8 format on AVX2 and AVX512 (non-VNNI) machines to mitigate saturation issues. This is
not needed on machines supporting VNNI"; S8S8 with QDQ is the default; S8S8 QOperator is slow on
x86-64; "There is no such issue on other CPU architectures (x64 with VNNI and ARM)"."""

from __future__ import annotations

from pathlib import Path

import pytest

from packager.errors import UsageError
from packager.optimize.cpu import CpuProfile, host_cpu, int8_settings, target_cpu
from packager.optimize.plan import (
    AUTO_EMULATED_EVAL_MAX_BYTES,
    Evaluate,
    QuantizeInt8,
    SourceInfo,
    describe_step,
    plan_optimize,
)
from packager.optimize.request import EvalOnTarget, OptimizeRequest
from packager.targets import parse_target, resolve_target

SMALL = SourceInfo(Path("m.onnx"), "onnx", opset=17, size_bytes=60_000)
VNNI_HOST = CpuProfile("amd64", ("sse4_2", "avx2", "avx512bw", "avx512_vnni"), "EPYC", "host")
AVX2_HOST = CpuProfile("amd64", ("sse4_2", "avx2"), "Core i7-4770", "host")


def _target(name: str) -> CpuProfile:
    cpu = target_cpu(resolve_target(name))
    assert cpu is not None
    return cpu


def _x86_vnni_target() -> CpuProfile:
    text = (Path(__file__).parents[3] / "targets" / "industrial-pc.toml").read_text()
    import tomllib

    data = tomllib.loads(text)
    data["name"] = "vnni-box"
    data["cpu"]["isa"] = ["x86-64-v3", "avx2", "avx512-vnni"]
    cpu = target_cpu(parse_target(data, "vnni-box.toml"))
    assert cpu is not None
    return cpu


def _evaluated_request(target: str, eval_on_target: EvalOnTarget = "auto") -> OptimizeRequest:
    """int8-static with calibration and an evaluation folder, for ``target``'s CPU."""
    return OptimizeRequest(
        Path("m.onnx"),
        Path("o"),
        "int8-static",
        calibration=Path("cal"),
        eval_dir=Path("ev"),
        cpu=_target(target),
        eval_on_target=eval_on_target,
    )


def _quantize_step(cpu: CpuProfile, **kw: object) -> QuantizeInt8:
    base: dict[str, object] = {
        "model": Path("m.onnx"),
        "out": Path("o"),
        "quantize": "int8-static",
        "calibration": Path("cal"),
        "cpu": cpu,
    }
    base.update(kw)
    plan = plan_optimize(OptimizeRequest(**base), SMALL, VNNI_HOST)  # type: ignore[arg-type]
    return next(s for s in plan.steps if isinstance(s, QuantizeInt8))


def test_industrial_pc_without_vnni_gets_reduce_range() -> None:
    cpu = _target("industrial-pc")
    assert cpu.x86 and not cpu.vnni
    for fmt, activations in (("QDQ", "QInt8"), ("QOperator", "QUInt8")):
        step = _quantize_step(cpu, quant_format=fmt)
        assert step.settings is not None
        assert step.settings.reduce_range is True
        assert step.settings.activation_type == activations
        assert "reduce_range" in describe_step(step) or "7-bit" in describe_step(step)
    dynamic = _quantize_step(cpu, quantize="int8-dynamic", calibration=None)
    assert dynamic.settings is not None and dynamic.settings.reduce_range is True


def test_vnni_x86_target_uses_full_range_s8s8_qdq_and_u8s8_qoperator() -> None:
    cpu = _x86_vnni_target()
    assert cpu.vnni
    qdq = _quantize_step(cpu)
    assert qdq.settings is not None and not qdq.settings.reduce_range
    assert qdq.settings.activation_type == "QInt8"
    qop = _quantize_step(cpu, quant_format="QOperator")
    assert qop.settings is not None and qop.settings.activation_type == "QUInt8"


@pytest.mark.parametrize("name", ["rpi5", "jetson-orin-nano", "rpi4"])
def test_arm64_targets_use_s8s8_without_reduce_range(name: str) -> None:
    cpu = _target(name)
    assert cpu.arch == "arm64" and cpu.dotprod == (name != "rpi4")
    for fmt in ("QDQ", "QOperator"):
        step = _quantize_step(cpu, quant_format=fmt)
        assert step.settings is not None
        assert (step.settings.reduce_range, step.settings.activation_type) == (False, "QInt8")
        assert ("dot-product" in step.settings.reason) == cpu.dotprod


def test_accuracy_is_measured_on_emulated_non_vnni_kernels_for_a_non_vnni_target() -> None:
    req = _evaluated_request("industrial-pc")
    step = next(s for s in plan_optimize(req, SMALL, VNNI_HOST).steps if isinstance(s, Evaluate))
    assert step.emulate == "Haswell-v4" and "EPYC" in step.measured_on
    # A host without VNNI already runs the saturating kernels: measured natively, said so.
    native = next(s for s in plan_optimize(req, SMALL, AVX2_HOST).steps if isinstance(s, Evaluate))
    assert native.emulate is None and "Core i7-4770" in native.measured_on
    assert "the same int8 kernel class" in native.measured_on
    # auto stays cheap: a large model is measured on the host unless asked for.
    big = SourceInfo(Path("m.onnx"), "onnx", 17, size_bytes=AUTO_EMULATED_EVAL_MAX_BYTES + 1)
    auto = next(s for s in plan_optimize(req, big, VNNI_HOST).steps if isinstance(s, Evaluate))
    assert auto.emulate is None
    forced = OptimizeRequest(**{**req.__dict__, "eval_on_target": "on"})
    on = next(s for s in plan_optimize(forced, big, VNNI_HOST).steps if isinstance(s, Evaluate))
    assert on.emulate == "Haswell-v4"
    off = OptimizeRequest(**{**req.__dict__, "eval_on_target": "off"})
    none = next(s for s in plan_optimize(off, SMALL, VNNI_HOST).steps if isinstance(s, Evaluate))
    assert none.emulate is None


def test_arm64_eval_on_target_in_optimize_points_at_build() -> None:
    req = _evaluated_request("rpi4", eval_on_target="on")
    with pytest.raises(UsageError, match="edgepack build"):
        plan_optimize(req, SMALL, VNNI_HOST)


def test_without_a_target_the_host_cpu_chooses(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Celeron(R) N5105 @ 2.00GHz\n"
        "flags\t\t: fpu sse4_1 sse4_2 popcnt\n\nprocessor\t: 1\n"
    )
    host = host_cpu(info)
    assert host.name == "Intel(R) Celeron(R) N5105 @ 2.00GHz" and host.source == "host"
    plan = plan_optimize(OptimizeRequest(Path("m.onnx"), Path("o"), "int8-dynamic"), SMALL, host)
    step = next(s for s in plan.steps if isinstance(s, QuantizeInt8))
    assert step.settings is not None and step.settings.reduce_range == host.x86
    assert int8_settings(VNNI_HOST, static=True, quant_format="QDQ").reduce_range is False


def test_builds_measure_in_the_image_only_for_foreign_int8_with_eval(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from packager.optimize.on_target import wanted

    model = tmp_path / "m.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), model)
    rpi4, pc = resolve_target("rpi4"), resolve_target("industrial-pc")
    assert wanted(rpi4, "int8-static", tmp_path, model)
    assert wanted(rpi4, "int8-dynamic", tmp_path, model)
    assert not wanted(rpi4, "fp16", tmp_path, model)
    assert not wanted(rpi4, "int8-static", None, model)
    assert not wanted(pc, "int8-static", tmp_path, model)  # same arch: measured by optimize
    assert not wanted(resolve_target("jetson-orin-nano"), "int8-static", tmp_path, model)


def test_the_markdown_report_names_the_cpu() -> None:
    from packager.optimize.report import OptimizeReport, VariantResult, render_markdown

    report = OptimizeReport(
        source="m.onnx", source_kind="onnx", quantize="int8-static", settings=(), steps=(),
        model_file="m.int8-static.onnx", variants=(VariantResult("fp32", None, 10, 5, 1.0),),
        latency_runs=1,
        measured_on=(("host_cpu", VNNI_HOST.describe()), ("host", VNNI_HOST.to_json())),
    )  # fmt: skip
    text = render_markdown(report)
    assert "## Measured on" in text and "- host_cpu: EPYC (host; amd64, VNNI)" in text
    assert report.to_json()["measured_on"] == dict(report.measured_on)
