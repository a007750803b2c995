"""Compute a model's outputs on an emulated CPU (qemu-user), so the accuracy gate judges the
integer kernels the device runs rather than this host's (``packager.optimize.cpu``).

The host's own Python and onnxruntime run ``emulated_run.py`` under ``qemu-<arch>-static -cpu
MODEL``; onnxruntime picks its kernels from the CPUID that qemu reports.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from packager.calibration import SampleSet
from packager.errors import ToolFailedError, UnsupportedError
from packager.tools.qemu import host_arch, qemu_user_tool

RUNNER = Path(__file__).resolve().parent / "emulated_run.py"
# qemu-user runs onnxruntime 10-50x slower than the host; bounded all the same.
TIMEOUT_S = 1800.0


def emulated_models(arch: str) -> frozenset[str]:
    """The CPU models (case kept: x86 names are ``Haswell-v4``) of this host's qemu-user for
    ``arch``, from ``-cpu help``: lines ``x86 NAME  description`` or ``  NAME``."""
    tool = qemu_user_tool(arch)
    if not tool.available():
        return frozenset()
    # qemu-user 7.2 exits 1 after printing the list; the list is the answer.
    proc = tool.run(["-cpu", "help"], timeout=30, check=False)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return frozenset(re.findall(r"^(?:x86\s+|\s+)([A-Za-z0-9][A-Za-z0-9._-]{0,63})", text, re.M))


def run_emulated(model: Path, samples: SampleSet, cpu: str, work: Path) -> list[list[Any]]:
    """Every output of every feed of ``samples``, computed by ``model`` on qemu's ``cpu`` (a
    model of this host's architecture). Raises UnsupportedError when this host's qemu has no
    such CPU model, ToolFailedError when the emulated run fails."""
    arch = host_arch()
    if cpu not in emulated_models(arch):
        raise UnsupportedError(
            f"qemu-user for {arch} on this host does not emulate the CPU model '{cpu}', which "
            "the accuracy check of this target needs",
            hint="install qemu-user-static, or pass --eval-on-target off to measure on this host",
        )
    work.mkdir(parents=True, exist_ok=True)
    feeds = work / "feeds.npz"
    out = work / "outputs.npz"
    names = list(samples.feeds[0]) if samples.feeds else []
    arrays: dict[str, Any] = {"names": np.array(names), "count": np.array(len(samples.feeds))}
    for i, feed in enumerate(samples.feeds):
        for j, name in enumerate(names):
            arrays[f"s{i}_{j}"] = np.asarray(feed[name])
    np.savez(feeds, **arrays)
    proc = qemu_user_tool(arch).run(
        ["-cpu", cpu, sys.executable, RUNNER, model, feeds, out], timeout=TIMEOUT_S, check=False
    )
    if proc.returncode != 0 or not out.is_file():
        lines = [
            line
            for line in (proc.stderr or b"").decode("utf-8", "replace").splitlines()
            if "TCG doesn't support" not in line  # qemu's notes on CPUID bits it cannot model
        ]
        raise ToolFailedError(
            f"evaluating {model.name} on an emulated {cpu} CPU failed (exit {proc.returncode}): "
            f"{' | '.join(lines[-3:])[:300] or '(no output)'}"
        )
    with np.load(out, allow_pickle=False) as results:
        count = len(samples.feeds)
        per_sample: list[list[Any]] = [[] for _ in range(count)]
        for i in range(count):
            k = 0
            while f"s{i}_{k}" in results:
                per_sample[i].append(results[f"s{i}_{k}"])
                k += 1
    return per_sample
