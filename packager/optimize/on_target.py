"""Measure an INT8 model inside the target's own image, on an emulated copy of its CPU.

For a target of another architecture (an arm64 Raspberry Pi on an x86 build host) the host's
onnxruntime computes with other kernels than the device's. ``edgepack build`` therefore runs
the model the image ships, with the image's own Python and onnxruntime, under qemu-user
emulating the target's CPU model (``cpu.qemu``, else the model named like ``cpu.model``), with a
/proc/cpuinfo of that core bind-mounted (onnxruntime reads it at import and fails on the host's
x86 text), and compares the outputs with the FP32 model's on this host.

Measured: a 7.5 KB Conv model, 30 samples, in a 38 MB rpi4 image on a cortex-a72: 16 s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from packager.calibration import ImagePreprocessing, load_samples
from packager.console import console
from packager.errors import EdgepackError, RuntimeCheckError
from packager.optimize import graph
from packager.optimize.evaluate import compare
from packager.optimize.plan import AUTO_EMULATED_EVAL_MAX_BYTES

RUNNER = Path(__file__).resolve().parent / "emulated_run.py"
MOUNT = "/opt/edgepack-eval"
TIMEOUT_S = 1800.0


def wanted(target: Any, quantize: str | None, eval_dir: Path | None, model: Path) -> bool:
    """True when a build should measure ``model`` in the image: an INT8 model with --eval for an
    onnxruntime container target of another architecture than this host's, up to
    :data:`AUTO_EMULATED_EVAL_MAX_BYTES` (the default where it is cheap)."""
    from packager.models.onnx_save import total_size
    from packager.tools.qemu import needs_emulation

    spec = getattr(target, "spec", None)
    runtime = getattr(spec, "runtime", None)
    platform = getattr(spec, "platform", None)
    if quantize not in ("int8-static", "int8-dynamic") or eval_dir is None:
        return False
    if getattr(runtime, "engine", None) != "onnxruntime" or platform is None:
        return False
    if not needs_emulation(str(platform.arch)):
        return False  # same architecture: the optimizer measured on this host's kernels
    return model.suffix.lower() == ".onnx" and total_size(model) <= AUTO_EMULATED_EVAL_MAX_BYTES


def evaluate_in_image(
    *,
    target: Any,
    image: dict[str, Any],
    bundle: Path,
    model_in_image: str,
    baseline: Path,
    eval_dir: Path,
    report: dict[str, Any],
    work: Path,
) -> dict[str, Any]:
    """``report`` (the optimizer's, as JSON) with the final variant's metrics measured in the
    image (``image``: the manifest's image table, its archive inside ``bundle``; the model at
    ``model_in_image``), compared with ``baseline`` (FP32) on ``eval_dir``; the host's
    figures kept as ``host_metrics``. Without a container engine or qemu this host cannot do it:
    the report says so and keeps the host's figures. A model that does not run on the emulated
    CPU raises RuntimeCheckError."""
    from packager.image.emulation import cpuinfo_text
    from packager.tools.containers import find_engine
    from packager.tools.qemu import QEMU_DEFAULT_CPU, emulated_cpu, ensure_binfmt

    spec = target.spec
    arch = str(spec.platform.arch)
    cpu = emulated_cpu(spec.cpu.model, spec.cpu.qemu) or QEMU_DEFAULT_CPU
    where = (
        f"{spec.name}'s image ({image.get('ref')}, onnxruntime as shipped) under qemu-user on an "
        f"emulated {cpu} CPU ({spec.cpu.model})"
    )
    try:
        engine = find_engine()
        ensure_binfmt(arch)
    except EdgepackError as exc:
        return _skipped(report, f"not measured in {where}: {exc.one_line()}")
    work.mkdir(parents=True, exist_ok=True)
    exchange = work / "exchange"
    exchange.mkdir()
    # The image's runtime user (not root) writes the outputs here; only this directory is shared.
    os.chmod(exchange, 0o777)
    inputs, outputs = graph.signature(baseline)
    samples = load_samples(
        eval_dir, inputs, outputs, preprocessing=ImagePreprocessing(), purpose="evaluation"
    )
    names = [t.name for t in inputs]
    arrays: dict[str, Any] = {"names": np.array(names), "count": np.array(len(samples.feeds))}
    for i, feed in enumerate(samples.feeds):
        for j, name in enumerate(names):
            arrays[f"s{i}_{j}"] = np.asarray(feed[name])
    np.savez(exchange / "feeds.npz", **arrays)
    (exchange / "run.py").write_bytes(RUNNER.read_bytes())
    (exchange / "run.py").chmod(0o644)
    (exchange / "feeds.npz").chmod(0o644)
    volumes = [f"{exchange}:{MOUNT}"]
    text = cpuinfo_text(cpu, spec.cpu.cores)
    if text is not None:
        cpuinfo = work / "cpuinfo"
        cpuinfo.write_text(text, encoding="ascii")
        volumes.append(f"{cpuinfo}:/proc/cpuinfo:ro")
    console.status(f"evaluating {report['model']} in {where}")
    ref = str(image["ref"])
    try:
        engine.image_id(ref)
        loaded_before = True
    except EdgepackError:
        loaded_before = False
    engine.load(bundle / str(image["archive"]))
    try:
        proc = _run(engine, ref, spec, volumes, cpu, str(image["platform"]), model_in_image)
    finally:
        if not loaded_before:  # a build leaves the engine's image store as it found it
            engine.remove_image(ref)
    result = exchange / "outputs.npz"
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip().splitlines()
        raise RuntimeCheckError(
            f"{report['model']} did not run in {where} (exit {proc.returncode}): "
            f"{' | '.join(tail[-3:])[:300] or '(no output)'}",
            hint="the device would fail the same way; try another --quantize",
        )
    with np.load(result, allow_pickle=False) as saved:
        on_target = [
            [saved[f"s{i}_{k}"] for k in range(len(outputs))] for i in range(len(samples.feeds))
        ]
    base = graph.run(graph.open_session(baseline, "fp32 model"), samples)
    metrics = compare(base, on_target, samples.labels, names=outputs)
    updated = dict(report)
    variants = [dict(v) for v in updated.get("variants", [])]
    if variants:
        variants[-1]["host_metrics"] = variants[-1].get("metrics")
        variants[-1]["metrics"] = metrics.to_json()
        updated["variants"] = variants
    measured = dict(updated.get("measured_on") or {})
    measured["accuracy"] = where
    measured["accuracy_emulated_cpu"] = cpu
    updated["measured_on"] = measured
    updated["on_target"] = {"measured_on": where, "cpu": cpu, "metrics": metrics.to_json()}
    return updated


def _run(
    engine: Any,
    ref: str,
    spec: Any,
    volumes: list[str],
    cpu: str,
    platform: str,
    model_in_image: str,
) -> Any:
    return engine.run_once(
        ref,
        [f"{MOUNT}/run.py", model_in_image, f"{MOUNT}/feeds.npz", f"{MOUNT}/outputs.npz"],
        name=f"edgepack-eval-{spec.name}-{os.getpid()}",
        entrypoint=f"/usr/bin/python{spec.runtime.python}",
        volumes=volumes,
        platform=platform,
        env=[("QEMU_CPU", cpu)],
        timeout=TIMEOUT_S,
    )


def _skipped(report: dict[str, Any], why: str) -> dict[str, Any]:
    console.warn(why)
    updated = dict(report)
    updated["notes"] = [*updated.get("notes", []), why]
    return updated
