"""Models generated for the MCU tests: real TensorFlow Lite converter output, nothing stored."""

from __future__ import annotations

from pathlib import Path


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
