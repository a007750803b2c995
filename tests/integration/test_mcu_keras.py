"""Keras (.keras, .h5) and SavedModel -> fully int8 TFLite -> TFLM project, through the CLI.

Real TensorFlow converts; the desktop LiteRT interpreter runs the converted model and is compared
with the Keras model it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import build_json, edgepack, litert_int8_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

try:
    import tensorflow as tf
except ImportError:  # pragma: no cover - make setup installs the mcu-convert extra
    pytest.fail(
        "tensorflow missing: install the mcu-convert extra (make setup does)", pytrace=False
    )


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras")
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(8,), name="features"),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(4),
        ]
    )
    model.save(root / "net.keras")
    model.save(root / "net.h5")
    model.export(str(root / "saved"))
    rng = np.random.default_rng(0)
    calibration = root / "calibration"
    calibration.mkdir()
    np.save(calibration / "set.npy", rng.uniform(-1, 1, size=(64, 8)).astype(np.float32))
    return {
        "keras": root / "net.keras",
        "h5": root / "net.h5",
        "saved": root / "saved",
        "calibration": calibration,
        "root": root,
    }


@pytest.mark.parametrize("kind", ["keras", "h5", "saved"])
def test_keras_to_int8_tflm_project(
    kind: str, keras_model: dict[str, Path], tmp_path: Path
) -> None:
    doc = build_json(
        str(keras_model[kind]),
        "--target",
        "nrf52840-dk",
        "--name",
        "net",
        "--calibration",
        str(keras_model["calibration"]),
        "--out",
        str(tmp_path / "bundle"),
    )
    bundle = Path(doc["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["format"] == "tflite"
    tflite = next((bundle / "model").glob("*.tflite"))
    resolver = (bundle / "src" / "op_resolver.h").read_text()
    assert "AddFullyConnected" in resolver
    x = np.random.default_rng(1).uniform(-1, 1, size=(16, 8)).astype(np.float32)
    reference = tf.keras.models.load_model(keras_model["keras"]).predict(x, verbose=0)
    converted = litert_int8_outputs(tflite, x)
    span = float(reference.max() - reference.min())
    # int8 saturates outputs beyond the calibrated range, so judge the bulk and the decisions.
    assert np.abs(converted - reference).mean() < 0.01 * span
    agreement = float((converted.argmax(1) == reference.argmax(1)).mean())
    assert agreement >= 0.9
    assert edgepack("verify", str(bundle)).returncode == 0


def test_keras_without_calibration_is_one_line(
    keras_model: dict[str, Path], tmp_path: Path
) -> None:
    proc = edgepack(
        "build",
        str(keras_model["keras"]),
        "--target",
        "nrf52840-dk",
        "--out",
        str(tmp_path / "b"),
        check=False,
    )
    assert proc.returncode == 3
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--calibration" in errors[0]
    assert not (tmp_path / "b").exists()
