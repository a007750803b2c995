"""The pure parts of MCU emulation: the harness's I/O image, its output protocol, source
selection by symbol name, and the boards per core."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from packager.backends.mcu import emulate as mcu_emulate
from packager.backends.mcu.backend import emulate_files, rendered_files
from packager.errors import UsageError, VerifyError

OUT = [(np.dtype(np.int8), (1, 2))]


def test_io_image_layout() -> None:
    blob = mcu_emulate.io_image(b"MODEL", [b"\x01\x02", b"\x03\x04"])
    magic, version, count, model_off, model_len, inputs_off, rec = struct.unpack_from("<7I", blob)
    assert (magic, version, count, model_len, rec) == (0x4F495045, 1, 2, 5, 2)
    assert blob[model_off:model_off + 5] == b"MODEL"
    assert inputs_off % 16 == 0
    assert blob[inputs_off:inputs_off + 4] == b"\x01\x02\x03\x04"


def test_io_image_too_large() -> None:
    with pytest.raises(UsageError, match="I/O window"):
        mcu_emulate.io_image(b"x" * (mcu_emulate.IO_KB * 1024), [b"\x00"])


def test_parse_output() -> None:
    text = "log line\nEP arena 600 2144\nEP run 0 200\nEP out 0 ff01\nEP done 1\n"
    outs, ticks, used, size = mcu_emulate.parse_output(text, OUT, 1)
    assert ticks == (200,) and (used, size) == (600, 2144)
    np.testing.assert_array_equal(outs[0][0], np.array([[-1, 1]], dtype=np.int8))


def test_parse_output_incomplete() -> None:
    with pytest.raises(VerifyError, match="did not finish 2 inferences"):
        mcu_emulate.parse_output("EP arena 1 2\nEP run 0 5\nEP out 0 0000\n", OUT, 2)


def test_parse_output_cpu_mismatch() -> None:
    text = "EP cpu-mismatch built=00000c27 running=00000c24\n"
    with pytest.raises(VerifyError, match=r"0xc27 \(cortex-m7\).*0xc24 \(cortex-m4\)"):
        mcu_emulate.parse_output(text, OUT, 1)


def test_parse_output_fault() -> None:
    with pytest.raises(VerifyError, match="fault cfsr=00010000"):
        mcu_emulate.parse_output("EP arena 1 2\nEP fault cfsr=00010000\n", OUT, 1)


def test_instructions_and_estimate() -> None:
    run = mcu_emulate.FirmwareRun(
        board="mps2-an386", kernels="reference", outputs=((np.zeros(1, np.int8),),),
        ticks=(200,), arena_used=1, arena_size=2, text=100, data=8, bss=50, freq_mhz=64,
        compiled=0, cached=0)
    doc = run.to_json()
    assert doc["instructions"] == [8000]  # 200 ticks x 40 instructions (25 MHz, 1 ns/insn)
    assert doc["latency_estimate_ms"] == 0.125
    assert doc["latency_estimate_basis"].startswith("estimate:")
    assert doc["linked"]["flash_bytes"] == 108 and doc["linked"]["ram_bytes"] == 58


def test_definers(tmp_path: Path) -> None:
    a = tmp_path / "a.cc"
    a.write_text("int Foo(int x);\nvoid Bar() { Foo(1); }\n")
    b = tmp_path / "b.cc"
    b.write_text("namespace t {\nint Foo(int x) {\n  return x;\n}\n}\n")
    assert mcu_emulate._definers([a, b], "Foo") == [b]


def test_boards_per_core() -> None:
    assert mcu_emulate.board_context("cortex-m4", 1024, 256, 4096)["board"] == "mps2-an386"
    assert mcu_emulate.board_context("cortex-m7", 1024, 320, 4096)["partno"] == 0xC27
    assert mcu_emulate.board_context("xtensa-lx7", 1024, 512, 4096) == {}
    names = {f.path for f in rendered_files("zephyr", update=False, board="mps2-an386")}
    assert {"emulate/main.cc", "emulate/startup_mps2-an386.c", "emulate/mps2-an386.ld"} <= names
    assert emulate_files(None) == ()


def test_tree_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEPACK_TFLM_TREE", raising=False)
    with pytest.raises(UsageError, match="no TensorFlow Lite Micro tree"):
        mcu_emulate.tflm_tree(None, "reference")
    with pytest.raises(UsageError, match="--kernels"):
        mcu_emulate.tflm_tree("/nonexistent", "other")


def test_default_kernels_cmsis_nn_on_cortex_m() -> None:
    """CMSIS-NN is the default kernel set on every Cortex-M core, reference elsewhere."""
    for core in ("cortex-m4", "cortex-m7", "cortex-m33", "cortex-m0plus"):
        assert mcu_emulate.default_kernels(core) == "cmsis-nn"
    assert mcu_emulate.default_kernels("xtensa-lx7") == "reference"
    assert set(mcu_emulate.KERNEL_SETS) == {"reference", "cmsis-nn"}


def test_generated_cmake_defaults_to_cmsis_nn() -> None:
    """The rendered CMake glue carries the core's default kernel set as a cache option that
    can be switched to reference; the Xtensa target's glue defaults to reference."""
    from packager.backends.base import BuildRequest
    from packager.backends.mcu.backend import McuBackend
    from packager.models.tflite import inspect_tflite
    from packager.render import render
    from packager.targets import resolve_target

    model = Path(__file__).resolve().parents[5] / "shared/testdata/tflm/hello_world_int8.tflite"
    if not model.is_file():
        pytest.skip(f"{model} missing")
    backend = McuBackend()
    for name, kernels in (("nrf52840-dk", "cmsis-nn"), ("stm32f746-disco", "cmsis-nn"),
                          ("esp32-s3", "reference")):
        target = resolve_target(name)
        request = BuildRequest(model=model, target=name)
        info = inspect_tflite(model)
        plan = backend.plan(request, info, target, backend.fit(request, info, target))
        assert plan.context_dict()["kernels"] == kernels
        glue = render("mcu/CMakeLists.txt.jinja", plan.context_dict())
        assert f'set(EDGEPACK_KERNELS "{kernels}" CACHE STRING' in glue
        assert 'if(EDGEPACK_KERNELS STREQUAL "cmsis-nn")\n  target_compile_definitions(' \
            'edgepack_model PUBLIC CMSIS_NN)' in glue


def test_proof_note_per_core() -> None:
    ok, note = mcu_emulate.proof_note("cortex-m4")
    assert ok and "mps2-an386" in note and "cmsis-nn kernels by default" in note
    ok, note = mcu_emulate.proof_note("xtensa-lx7")
    assert not ok
    assert "no ESP32-S3 (Xtensa LX7) toolchain or emulator is installable here" in note
    assert note.endswith("the project is rendered unproven")
    ok, note = mcu_emulate.proof_note("cortex-m33")
    assert not ok and "no emulated board for cortex-m33" in note
