"""The MCU backend's pure parts and its refusals (arena measured with the TFLM interpreter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from packager.backends.base import BuildRequest
from packager.backends.mcu.backend import (
    TFLM_CORE_BYTES,
    UPDATE_SECTOR,
    McuBackend,
    check_static_shapes,
    chosen_arena,
    flash_map,
    hex_lines,
    measure_arena,
    slot_header,
    slot_image,
    tflm_runs,
    update_slot_size,
)
from packager.build import build
from packager.errors import ExitCode, FitError, InputError, UnsupportedError, UsageError
from packager.fit import enforce
from packager.models.tflite import analyze_tflite, inspect_tflite
from packager.targets import parse_target, resolve_target

TFLM = Path(__file__).resolve().parents[5] / "shared" / "testdata" / "tflm"


def small_target(ram_kb: int, flash_kb: int) -> object:
    return parse_target(
        {
            "name": "tiny",
            "description": "test part",
            "device_class": "mcu",
            "mcu": {"core": "cortex-m4", "freq_mhz": 64, "fpu": "fpv4-sp-d16"},
            "memory": {"ram_kb": ram_kb, "flash_kb": flash_kb, "ram_reserved_kb": 8,
                       "flash_reserved_kb": 16},
            "runtime": {"sdk": "cmake", "board": "tiny", "arena_margin_percent": 10},
        },
        "tiny.toml",
    )


@pytest.mark.parametrize(("measured", "margin"), [(1936, 10), (7584, 16), (16, 0), (1001, 7)])
def test_chosen_arena_is_margin_rounded_up_to_16(measured: int, margin: int) -> None:
    chosen = chosen_arena(measured, margin)
    assert chosen % 16 == 0
    assert measured * (100 + margin) / 100 <= chosen < measured * (100 + margin) / 100 + 16


def test_hex_lines_round_trip() -> None:
    data = bytes(range(256)) * 3 + b"\x07"
    text = " ".join(hex_lines(data))
    assert bytes(int(tok.rstrip(","), 16) for tok in text.split()) == data


def test_measured_arena_is_the_smallest_that_runs() -> None:
    data = (TFLM / "hello_world_int8.tflite").read_bytes()
    measured = measure_arena(data, "hello_world_int8.tflite")
    assert tflm_runs(data, measured, 1)
    assert not tflm_runs(data, measured - 16, 1)


def test_fit_report_names_parts_and_sources() -> None:
    path = TFLM / "micro_speech_quantized.tflite"
    target = resolve_target("nrf52840-dk")
    report = McuBackend().fit(BuildRequest(model=path, target="nrf52840-dk"),
                              inspect_tflite(path), target)
    ram, flash = report.resources
    parts = dict(flash.needed_parts)
    # Updates on (the default): the model is stored once per update slot and nowhere else.
    slot = update_slot_size(path.stat().st_size)
    assert {k: v for k, v in parts.items() if "model" in k} == {
        "model in update slot A": slot, "model in update slot B": slot}
    assert parts["TFLM framework (estimate)"] == TFLM_CORE_BYTES
    assert {k for k in parts if k.startswith("kernel ")} == {
        f"kernel {op} (estimate)" for op in
        ("DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "RESHAPE", "SOFTMAX")
    }
    assert "code_size.md" in flash.estimate_source
    assert ram.available_bytes == 256 * 1024 and report.fits
    assert dict(ram.needed_parts)["stack/IO allowance (memory.ram_reserved_kb)"] == 24 * 1024


@pytest.mark.parametrize(
    ("ram_kb", "flash_kb", "resource"), [(32, 1024, "ram"), (512, 24, "flash")]
)
def test_too_large_is_refused_naming_both_numbers(
    ram_kb: int, flash_kb: int, resource: str
) -> None:
    path = TFLM / "simple_add_model.tflite"
    target = small_target(ram_kb, flash_kb)
    request = BuildRequest(model=path, target="tiny.toml", options=(("update", "off"),))
    report = McuBackend().fit(request, inspect_tflite(path), target)  # type: ignore[arg-type]
    bad = next(r for r in report.resources if not r.fits)
    assert bad.name == resource
    with pytest.raises(FitError) as err:
        enforce(report, force=False, model_label=path.name)
    line = err.value.one_line()
    assert f"{resource} needs" in line and "the target has" in line
    assert f"{bad.needed_bytes / 1024:.1f} KiB" in line
    assert f"{bad.available_bytes / 1024:.1f} KiB" in line


def test_float_model_on_int8_only_target_is_a_clear_refusal() -> None:
    import tflite_micro

    sine = Path(tflite_micro.__file__).parent / "python" / "tflite_micro" / "sine_float.tflite"
    if not sine.is_file():
        pytest.skip("tflite-micro no longer ships sine_float.tflite")
    target = resolve_target("stm32f746-disco")
    with pytest.raises(UnsupportedError) as err:
        McuBackend().fit(BuildRequest(model=sine, target="stm32f746-disco"),
                         inspect_tflite(sine), target)
    line = err.value.one_line()
    assert "float tensors" in line and "int8-only" in line and "--calibration" in line


def test_corrupt_model_leaves_no_project(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tflite"
    broken.write_bytes((TFLM / "hello_world_int8.tflite").read_bytes()[:900])
    out = tmp_path / "out" / "bundle"
    with pytest.raises(InputError) as err:
        build(BuildRequest(model=broken, target="nrf52840-dk", out=out))
    assert "broken.tflite" in err.value.one_line()
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_plan_is_deterministic_and_sdk_specific() -> None:
    path = TFLM / "hello_world_int8.tflite"
    backend = McuBackend()
    files = {}
    for name in ("nrf52840-dk", "stm32f746-disco", "esp32-s3"):
        target = resolve_target(name)
        request = BuildRequest(model=path, target=name)
        info = inspect_tflite(path)
        report = backend.fit(request, info, target)
        first = backend.plan(request, info, target, report)
        assert first == backend.plan(request, info, target, report)
        files[name] = {f.path for f in first.rendered}
    assert "zephyr/prj.conf" in files["nrf52840-dk"]
    assert "esp-idf/main/idf_component.yml" in files["esp32-s3"]
    assert not any(p.startswith(("zephyr/", "esp-idf/")) for p in files["stm32f746-disco"])
    assert all("src/model_update.c" in f and "cmake/CMakeLists.txt" in f for f in files.values())


def test_update_off_drops_stub_and_slots() -> None:
    path = TFLM / "hello_world_int8.tflite"
    target = resolve_target("nrf52840-dk")
    request = BuildRequest(model=path, target="nrf52840-dk", options=(("update", "off"),))
    info = inspect_tflite(path)
    backend = McuBackend()
    report = backend.fit(request, info, target)
    assert not any("update" in k for k, _ in report.resources[1].needed_parts)
    plan = backend.plan(request, info, target, report)
    assert "src/model_update.c" not in {f.path for f in plan.rendered}
    with pytest.raises(UsageError):
        backend.fit(BuildRequest(model=path, target="x", options=(("bogus", "1"),)), info, target)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (("updte", "off"), "--opt updte: not an option of MCU targets (did you mean 'update'?); "
         "MCU options: update=on|off, emulate=on|off"),
        (("bogus", "1"), "--opt bogus: not an option of MCU targets "
         "(MCU options: update=on|off, emulate=on|off)"),
        (("update", "no"), "--opt update=no: give update=on|off "
         "(MCU options: update=on|off, emulate=on|off)"),
    ],
)
def test_a_bad_option_is_one_usage_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: tuple[str, str], expected: str
) -> None:
    """Exit 2 (a command-line mistake, as for Jetson), not 10; the build reads nothing, writes
    nothing."""
    import json

    from packager.cli import main

    out = tmp_path / "b"
    with pytest.raises(SystemExit) as exited:
        main(["build", str(tmp_path / "absent.tflite"), "--target", "nrf52840-dk",
              "--out", str(out), "--opt", "=".join(option), "--json"])
    assert exited.value.code == ExitCode.USAGE
    document = json.loads(capsys.readouterr().out)
    assert (document["error"], document["message"]) == ("usage", expected)
    assert not out.exists()


def test_slot_header_is_the_update_modules_layout() -> None:
    import hashlib
    import struct
    import zlib

    model = (TFLM / "hello_world_int8.tflite").read_bytes()
    header = slot_header(model)
    assert len(header) == 64
    fields = struct.unpack("<IHHIIII32s4sI", header)
    assert fields[:7] == (0x554D5045, 1, 64, 1, 1, len(model), zlib.crc32(model))
    assert fields[7] == hashlib.sha256(model).digest() and fields[8] == bytes(4)
    assert fields[9] == zlib.crc32(header[:60])
    image = slot_image(model, 8192, 4096)
    assert len(image) == 8192 and image[: len(model)] == model
    assert image[len(model) : 4096] == b"\xff" * (4096 - len(model))
    assert image[4096:4160] == header and image[4160:] == b"\xff" * (8192 - 4160)
    with pytest.raises(ValueError):
        slot_image(model, 4096 + 1024, 4096)


@pytest.mark.parametrize(("name", "base"), [("nrf52840-dk", 0), ("stm32f746-disco", 0x08000000)])
def test_update_slots_sit_below_the_reserved_top_of_flash(name: str, base: int) -> None:
    spec = resolve_target(name).spec
    size = 300 * 1024
    fmap = flash_map(spec, size)  # type: ignore[arg-type]
    top = base + (1024 - spec.memory.flash_reserved_kb) * 1024  # type: ignore[union-attr]
    assert fmap.slot_size == update_slot_size(size) and fmap.header_area == UPDATE_SECTOR
    assert fmap.slot_a_addr % UPDATE_SECTOR == 0 and fmap.slot_a_addr >= base
    assert fmap.slot_b_addr == fmap.slot_a_addr + fmap.slot_size
    assert top - UPDATE_SECTOR < fmap.slot_b_addr + fmap.slot_size <= top
    assert fmap.firmware_limit == fmap.slot_a_addr


def test_dual_slots_too_large_name_the_slots_and_suggest_update_off() -> None:
    path = TFLM / "hello_world_int8.tflite"
    target = small_target(512, 40)  # 24 KiB usable: one copy of the model fits, two slots not
    info = inspect_tflite(path)
    with pytest.raises(FitError) as err:
        McuBackend().fit(BuildRequest(model=path, target="tiny.toml"), info, target)  # type: ignore[arg-type]
    line = err.value.one_line()
    assert "the two model-update slots take 16.0 KiB" in line
    assert "--opt update=off" in line and "(fits)" in line
    # --force builds anyway (enforce warns), and with updates off it fits
    forced = BuildRequest(model=path, target="tiny.toml", force=True)
    assert not McuBackend().fit(forced, info, target).fits  # type: ignore[arg-type]
    off = BuildRequest(model=path, target="tiny.toml", options=(("update", "off"),))
    assert McuBackend().fit(off, info, target).fits  # type: ignore[arg-type]


def test_update_on_writes_slot_a_image_and_no_model_array(tmp_path: Path) -> None:
    path = TFLM / "hello_world_int8.tflite"
    target = resolve_target("nrf52840-dk")
    request = BuildRequest(model=path, target="nrf52840-dk")
    info = inspect_tflite(path)
    backend = McuBackend()
    plan = backend.plan(request, info, target, backend.fit(request, info, target))
    result = backend.execute(plan, tmp_path, tmp_path)
    assert result.device is not None
    slots = result.device["update_slots"]
    image = (tmp_path / slots["slot_a_image"]).read_bytes()
    assert image[: path.stat().st_size] == path.read_bytes()
    assert slots["slot_a_image"] in result.files
    source = (tmp_path / "src" / "model_data.cc").read_text()
    assert "g_model" not in source and "edgepack_model_from_slots" in source
    header = (tmp_path / "src" / "model_update.h").read_text()
    assert f"#define EP_UPDATE_DEFAULT_SLOT_A_ADDR {slots['slot_a_addr']}u" in header


def test_no_emulate_flag_skips_the_proof_even_with_a_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`edgepack build --no-emulate` is `--opt emulate=off`: with a TFLM tree named (a bogus one,
    which the proof would fail on) the build still writes the bundle and records the skip."""
    import json

    from packager.cli import main

    monkeypatch.setenv("EDGEPACK_TFLM_TREE", str(tmp_path / "no-such-tree"))
    out = tmp_path / "b"
    with pytest.raises(SystemExit) as exited:
        main(["build", str(TFLM / "hello_world_int8.tflite"), "--target", "nrf52840-dk",
              "--out", str(out), "--opt", "update=off", "--no-emulate", "--json"])
    assert exited.value.code == 0
    proof = json.loads((out / "manifest.json").read_text())["device"]["proof"]
    assert proof == {"emulated": False, "note": "skipped: --opt emulate=off"}


def test_fit_and_plan_share_one_measurement() -> None:
    """The arena bisection (real TFLM runs) happens once per build: plan reuses fit's."""
    from packager.backends.mcu import backend as mcu

    path = TFLM / "micro_speech_quantized.tflite"
    target = resolve_target("stm32f746-disco")
    request = BuildRequest(model=path, target="stm32f746-disco")
    info = inspect_tflite(path)
    mcu.measure.cache_clear()
    mcu.measure_arena.cache_clear()
    backend = McuBackend()
    report = backend.fit(request, info, target)
    backend.plan(request, info, target, report)
    assert mcu.measure_arena.cache_info().misses == 1
    assert (mcu.measure.cache_info().misses, mcu.measure.cache_info().hits) == (1, 1)


def _keras_tflite(shape: tuple[int | None, ...]) -> bytes:
    """A real converted model: Keras Input(shape) -> Dense(3), dynamic batch, through
    tf.lite.TFLiteConverter (which stores each dynamic dim as 1, -1 in shape_signature)."""
    tf = pytest.importorskip("tensorflow")
    inputs = tf.keras.Input(shape=shape)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(3)(inputs))
    data: bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    return data


def test_a_dynamic_dim_past_the_batch_is_refused_and_a_dynamic_batch_is_not() -> None:
    """TFLite Micro runs the stored shape, where a dynamic dim is 1: a dynamic sequence length
    would silently run as length 1; a dynamic batch runs as the batch of 1 an MCU serves."""
    sequence = analyze_tflite(_keras_tflite((None, 4)), "seq.tflite")
    assert sequence.inputs[0].signature == (-1, -1, 4)
    with pytest.raises(UnsupportedError) as err:
        check_static_shapes(sequence, "seq.tflite")
    line = err.value.one_line()
    assert line.startswith("seq.tflite: input ") and "dynamic dim at axis 1" in line
    assert "\n" not in line
    check_static_shapes(analyze_tflite(_keras_tflite((4,)), "batch.tflite"), "batch.tflite")
