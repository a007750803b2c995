"""``edgepack targets show``: what it says about proving an MCU target's firmware."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ExitCode


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    out, _ = capsys.readouterr()
    assert isinstance(exited.value.code, int)
    return exited.value.code, out


def test_show_esp32_s3_says_unproven(capsys: pytest.CaptureFixture[str]) -> None:
    """No Xtensa toolchain or emulator is installable here: `targets show` says so."""
    code, out = _run(["targets", "show", "esp32-s3"], capsys)
    assert code == ExitCode.OK
    line = next(ln for ln in out.splitlines() if "not proven" in ln)
    assert "no ESP32-S3 (Xtensa LX7) toolchain or emulator is installable here" in line
    assert line.endswith("the project is rendered unproven")
    code, out = _run(["targets", "show", "esp32-s3", "--json"], capsys)
    proof = json.loads(out)["proof"]
    assert proof["emulated"] is False and "rendered unproven" in proof["note"]


def test_show_cortex_m_names_its_emulated_board(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(["targets", "show", "stm32f746-disco"], capsys)
    assert code == ExitCode.OK
    assert "proof before flash: firmware compiled, linked and run under qemu-system-arm on " \
        "mps2-an500 (cmsis-nn kernels by default)" in out
    code, out = _run(["targets", "show", "rpi4", "--json"], capsys)
    assert "proof" not in json.loads(out)  # Linux targets: no firmware to prove


def test_build_output_says_esp32_s3_unproven(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`edgepack build` for the ESP32-S3 renders the project and says it is unproven, in the
    summary and in the manifest."""
    model = Path(__file__).resolve().parents[3] / "shared/testdata/tflm/hello_world_int8.tflite"
    if not model.is_file():
        pytest.skip(f"{model} missing")
    out_dir = tmp_path / "esp"
    code, out = _run(["build", str(model), "--target", "esp32-s3", "--out", str(out_dir)], capsys)
    assert code == ExitCode.OK
    line = next(ln for ln in out.splitlines() if ln.startswith("proof:"))
    assert "not proven: no ESP32-S3 (Xtensa LX7) toolchain or emulator" in line
    assert line.endswith("the project is rendered unproven")
    proof = json.loads((out_dir / "manifest.json").read_text())["device"]["proof"]
    assert proof["emulated"] is False and "rendered unproven" in proof["note"]
    assert (out_dir / "esp-idf" / "main" / "idf_component.yml").is_file()  # rendered as before
