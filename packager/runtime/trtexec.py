"""trtexec command lines per TensorRT release, and reading the TensorRT version trtexec reports.

trtexec's flags changed across the releases JetPack ships (JetPack 4.6.x: 8.2.1; 5.1.x: 8.5.2;
6.0: 8.6.2; 6.1/6.2: 10.3.0). Every form below is taken from trtexec's own help text in
NVIDIA/TensorRT, ``samples/common/sampleOptions.cpp``, at the tag named:

- 8.2 (tag 8.2.1): ``--workspace=N`` ("Set workspace size in megabytes"), ``--buildOnly``
  ("Skip inference perf measurement").
- 8.4/8.5 (tag 8.5.2): ``--memPoolSize=workspace:N`` ("size constraints of the designated
  memory pool(s) in MiB"; ``--workspace`` still parsed, deprecated), ``--buildOnly``.
- 8.6 (tag v8.6.1): ``--memPoolSize=workspace:N`` (MiB), ``--skipInference`` ("--buildOnly flag
  has been deprecated by --skipInference flag").
- 10.x (tag v10.3.0): ``--memPoolSize=workspace:NM`` ("Supports the following base-2 suffixes
  ... If none of suffixes is appended, the defualt unit is in MiB"; the M says so explicitly),
  ``--skipInference``; ``--workspace`` and ``--buildOnly`` are gone; ``--stronglyTyped`` builds
  an explicit Q/DQ INT8 model with the types its graph gives, instead of precision flags.

Throughout: ``--onnx=<file>``, ``--saveEngine=<file>``, ``--timingCacheFile=<file>`` ("Save/load
the serialized global timing cache", since 8.0), ``--useDLACore=N`` with ``--allowGPUFallback``.
FP16 is ``--fp16`` in every release; FP32 adds no precision flag.

INT8 on 8.x: a Q/DQ model still needs the INT8 builder flag (``--int8``); ``--fp16`` lets the
layers outside Q/DQ pairs run in FP16 instead of FP32 (TensorRT developer guide, "Explicit
Quantization"). On 10.x with a DLA core the build stays weakly typed (``--int8 --fp16``):
trtexec 10.3 sets ``BuilderFlag::kFP16`` itself for DLA when ``--int8`` is off
(samples/common/sampleEngines.cpp), which ``--stronglyTyped`` forbids ("setting fp16 mode is not
allowed if graph is strongly typed", sampleOptions.cpp).

Standard library only (runs in the device's container).
"""

from __future__ import annotations

import re

from .engine_key import EngineKey, EngineKeyError, tensorrt_release

DEFAULT_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
# Releases this module knows the flags of: major.minor -> form.
_FORMS = {
    (8, 2): "8.2",
    (8, 3): "8.2",
    (8, 4): "8.5",
    (8, 5): "8.5",
    (8, 6): "8.6",
}

# "&&&& RUNNING TensorRT.trtexec [TensorRT v8602] # trtexec ..." (samples/common/logging.h:
# name + " [TensorRT v" + NV_TENSORRT_VERSION + "]") and "[I] TensorRT version: 8.6.2"
# (samples/trtexec/trtexec.cpp).
_BANNER = re.compile(r"\[TensorRT v([0-9]{4,6})\]")
_VERSION_LINE = re.compile(r"TensorRT version: ([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\b")


class UnsupportedTensorRT(EngineKeyError):
    """A TensorRT release whose trtexec flags this module does not know."""


def form(tensorrt: str) -> str:
    """The trtexec flag form for a TensorRT version: "8.2" | "8.5" | "8.6" | "10".

    Raises :class:`UnsupportedTensorRT` for releases outside 8.2-8.6 and 10.x (7.x and 8.0/8.1
    have other flags; 9.x never shipped for Jetson).
    """
    release = tensorrt_release(tensorrt)
    major, minor, _patch = (int(part) for part in release.split("."))
    if major == 10:
        return "10"
    try:
        return _FORMS[(major, minor)]
    except KeyError:
        raise UnsupportedTensorRT(
            f"tensorrt: {release} has no known trtexec command line "
            "(supported: 8.2, 8.4, 8.5, 8.6, 10.x)"
        ) from None


def build_command(
    key: EngineKey,
    *,
    onnx: str,
    plan: str,
    timing_cache: str,
    trtexec: str = DEFAULT_TRTEXEC,
) -> list[str]:
    """The argv that builds ``key``'s plan from ``onnx`` into ``plan``, without timing runs.

    Paths are single argv elements (no shell). Raises :class:`UnsupportedTensorRT` (see
    :func:`form`).
    """
    flavour = form(key.tensorrt)
    argv = [trtexec, f"--onnx={onnx}", f"--saveEngine={plan}"]
    if flavour == "8.2":
        argv.append(f"--workspace={key.workspace_mib}")
    elif flavour in ("8.5", "8.6"):
        argv.append(f"--memPoolSize=workspace:{key.workspace_mib}")
    else:
        argv.append(f"--memPoolSize=workspace:{key.workspace_mib}M")
    argv.append(f"--timingCacheFile={timing_cache}")
    if key.precision == "fp16":
        argv.append("--fp16")
    elif key.precision == "int8":
        if flavour == "10" and key.dla_core is None:
            argv.append("--stronglyTyped")
        else:
            argv += ["--int8", "--fp16"]
    if key.dla_core is not None:
        argv += [f"--useDLACore={key.dla_core}", "--allowGPUFallback"]
    argv.append("--buildOnly" if flavour in ("8.2", "8.5") else "--skipInference")
    return argv


def version_from_output(line: str) -> str | None:
    """The TensorRT ``major.minor.patch`` a trtexec output line reports, or None.

    ``NV_TENSORRT_VERSION`` is ``major*1000 + minor*100 + patch`` in 8.x
    (include/NvInferRuntimeCommon.h, 8.2.1) and ``major*10000 + minor*100 + patch`` from 10.0
    (include/NvInferRuntimeBase.h, v10.3.0): v8602 is 8.6.2, v100300 is 10.3.0.
    """
    match = _BANNER.search(line)
    if match:
        number = int(match.group(1))
        if number >= 100000:
            return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
        return f"{number // 1000}.{number // 100 % 10}.{number % 100}"
    match = _VERSION_LINE.search(line)
    if match:
        return ".".join(str(int(part)) for part in match.groups())
    return None
