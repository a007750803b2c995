"""The canonical MCU example on its canonical board: a 300 KB int8 convolutional model (the size
of TFLite Micro's person-detection example, which upstream runs on nRF52840 boards) built for
nrf52840-dk with model updates on. The firmware runs the model from the active update slot, so
flash holds it once per slot; slot A's image is a file of the bundle, booted here by the
generated update module (host gcc + ctypes) from a simulated flash at the bundle's addresses."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from packager.backends.mcu.backend import update_slot_size
from packager.backends.mcu.manifest import McuSection
from packager.bundle.manifest import check_files, read_manifest
from packager.targets import McuTarget, resolve_target
from packager.tools import cc, gcc_arm
from tests.integration.conftest import edgepack
from tests.integration.mcu_models import conv_int8_tflite
from tests.integration.mcu_update_harness import Flash, Stub, load_stub

pytestmark = pytest.mark.integration

TARGET = "nrf52840-dk"
TFLM_DIR = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "tflm"
SLOT_LABELS = {"model in update slot A", "model in update slot B"}

needs_arm = pytest.mark.skipif(
    not gcc_arm.GXX.available(), reason="apt-get install gcc-arm-none-eabi binutils-arm-none-eabi"
)


@pytest.fixture(scope="module")
def conv300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = conv_int8_tflite(tmp_path_factory.mktemp("conv") / "person_sized.tflite")
    size = path.stat().st_size
    assert 290 * 1024 <= size <= 310 * 1024, size  # ~300 KB, like person_detect.tflite
    return path


@pytest.fixture(scope="module")
def built(conv300: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The bundle, built through the CLI as a user would (updates on: the default)."""
    out = tmp_path_factory.mktemp("bundle") / "conv"
    proc = edgepack("build", str(conv300), "--target", TARGET, "--out", str(out), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def header_defines(bundle: Path) -> dict[str, int]:
    text = (bundle / "src" / "model_update.h").read_text()
    return {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"#define (EP_UPDATE_DEFAULT_\w+) (0x[0-9a-f]+|\d+)u", text)
    }


def test_300kb_conv_model_builds_for_nrf52840_counting_the_model_once_per_slot(
    conv300: Path, built: tuple[Path, str]
) -> None:
    bundle, stdout = built
    size = conv300.stat().st_size
    slot = update_slot_size(size)
    # The printed budget: the model appears once per update slot and nowhere else.
    (flash_line,) = [ln for ln in stdout.splitlines() if ln.startswith("flash:")]
    assert flash_line.count("model") == 2
    assert "model in update slot A" in flash_line and "model in update slot B" in flash_line
    manifest = read_manifest(bundle)
    assert check_files(bundle, manifest) == []
    flash = next(r for r in manifest.fit.resources if r.name == "flash")
    parts = flash.needed_parts
    assert {k for k in parts if "model" in k} == SLOT_LABELS
    assert all(parts[k] == slot for k in SLOT_LABELS)
    assert 2 * size < 2 * slot < 2.6 * size  # "about twice the model" (+25 % headroom, header)
    assert flash.fits and flash.needed_bytes <= flash.available_bytes
    assert flash.needed_bytes == sum(parts.values())


def test_slot_a_image_is_flashable_and_boots_in_the_update_module(
    conv300: Path, built: tuple[Path, str], tmp_path: Path
) -> None:
    bundle, stdout = built
    model = conv300.read_bytes()
    manifest = read_manifest(bundle)
    slots = manifest.device_as(McuSection).update_slots
    assert slots is not None
    image_path = bundle / slots.slot_a_image
    assert slots.slot_a_image in {f.path for f in manifest.files}
    defines = header_defines(bundle)
    slot_a = defines["EP_UPDATE_DEFAULT_SLOT_A_ADDR"]
    slot_b = defines["EP_UPDATE_DEFAULT_SLOT_B_ADDR"]
    slot_size = defines["EP_UPDATE_DEFAULT_SLOT_SIZE"]
    header_area = defines["EP_UPDATE_DEFAULT_HEADER_AREA"]
    assert int(slots.slot_a_addr, 16) == slot_a and int(slots.slot_b_addr, 16) == slot_b
    assert f"flash {slots.slot_a_image} at {slots.slot_a_addr}" in stdout
    assert slots.slot_a_addr in (bundle / "README.md").read_text()
    # Both slots inside the 1 MB flash, below the reserved top, not overlapping.
    spec = resolve_target(TARGET).spec
    assert isinstance(spec, McuTarget)
    top = (spec.memory.flash_kb - spec.memory.flash_reserved_kb) * 1024
    assert slot_a + slot_size <= slot_b and slot_b + slot_size <= top

    image = image_path.read_bytes()
    assert len(image) == slot_size and image[: len(model)] == model
    header = image[slot_size - header_area : slot_size - header_area + 64]
    magic, fmt, hsize, version, sequence, length, crc = struct.unpack_from("<IHHIIII", header)
    assert (magic, fmt, hsize, version, sequence, length) == (0x554D5045, 1, 64, 1, 1, len(model))
    assert crc == zlib.crc32(model)

    # The generated update module boots slot A from flash exactly as the factory writes it.
    library = tmp_path / "libmodel_update.so"
    cc.shared_library([bundle / "src" / "model_update.c"], library, bundle / "src")
    lib = load_stub(library)
    flash = Flash(size=spec.memory.flash_kb * 1024)
    flash.data[slot_a : slot_a + len(image)] = image

    def boot() -> Stub:
        return Stub(lib, flash, slot_addr=(slot_a, slot_b), slot_size=slot_size,
                    header_area=header_area)

    device = boot()
    assert device.boot_result == 0 and device.active() == 0 and device.verify(0) == 0
    assert device.slot_bytes(0, len(model)) == model
    # ... and the first over-the-air update goes to slot B, then wins at the next boot.
    update = (TFLM_DIR / "hello_world_int8.tflite").read_bytes()
    assert device.update(update, 2, chunk=4096) == 1
    again = boot()
    assert again.active() == 1 and again.slot_bytes(1, len(update)) == update


@needs_arm
def test_firmware_does_not_compile_the_model_in(built: tuple[Path, str], tmp_path: Path) -> None:
    bundle, _ = built
    spec = resolve_target(TARGET).spec
    assert isinstance(spec, McuTarget)
    flags = gcc_arm.cpu_flags(spec.mcu.core, spec.mcu.fpu)
    obj = tmp_path / "model_data.o"
    gcc_arm.compile_cxx(bundle / "src" / "model_data.cc", obj, flags, bundle / "src")
    symbols = gcc_arm.symbols(obj)
    assert "g_model" not in symbols and "edgepack_model_from_slots" in symbols
    sizes = [int(m.group(1)) for m in re.finditer(r"^\s*\d+:\s+\S+\s+(\d+)\s", symbols, re.M)]
    assert sum(sizes) < 1024  # boot glue only: the 300 KB model lives in the slots


def test_dual_slots_that_do_not_fit_name_the_slots_and_suggest_update_off(
    conv300: Path, tmp_path: Path
) -> None:
    # The same board with 640 KB of flash: two slots (~760 KiB) cannot fit, one copy can.
    small = tmp_path / "nrf-640.toml"
    small.write_text(
        'name = "nrf-640"\ndescription = "640 KB flash part"\ndevice_class = "mcu"\n'
        '[mcu]\ncore = "cortex-m4"\nfreq_mhz = 64\nfpu = "fpv4-sp-d16"\n'
        "[memory]\nram_kb = 256\nflash_kb = 640\nram_reserved_kb = 24\nflash_reserved_kb = 64\n"
        '[runtime]\nsdk = "cmake"\nboard = "generic"\n'
    )
    out = tmp_path / "out"
    proc = edgepack("build", str(conv300), "--target", str(small), "--out", str(out),
                    check=False)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "model-update slots" in line and "--opt update=off" in line
    assert "Without updates flash needs" in line and "(fits)" in line
    assert not out.exists()
    proc = edgepack("build", str(conv300), "--target", str(small), "--out", str(out),
                    "--opt", "update=off", "--json")
    document = json.loads(proc.stdout)
    flash = next(r for r in document["fit"]["resources"] if r["name"] == "flash")
    assert flash["needed_parts"]["model"] == conv300.stat().st_size
    assert not (out / "model" / "model_slot_a.bin").exists()
