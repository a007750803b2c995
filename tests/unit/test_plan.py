"""``plan_build``: a build decided once, before anything is written or run.

Each test plans a real build (real target files, real models) with every subprocess call and
every write outside pytest's tmp_path impossible to miss: the plan is checked field by field and
the working directory must stay empty.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import packager.build
import packager.plan
from packager.backends.base import (
    BuildRequest,
    ConvertStep,
    FoldConstantsStep,
    OptimizeStep,
    RuntimeCompatStep,
    SourceModel,
)
from packager.backends.linux.backend import onnxruntime_pin
from packager.errors import InputError, UnsupportedError, UsageError
from packager.plan import BuildPlan, plan_build
from packager.targets import resolve_target

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def quiet_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory (the default --out goes below it) in which no process may be
    started: plan_build runs no tool."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"plan_build started a process: {args[:1]}")

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    yield work
    assert list(work.iterdir()) == [], "plan_build wrote files"


def _plan(model: Path, target: str, **kwargs: Any) -> BuildPlan:
    return plan_build(BuildRequest(model=model, target=target, **kwargs))


def test_rpi4_plan(quiet_cwd: Path, onnx_dir: Path) -> None:
    model = onnx_dir / "mnist.onnx"
    plan = _plan(model, "rpi4")
    assert plan.target == resolve_target("rpi4")
    assert plan.backend.device_class == plan.target.device_class == "linux-container"
    assert (plan.name, plan.version) == ("mnist", "0.1.0")
    assert (plan.request.name, plan.request.version) == ("mnist", "0.1.0")
    assert plan.out == quiet_cwd / "out" / "mnist-0.1.0"
    assert plan.source == SourceModel(path=model, format="onnx")
    # fp32 (the target's preference): only the image's onnxruntime must load the model.
    assert plan.steps == (RuntimeCompatStep(engine="onnxruntime", version=onnxruntime_pin()),)


def test_industrial_pc_plan_with_quantize(quiet_cwd: Path, onnx_dir: Path) -> None:
    out = quiet_cwd.parent / "bundle"
    plan = _plan(onnx_dir / "mnist.onnx", "industrial-pc", name="digits", version="2.0",
                 out=out, quantize="int8-dynamic", cache_dir=quiet_cwd.parent / "cache")
    compat = RuntimeCompatStep(engine="onnxruntime", version=onnxruntime_pin())
    assert plan.backend.device_class == "linux-container"
    assert (plan.name, plan.version, plan.out) == ("digits", "2.0", out)
    assert plan.cache_dir == quiet_cwd.parent / "cache"
    # Checked before and after the optimizer: its output must load too.
    assert plan.steps == (compat, OptimizeStep("int8-dynamic"), compat)
    assert _plan(onnx_dir / "mnist.onnx", "industrial-pc", quantize="fp32").steps == (compat,)


def test_a_targets_preferred_precision_is_a_planned_step(
    quiet_cwd: Path, onnx_dir: Path
) -> None:
    target = quiet_cwd.parent / "fp16-pc.toml"
    text = (REPO / "targets" / "industrial-pc.toml").read_text()
    target.write_text(text.replace("[runtime]\n", '[runtime]\npreferred_precision = "fp16"\n'))
    plan = _plan(onnx_dir / "mnist.onnx", str(target))
    optimize = plan.steps[1]
    assert isinstance(optimize, OptimizeStep) and optimize.quantize == "fp16"
    assert "prefers fp16" in optimize.reason


@pytest.mark.parametrize("quantize", [None, "fp32", "int8-static"])
def test_jetson_plan_folds_constants_after_optimizing_and_before_the_last_runtime_check(
    quiet_cwd: Path, onnx_dir: Path, quantize: str | None
) -> None:
    """The folded model is what is inspected, linted, keyed and shipped (issue 12): fold after
    the optimizer, then check once more that the image's onnxruntime loads the result."""
    calibration = quiet_cwd.parent / "calibration"
    calibration.mkdir(exist_ok=True)
    plan = _plan(onnx_dir / "mnist.onnx", "jetson-orin-nano", quantize=quantize,
                 calibration=calibration if quantize == "int8-static" else None,
                 base=f"oci-archive:{quiet_cwd.parent / 'base.tar'}")
    assert plan.backend.device_class == "jetson"
    compat = plan.steps[0]
    assert isinstance(compat, RuntimeCompatStep) and compat.engine == "onnxruntime"
    if quantize == "int8-static":
        optimize = plan.steps[1]
        assert isinstance(optimize, OptimizeStep) and optimize.quantize == "int8-static"
        assert plan.steps == (compat, optimize, FoldConstantsStep(), compat)
    else:  # FP16 (the target's preference) and FP32: no optimizer, trtexec sets the precision
        assert plan.steps == (compat, FoldConstantsStep(), compat)


@pytest.mark.parametrize(
    ("model", "steps"),
    [
        ("onnx/mnist.onnx", (ConvertStep(route="onnx"),)),
        ("tflm/hello_world_int8.tflite", ()),
    ],
)
def test_mcu_plan(
    quiet_cwd: Path, testdata: Path, model: str, steps: tuple[ConvertStep, ...]
) -> None:
    plan = _plan(testdata / model, "nrf52840-dk")
    assert plan.backend.device_class == plan.target.device_class == "mcu"
    assert plan.steps == steps
    # One name for every class: the core's, the directory's and the bundle's.
    assert plan.out.name == f"{plan.name}-0.1.0" and plan.request.name == plan.name


def test_a_pytorch_model_is_planned_only_on_the_builders_word(
    quiet_cwd: Path, tmp_path: Path
) -> None:
    """Loading any PyTorch file runs code from it: without --trust-model-code the plan refuses
    it (exit 3, one line, nothing read past the zip directory); with it the converting step
    carries the builder's word, whatever the backend built the step with."""
    model = tmp_path / "net.pt"
    model.write_bytes(b"\x80\x04not loaded")  # never unpickled: planning reads no model
    with pytest.raises(InputError) as raised:
        _plan(model, "nrf52840-dk")
    line = raised.value.one_line()
    assert line.startswith(f"{model}: refused: this is a torch.save pickle")
    assert "--trust-model-code" in line
    plan = _plan(model, "nrf52840-dk", trust_model_code=True)
    assert plan.steps == (ConvertStep(route="pytorch", trust_model_code=True),)


def test_the_target_and_backend_are_resolved_once(
    quiet_cwd: Path, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"resolve_target": 0, "get_backend": 0}
    for name in calls:
        real = getattr(packager.plan, name)

        def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(packager.plan, name, counted)
    _plan(onnx_dir / "mnist.onnx", "rpi4")
    assert calls == {"resolve_target": 1, "get_backend": 1}
    # execute() reads them from the plan: it has no way to resolve them again.
    assert not hasattr(packager.build, "resolve_target")
    assert not hasattr(packager.build, "get_backend")


def test_refusals_come_before_any_work(quiet_cwd: Path, onnx_dir: Path, testdata: Path) -> None:
    with pytest.raises(UnsupportedError, match="tflite models cannot run on rpi4"):
        _plan(testdata / "tflm/hello_world_int8.tflite", "rpi4")
    with pytest.raises(UsageError, match="--ota-repo: MCU bundles"):
        root = quiet_cwd.parent / "1.root.json"
        root.write_text("{}")
        _plan(onnx_dir / "mnist.onnx", "nrf52840-dk", ota_repo="https://u.example.com/r/",
              ota_root=root)
    with pytest.raises(UnsupportedError, match=r"unsupported model format '\.bin'"):
        model = quiet_cwd.parent / "m.bin"
        model.write_bytes(b"x")
        _plan(model, "rpi4")
