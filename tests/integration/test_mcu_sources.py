"""Keras (.keras, .h5), SavedModel and PyTorch (torch.save module, .pt2 program) -> fully int8
TFLite -> TFLM project, through the CLI.

Real TensorFlow converts the Keras and SavedModel forms, litert-torch (PT2E) the PyTorch ones; the
desktop LiteRT interpreter runs the converted model and is compared with the source model it
came from, on the same rows. One test body for every framework and form: a source model differs
only in how it is made, its target and its tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.mcu_models import assert_calibration_required, assert_int8_project
from tests.model_factory import sample_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class Source:
    """A source model saved in each of its forms ({form: file}), its calibration set, the MCU
    target it builds for, and the bar its int8 conversion is held to: ``reference``, the source
    model's outputs on ``rows``, with ``mean_error`` and ``agreement`` as in
    :func:`tests.integration.mcu_models.assert_int8_agrees`."""

    forms: dict[str, Path]
    calibration: Path
    target: str
    rows: Any
    reference: Any
    mean_error: float
    agreement: float
    # Further build flags: PyTorch files are loaded only with --trust-model-code.
    flags: tuple[str, ...] = ()
    # Further build flags of one form: a SavedModel is loaded only with --trust-model-code.
    form_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def keras_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - make setup installs the mcu-convert extra
        pytest.fail(
            "tensorflow missing: install the mcu-convert extra (make setup does)", pytrace=False
        )
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
    rows = np.random.default_rng(0).uniform(-1, 1, size=(64, 8)).astype(np.float32)
    x = np.random.default_rng(1).uniform(-1, 1, size=(16, 8)).astype(np.float32)
    return Source(
        forms={"keras": root / "net.keras", "h5": root / "net.h5", "saved": root / "saved"},
        calibration=sample_dir(root / "calibration", set=rows),
        target="nrf52840-dk",
        rows=x,
        reference=tf.keras.models.load_model(root / "net.keras").predict(x, verbose=0),
        mean_error=0.01,
        agreement=0.9,
        form_flags={"saved": ("--trust-model-code",)},
    )


@pytest.fixture(scope="module")
def torch_source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("torch-mcu")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 4),
    ).eval()
    torch.save(net, root / "net.pt")
    program = torch.export.export(net, (torch.zeros(1, 1, 8, 8),))
    torch.export.save(program, str(root / "net.pt2"))
    rows = np.random.default_rng(0).uniform(0, 1, size=(32, 1, 8, 8)).astype(np.float32)
    x = np.random.default_rng(1).uniform(0, 1, size=(16, 1, 8, 8)).astype(np.float32)
    module = torch.load(root / "net.pt", weights_only=False)
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()
    return Source(
        forms={"pt": root / "net.pt", "pt2": root / "net.pt2"},
        calibration=sample_dir(root / "calibration", set=rows),
        target="stm32f746-disco",
        rows=x,
        reference=reference,
        mean_error=0.02,
        agreement=0.8,
        flags=("--trust-model-code",),
    )


@pytest.mark.parametrize(
    ("framework", "form"),
    [("keras", "keras"), ("keras", "h5"), ("keras", "saved"), ("torch", "pt"), ("torch", "pt2")],
)
def test_each_form_builds_an_int8_tflm_project_that_agrees_with_its_source(
    framework: str, form: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Source = request.getfixturevalue(f"{framework}_source")
    assert_int8_project(
        source.forms[form], source.target, source.calibration, tmp_path / "bundle",
        source.rows, source.reference, mean_error=source.mean_error, agreement=source.agreement,
        extra=source.flags + source.form_flags.get(form, ()),
    )  # fmt: skip


@pytest.mark.parametrize(("framework", "form"), [("keras", "keras"), ("torch", "pt")])
def test_a_build_without_calibration_is_one_line(
    framework: str, form: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Source = request.getfixturevalue(f"{framework}_source")
    assert_calibration_required(source.forms[form], source.target, tmp_path / "b", *source.flags)
