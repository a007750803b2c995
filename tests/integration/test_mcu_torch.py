"""PyTorch (torch.save module, .pt2 program) -> fully int8 TFLite (litert-torch, PT2E) -> TFLM
project, through the CLI; the converted model is run in LiteRT and compared with PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import build_json, edgepack, litert_int8_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
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
    calibration = root / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    np.save(calibration / "set.npy", rng.uniform(0, 1, size=(32, 1, 8, 8)).astype(np.float32))
    return {
        "pt": root / "net.pt",
        "pt2": root / "net.pt2",
        "calibration": calibration,
        "module": root / "net.pt",
    }


@pytest.mark.parametrize("kind", ["pt", "pt2"])
def test_torch_to_int8_tflm_project(
    kind: str, torch_model: dict[str, Path], tmp_path: Path
) -> None:
    doc = build_json(
        str(torch_model[kind]),
        "--target",
        "stm32f746-disco",
        "--name",
        "net",
        "--calibration",
        str(torch_model["calibration"]),
        "--out",
        str(tmp_path / "bundle"),
    )
    bundle = Path(doc["bundle"])
    assert json.loads((bundle / "manifest.json").read_text())["model"]["format"] == "tflite"
    assert "AddFullyConnected" in (bundle / "src" / "op_resolver.h").read_text()
    tflite = next((bundle / "model").glob("*.tflite"))
    x = np.random.default_rng(1).uniform(0, 1, size=(16, 1, 8, 8)).astype(np.float32)
    module = torch.load(torch_model["module"], weights_only=False)
    with torch.no_grad():
        reference = module(torch.from_numpy(x)).numpy()
    converted = litert_int8_outputs(tflite, x)
    span = float(reference.max() - reference.min())
    assert np.abs(converted - reference).mean() < 0.02 * span
    assert float((converted.argmax(1) == reference.argmax(1)).mean()) >= 0.8
    assert edgepack("verify", str(bundle)).returncode == 0


def test_torch_without_calibration_is_one_line(
    torch_model: dict[str, Path], tmp_path: Path
) -> None:
    proc = edgepack(
        "build",
        str(torch_model["pt"]),
        "--target",
        "stm32f746-disco",
        "--out",
        str(tmp_path / "b"),
        check=False,
    )
    assert proc.returncode == 3
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--calibration" in errors[0]
    assert not (tmp_path / "b").exists()
