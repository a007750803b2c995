"""The I/O half of ``edgepack optimize``: inspect the source, run the planned steps in a work
directory, and move the finished result into ``--out`` in one rename.

Any failure (bad data, an unsupported operator, the accuracy gate) removes the staging
directory, so ``--out`` either holds a complete result or is untouched.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from packager.calibration import Feed, SampleSet, load_samples, require_min_samples
from packager.console import console
from packager.errors import InputError, UsageError
from packager.models.onnx import all_nodes, inspect_onnx
from packager.models.onnx_save import copy_onnx, total_size
from packager.models.torch_export import (
    TORCH_SUFFIXES,
    detect_kind,
    export_onnx,
    load_torch_model,
)
from packager.models.trust import TRUST_FLAG
from packager.optimize import graph
from packager.optimize.cpu import host_cpu
from packager.optimize.emulated import run_emulated
from packager.optimize.evaluate import (
    AccuracyMetrics,
    check_gate,
    compare,
    gate_failures,
    worst_output,
)
from packager.optimize.plan import (
    RUNNABLE_DOMAINS,
    ConvertFp16,
    ConvertOpset,
    Evaluate,
    ExportTorch,
    LoadOnnx,
    LoadTorch,
    OptimizePlan,
    Preprocess,
    Prune,
    QuantizeInt8,
    Report,
    SourceInfo,
    Step,
    plan_optimize,
)
from packager.optimize.prune import PruneStats, prune_module
from packager.optimize.report import (
    OptimizeReport,
    VariantResult,
    file_sizes,
    median_latency_ms,
    render_chart,
    render_markdown,
)
from packager.optimize.request import OptimizeRequest
from packager.staging import staged_dir

REPORT_JSON = "optimize-report.json"
REPORT_MD = "optimize-report.md"
REPORT_PNG = "optimize-report.png"


@dataclass(frozen=True)
class OptimizeResult:
    """A finished optimization: the --out directory, the optimized model in it and the report.

    ``to_json`` is what ``edgepack optimize --json`` prints: the report with full paths.
    """

    out: Path
    model: Path
    report: OptimizeReport

    def to_json(self) -> dict[str, object]:
        # The report names files relative to --out; here they are full paths.
        return {
            **self.report.to_json(),
            "out": str(self.out),
            "model": str(self.model),
            "report": {
                "json": str(self.out / REPORT_JSON),
                "markdown": str(self.out / REPORT_MD),
                "chart": str(self.out / REPORT_PNG),
            },
        }


def optimize(request: OptimizeRequest) -> OptimizeResult:
    """Inspect, plan and execute ``request``; the one entry point for the command and builds."""
    check_out(request.out, force=request.force)
    source = inspect_source(request.model)
    plan = plan_optimize(request, source, host_cpu())
    return execute(plan)


def inspect_source(path: Path) -> SourceInfo:
    """What planning needs to know of the model file: its kind, opset, foreign operators and size.

    Size in bytes, ONNX external data included. Raises InputError (exit 3) for a missing file, an
    unknown suffix or an ONNX file that cannot be read.
    """
    if not path.exists():
        raise InputError(f"{path}: model file not found; check the path")
    if path.suffix.lower() in TORCH_SUFFIXES:
        return SourceInfo(path, detect_kind(path), size_bytes=path.stat().st_size)
    if path.suffix.lower() != ".onnx":
        raise InputError(
            f"{path}: unknown model type '{path.suffix}'",
            hint="pass an .onnx file, a .pt/.pth (torch.save or TorchScript) or a .pt2 program",
        )
    info = inspect_onnx(path)  # InputError for a missing, corrupt or truncated file
    model = onnx.load(str(path), load_external_data=False)
    foreign = sorted(
        {
            f"{node.domain}::{node.op_type}"
            for node in all_nodes(model.graph)
            if node.domain not in RUNNABLE_DOMAINS
        }
    )
    opset = info.opsets.get("", info.opsets.get("ai.onnx"))
    return SourceInfo(path, "onnx", opset, tuple(foreign), total_size(path))


def check_out(out: Path, *, force: bool) -> None:
    """Refuse an --out that is a file, or non-empty without ``force``: UsageError (exit 2)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: directory is not empty; pass --force to replace it")


@dataclass
class _State:
    plan: OptimizePlan
    work: Path
    staging: Path
    torch_model: Any = None
    baseline: Path | None = None
    current: Path | None = None
    pruned: Path | None = None
    optimized: Path | None = None
    prune_stats: PruneStats | None = None
    latency_feed: Feed | None = None
    metrics: dict[str, AccuracyMetrics] = field(default_factory=dict)
    evaluation: list[tuple[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: OptimizeReport | None = None

    def path(self, name: str) -> Path:
        return self.work / name

    def model(self) -> Path:
        if self.current is None:  # pragma: no cover - the plan always loads first
            raise AssertionError("no model loaded")
        return self.current


def execute(plan: OptimizePlan) -> OptimizeResult:
    """Run ``plan``'s steps in a work directory and move the result into --out in one rename.

    On any error --out is left as it was: a step's own error (InputError, UnsupportedError,
    AccuracyError, ...), or UsageError (exit 2) when --out filled up while the steps ran.
    """
    out = plan.request.out
    # .OUT.PID.RANDOM: a later run to the same --out removes it if this one is SIGKILLed.
    with staged_dir(out) as staging:
        with tempfile.TemporaryDirectory(prefix="edgepack-optimize-") as work:
            state = _State(plan=plan, work=Path(work), staging=staging)
            for step in plan.steps:
                _run(step, state)
        check_out(out, force=plan.request.force)  # it may have filled up while we worked
    if state.report is None:  # pragma: no cover - the plan always ends with Report
        raise AssertionError("no report written")
    return OptimizeResult(out=out, model=out / plan.model_name, report=state.report)


def _run(step: Step, state: _State) -> None:
    request = state.plan.request
    match step:
        case LoadOnnx(source):
            console.status(f"loading {source.name}")
            state.baseline = state.current = state.path("source.onnx")
            graph.load_inline(source, state.current)
        case LoadTorch(source, kind, trusted):
            console.status(f"loading PyTorch {kind} {source.name}")
            state.torch_model = load_torch_model(source, kind, trusted=trusted)
            state.notes.append(
                f"the PyTorch {kind} source was loaded with {TRUST_FLAG}: loading it runs "
                "code from the file, on the builder's word that they wrote it"
            )
        case ExportTorch(kind, inputs, role):
            console.status(f"exporting the {role} model to ONNX")
            dest = state.path(f"{role}.onnx")
            export_onnx(state.torch_model, kind, inputs, dest, state.plan.source.path)
            state.current = dest
            if role == "baseline":
                state.baseline = dest
            else:
                state.pruned = dest
        case Prune(options):
            console.status("pruning")
            state.prune_stats = prune_module(state.torch_model, options)
            state.notes.append(
                "pruned weights are stored as dense zero-filled tensors and onnxruntime's CPU "
                "kernels compute dense, so pruning alone gives no speed-up and no smaller .onnx "
                "file; the zeros only pay off after compression (see gzip size)"
            )
        case ConvertOpset(old, new, reason):
            console.status(f"converting opset {old} -> {new}")
            dest = state.path(f"opset{new}.onnx")
            graph.convert_opset(state.model(), dest, new)
            state.current = dest
            state.notes.append(f"converted from opset {old} to {new}: {reason}")
        case Preprocess():
            console.status("pre-processing (shape inference, graph optimization)")
            dest = state.path("preprocessed.onnx")
            state.notes.extend(graph.preprocess(state.model(), dest))
            if graph.squeeze_gemm_biases(dest):
                state.notes.append("reshaped [1, N] Gemm biases to [N] for the INT8 quantizer")
            state.current = dest
        case QuantizeInt8() as q:
            _quantize(q, state)
        case ConvertFp16():
            console.status("converting to FP16")
            dest = state.path("fp16.onnx")
            graph.convert_fp16(state.model(), dest)
            graph.open_session(dest, f"{request.model.name} as fp16")
            state.current = state.optimized = dest
        case Evaluate() as e:
            _evaluate(e, state)
        case Report(runs):
            _report(runs, state)


def _quantize(step: QuantizeInt8, state: _State) -> None:
    request = state.plan.request
    dest = state.path("int8.onnx")
    if step.static:
        assert step.calibration is not None
        inputs, _ = graph.signature(state.model())
        samples = load_samples(
            step.calibration, inputs, preprocessing=step.preprocessing, purpose="calibration"
        )
        require_min_samples(samples, step.min_samples)
        state.latency_feed = state.latency_feed or samples.feeds[0]
        console.status(
            f"quantizing static INT8 ({step.quant_format}) on {samples.sample_count} samples"
        )
        graph.quantize_static(
            state.model(),
            dest,
            samples,
            quant_format=step.quant_format,
            per_channel=step.per_channel,
            method=step.method,
            activation_type=step.settings.activation_type if step.settings else None,
            reduce_range=step.settings.reduce_range if step.settings else False,
            extra_options=dict(step.settings.extra_options) if step.settings else None,
        )
    else:
        console.status("quantizing dynamic INT8")
        graph.quantize_dynamic(
            state.model(),
            dest,
            per_channel=step.per_channel,
            reduce_range=step.settings.reduce_range if step.settings else False,
        )
        if request.quant_format != "QDQ":
            state.notes.append(
                "dynamic quantization has no QDQ/QOperator choice: onnxruntime writes "
                "integer operators with activations quantized at run time"
            )
    graph.open_session(dest, f"{request.model.name} as {_variant_name(state.plan)}")
    state.current = state.optimized = dest


def _evaluate(step: Evaluate, state: _State) -> None:
    assert state.baseline is not None and state.optimized is not None
    console.status(f"evaluating on {step.data}")
    inputs, outputs = graph.signature(state.baseline)
    samples = load_samples(
        step.data, inputs, outputs, preprocessing=step.preprocessing, purpose="evaluation"
    )
    state.latency_feed = samples.feeds[0]
    baseline_out = graph.run(graph.open_session(state.baseline, "fp32 model"), samples)
    references = _references(samples, outputs)
    final_name = _variant_name(state.plan)
    candidates = [("fp32-pruned", state.pruned), (final_name, state.optimized)]
    for name, path in candidates:
        if path is None:
            continue
        outputs_ = graph.run(graph.open_session(path, name), samples)
        state.metrics[name] = compare(
            baseline_out, outputs_, samples.labels, references, names=outputs
        )
    if step.emulate is not None:
        # The gate judges the target's kernels: the candidate again, on the emulated CPU.
        native = state.metrics[final_name]
        console.status(f"evaluating {final_name} on an emulated {step.emulate} CPU (qemu-user)")
        emulated = run_emulated(state.optimized, samples, step.emulate, state.path("emulated"))
        state.metrics[final_name] = compare(
            baseline_out, emulated, samples.labels, references, names=outputs
        )
        state.notes.append(
            f"{final_name} on this host's CPU: cosine {native.cosine_similarity:.5f}"
            + (
                f", top-1 agreement {native.top1_agreement:.2%}"
                if native.top1_agreement is not None
                else ""
            )
            + f"; the figures above are from the emulated {step.emulate} CPU (the target's "
            "int8 kernels), which the gate judged"
        )
    final = state.metrics[final_name]
    failures = gate_failures(final, step.max_accuracy_drop, step.min_top1_agreement)
    worst = worst_output(final)
    state.evaluation = [
        ("data", step.data.name),
        ("held_out", step.held_out),
        ("measured_on", step.measured_on),
        ("emulated_cpu", step.emulate),
        ("samples", final.samples),
        ("labels", samples.labels is not None),
        ("max_accuracy_drop", step.max_accuracy_drop),
        ("min_top1_agreement", step.min_top1_agreement),
        ("outputs", [o.name for o in final.outputs]),
        ("score_vector_outputs", [o.name for o in final.outputs if o.score_vector]),
        ("worst_output", worst.name if worst is not None else None),
        ("failures", list(failures)),
        ("passed", not failures),
    ]
    if not step.held_out:
        state.notes.append(
            "accuracy was measured on the calibration set, which the INT8 ranges were fitted "
            "to; pass --eval with held-out inputs for an honest figure"
        )
    check_gate(
        final,
        step.max_accuracy_drop,
        step.min_top1_agreement,
        label=f"{state.plan.request.model.name} as {_variant_name(state.plan)}",
    )


def _references(samples: SampleSet, outputs: tuple[str, ...]) -> Any:
    if not outputs or outputs[0] not in samples.references:
        return None
    return np.concatenate([np.asarray(r).reshape(-1) for r in samples.references[outputs[0]]])


def _report(runs: int, state: _State) -> None:
    plan = state.plan
    request = plan.request
    assert state.baseline is not None and state.optimized is not None
    feed = state.latency_feed or _synthetic_feed(state.baseline)
    console.status(f"measuring latency ({runs} runs per variant)")
    final_name = _variant_name(plan)
    variants: list[VariantResult] = []
    entries = [
        ("fp32", state.baseline, plan.baseline_name),
        ("fp32-pruned", state.pruned, None),
        (final_name, state.optimized, plan.model_name),
    ]
    for name, path, kept in entries:
        if path is None:
            continue
        size, packed = file_sizes(path)
        latency = median_latency_ms(graph.open_session(path, name), feed, runs)
        variants.append(VariantResult(name, kept, size, packed, latency, state.metrics.get(name)))
    fp32, final = variants[0], variants[-1]
    timing_notes = []
    if final.latency_ms > fp32.latency_ms:
        timing_notes.append(
            f"{final_name} ran slower than fp32 on this host ({final.latency_ms:.3f} ms vs "
            f"{fp32.latency_ms:.3f} ms median); onnxruntime's CPU kernels for this precision "
            "do not pay off here, so measure on the device before shipping it"
        )
    settings: list[tuple[str, object]] = [("quantize", request.quantize)]
    if request.quantize == "int8-static":
        settings += [
            ("format", request.quant_format),
            ("per_channel", request.per_channel),
            ("calibration", request.calibration.name if request.calibration else None),
            ("calibration_method", request.calibration_method),
        ]
    elif request.quantize == "int8-dynamic":
        settings.append(("per_channel", request.per_channel))
    quantize_step = next((s for s in plan.steps if isinstance(s, QuantizeInt8)), None)
    if quantize_step is not None and quantize_step.settings is not None:
        settings += [
            ("activation_type", quantize_step.settings.activation_type),
            ("weight_type", quantize_step.settings.weight_type),
            ("reduce_range", quantize_step.settings.reduce_range),
            ("chosen_for", quantize_step.cpu),
            ("why", quantize_step.settings.reason),
        ]
        if quantize_step.settings.extra_options:
            settings += [
                ("int8_profile", quantize_step.settings.profile),
                ("extra_options", dict(quantize_step.settings.extra_options)),
            ]
    evaluate_step = next((s for s in plan.steps if isinstance(s, Evaluate)), None)
    measured: list[tuple[str, object]] = []
    if plan.host is not None:
        measured += [("host_cpu", plan.host.describe()), ("host", plan.host.to_json())]
    if plan.cpu is not None:
        measured.append(("target_cpu", plan.cpu.to_json()))
    if evaluate_step is not None:
        measured += [
            ("accuracy", evaluate_step.measured_on),
            ("accuracy_emulated_cpu", evaluate_step.emulate),
        ]
    measured.append(("latency", "this host, natively"))
    report = OptimizeReport(
        source=request.model.name,
        source_kind=plan.source.kind,
        quantize=request.quantize,
        settings=tuple(settings),
        steps=plan.describe(),
        model_file=plan.model_name,
        variants=tuple(variants),
        latency_runs=runs,
        prune=state.prune_stats,
        evaluation=tuple(state.evaluation),
        notes=tuple(state.notes),
        timing_notes=tuple(timing_notes),
        measured_on=tuple(measured),
    )
    # With their external data (large models), renamed to go with the new file names.
    copy_onnx(state.optimized, state.staging / plan.model_name)
    if plan.baseline_name is not None:
        copy_onnx(state.baseline, state.staging / plan.baseline_name)
    document = json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n"
    (state.staging / REPORT_JSON).write_text(document, encoding="utf-8")
    (state.staging / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    render_chart(report, state.staging / REPORT_PNG)
    state.report = report


def _variant_name(plan: OptimizePlan) -> str:
    if plan.request.quantize == "int8-static":
        return f"int8-static {plan.request.quant_format}"
    return plan.request.quantize


def _synthetic_feed(model: Path) -> Feed:
    """A seeded random input for latency when the user gave no data (dynamic dims as 1)."""
    inputs, _ = graph.signature(model)
    rng = np.random.default_rng(0)
    feed: Feed = {}
    for tensor in inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in tensor.shape)
        dtype = np.dtype(tensor.dtype) if tensor.dtype != "undefined" else np.dtype("float32")
        if dtype.kind == "f":
            feed[tensor.name] = rng.random(shape).astype(dtype)
        else:
            feed[tensor.name] = np.zeros(shape, dtype=dtype)
    return feed


