"""polygraphy's ONNX side, which works without TensorRT: reference inputs/outputs for the
on-device comparison. (Constant folding of the model a Jetson bundle ships is a source step the
core runs: packager.models.fold.)

The device compares its engine against the references with polygraphy itself::

    polygraphy run model.onnx --trt [--fp16|--int8] \\
        --load-inputs reference-inputs.json --load-outputs reference-outputs.json

``--load-inputs`` reads a JSON list of feed dicts (one per iteration) and ``--load-outputs`` a
``RunResults`` document, both in polygraphy's JSON encoding (numpy arrays as base64 ``np.save``
bytes): the formats :func:`write_reference` writes, through polygraphy's own encoders.

The bytes are a function of the model, the seed, the iteration count and the numpy/onnxruntime
versions: inputs come from polygraphy's seeded ``DataLoader``, the runner has a fixed name (its
default name carries a timestamp) and no run time is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import InputError, UnsupportedError
from packager.models.fold import quiet_polygraphy
from packager.staging import write_bytes

REFERENCE_INPUTS = "reference-inputs.json"
REFERENCE_OUTPUTS = "reference-outputs.json"
# The name the outputs are filed under in RunResults; polygraphy's default carries a timestamp.
RUNNER_NAME = "edgepack-onnxrt-reference"
DEFAULT_SEED = 1  # polygraphy's own default DataLoader seed (polygraphy.constants.DEFAULT_SEED)
MAX_ITERATIONS = 64  # bounded: each iteration is a full model input in the bundle


@dataclass(frozen=True)
class ReferenceFiles:
    """What :func:`write_reference` wrote: ``inputs`` / ``outputs`` (polygraphy JSON, paths
    inside the ``out_dir`` it was given), the ``runner`` name the outputs are filed under, the
    ``seed`` and number of ``iterations``, and the model's input/output names."""

    inputs: Path
    outputs: Path
    runner: str
    seed: int
    iterations: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.inputs, self.outputs)

    def to_json(self) -> dict[str, object]:
        return {
            "inputs": self.inputs.name,
            "outputs": self.outputs.name,
            "runner": self.runner,
            "seed": self.seed,
            "iterations": self.iterations,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
        }


def write_reference(
    onnx_path: Path,
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    iterations: int = 1,
) -> ReferenceFiles:
    """Run ``onnx_path`` under polygraphy's ONNX-Runtime runner (CPU) on ``iterations`` seeded
    random inputs (polygraphy's DataLoader: floats in [0, 1), dynamic dimensions as 1) and write
    ``out_dir/reference-inputs.json`` and ``out_dir/reference-outputs.json`` for
    ``polygraphy run --load-inputs/--load-outputs`` on the device. Same model, seed and
    iterations: the same bytes. Each file is written whole (temporary file, then rename).

    InputError for a model that does not load; UnsupportedError when onnxruntime cannot run it."""
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise InputError(f"reference iterations {iterations}: between 1 and {MAX_ITERATIONS}")
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: model file not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_polygraphy():
        from polygraphy.backend.onnxrt import (  # type: ignore[import-untyped]
            OnnxrtRunner,
            SessionFromOnnx,
        )
        from polygraphy.comparator import (  # type: ignore[import-untyped]
            DataLoader,
            RunResults,
        )
        from polygraphy.json import to_json  # type: ignore[import-untyped]

        runner = OnnxrtRunner(
            SessionFromOnnx(str(onnx_path), providers=["cpu"]), name=RUNNER_NAME
        )
        try:
            with runner:
                metadata = runner.get_input_metadata(use_numpy_dtypes=False)
                loader = DataLoader(seed=seed, iterations=iterations)
                loader.input_metadata = metadata
                feeds: list[dict[str, Any]] = [dict(feed) for feed in loader]
                outputs = [dict(runner.infer(feed)) for feed in feeds]
        except Exception as exc:  # onnxruntime and polygraphy raise their own types
            message = " ".join(str(exc).split())[:300]
            raise UnsupportedError(
                f"{onnx_path.name}: onnxruntime cannot run the model for reference outputs "
                f"({message})"
            ) from exc
        results = RunResults()
        results.add(outputs, runtime=None, runner_name=RUNNER_NAME)
        inputs_text = to_json(feeds)
        outputs_text = results.to_json()
    inputs_path = out_dir / REFERENCE_INPUTS
    outputs_path = out_dir / REFERENCE_OUTPUTS
    _write(inputs_path, inputs_text)
    _write(outputs_path, outputs_text)
    return ReferenceFiles(
        inputs=inputs_path,
        outputs=outputs_path,
        runner=RUNNER_NAME,
        seed=seed,
        iterations=iterations,
        input_names=tuple(feeds[0]) if feeds else (),
        output_names=tuple(outputs[0]) if outputs else (),
    )


def _write(path: Path, text: str) -> None:
    write_bytes(path, (text if text.endswith("\n") else text + "\n").encode("utf-8"))
