"""Models generated for the MCU tests: real TensorFlow Lite converter output, nothing stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def conv_int8_tflite(path: Path, *, channels: int = 94, layers: int = 4) -> Path:
    """A fully int8 convolutional TFLite model written to ``path``.

    Input int8 [1, 8, 8, 16]; ``layers`` 3x3 Conv2D+ReLU of ``channels`` filters, then a 3x3
    Conv2D of ``channels // 2``. The defaults give a ~300 KB model, the size of TensorFlow Lite
    Micro's person-detection example (tflite-micro examples/person_detection, 300,568 B).
    Calibrated with the converter's post-training full-integer quantization on seeded noise.
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 16), batch_size=1)
    x = inputs
    for _ in range(layers):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(channels // 2, 3, padding="same")(x)
    model = keras.Model(inputs, x)
    rng = np.random.default_rng(0)

    def calibration() -> object:
        for _ in range(8):
            yield [rng.standard_normal((1, 8, 8, 16)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = calibration
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())
    return path


def build_int8_bundle(
    model: Path, target: str, calibration: Path, out: Path, *extra: str
) -> tuple[Path, dict[str, Any], Path]:
    """``edgepack build MODEL --target TARGET --calibration DIR --out OUT`` through the CLI:
    (the bundle, its manifest, its .tflite); the bundle's model is TFLite."""
    from tests.integration.conftest import build_json

    doc = build_json(
        str(model), "--target", target, *extra, "--calibration", str(calibration),
        "--out", str(out),
    )  # fmt: skip
    bundle = Path(doc["bundle"])
    manifest: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["format"] == "tflite"
    return bundle, manifest, next((bundle / "model").glob("*.tflite"))


def assert_int8_agrees(
    converted: Any, reference: Any, *, mean_error: float, agreement: float
) -> None:
    """The int8 model's dequantized outputs against the source model's on the same rows: a mean
    absolute error under ``mean_error`` of the reference's span and the same top class on at
    least ``agreement`` of the rows (int8 saturates beyond the calibrated range, so the bulk and
    the decisions are judged, not the worst row)."""
    import numpy as np

    span = float(reference.max() - reference.min())
    assert np.abs(converted - reference).mean() < mean_error * span
    assert float((converted.argmax(1) == reference.argmax(1)).mean()) >= agreement


def assert_calibration_required(model: Path, target: str, out: Path, *extra: str) -> None:
    """A build to int8 without --calibration: exit 3, one error line naming the option, and
    nothing written. ``extra``: further build flags."""
    from tests.integration.conftest import edgepack

    proc = edgepack(
        "build", str(model), "--target", target, *extra, "--out", str(out), check=False
    )
    assert proc.returncode == 3
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--calibration" in errors[0]
    assert not out.exists()


def assert_int8_project(
    model: Path,
    target: str,
    calibration: Path,
    out: Path,
    x: Any,
    reference: Any,
    *,
    mean_error: float,
    agreement: float,
    extra: tuple[str, ...] = (),
) -> None:
    """``model`` builds (as ``net``, with the further build flags ``extra``) into a TFLM project
    whose resolver registers the fully connected kernel, whose int8 model run in LiteRT on ``x``
    agrees with ``reference`` (the source model's outputs on ``x``, see
    :func:`assert_int8_agrees`), and which verifies."""
    from tests.integration.conftest import edgepack, litert_int8_outputs

    bundle, _, tflite = build_int8_bundle(model, target, calibration, out, "--name", "net", *extra)
    assert "AddFullyConnected" in (bundle / "src" / "op_resolver.h").read_text()
    converted = litert_int8_outputs(tflite, x)
    assert_int8_agrees(converted, reference, mean_error=mean_error, agreement=agreement)
    assert edgepack("verify", str(bundle)).returncode == 0
