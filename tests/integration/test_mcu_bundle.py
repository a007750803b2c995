"""MCU bundles against the real things: Debian's arm-none-eabi-gcc for the target CPU, the
TensorFlow Lite Micro interpreter, the desktop TFLite (LiteRT) reference, host gcc + ctypes."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from packager.backends.base import BuildRequest
from packager.backends.mcu.backend import UPDATE_STUB_BYTES, McuBackend, slot_image
from packager.bundle.manifest import (
    BundleMeta,
    FitSection,
    ModelSection,
    TargetInfo,
    Tensor,
    check_files,
    read_manifest,
    write_manifest,
)
from packager.models.tflite import inspect_tflite
from packager.targets import McuTarget, resolve_target
from packager.tools import cc, gcc_arm
from tests.integration.conftest import edgepack
from tests.integration.mcu_update_harness import (
    EP_ERR_CRC,
    EP_ERR_HASH,
    EP_ERR_LENGTH,
    EP_ERR_NO_MODEL,
    Flash,
    Stub,
    load_stub,
)

pytestmark = pytest.mark.integration

TFLM_DIR = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "tflm"
MODELS = sorted(p.name for p in TFLM_DIR.glob("*.tflite"))
TARGETS = ("nrf52840-dk", "stm32f746-disco")

needs_arm = pytest.mark.skipif(
    not gcc_arm.GXX.available(), reason="apt-get install gcc-arm-none-eabi binutils-arm-none-eabi"
)


def build_bundle(
    model: Path, target: str, out: Path, options: tuple[tuple[str, str], ...] = ()
) -> Path:
    """The backend through the same steps the build core takes (fit, plan, execute, manifest)."""
    loaded = resolve_target(target)
    request = BuildRequest(model=model, target=target, options=options)
    info = inspect_tflite(model)
    backend = McuBackend()
    report = backend.fit(request, info, loaded)
    plan = backend.plan(request, info, loaded, report)
    out.mkdir(parents=True)
    result = backend.execute(plan, out, out)
    write_manifest(out, BundleMeta(
        name=plan.bundle_name, version=plan.version,
        target=TargetInfo(name=loaded.name, device_class=loaded.device_class),
        model=ModelSection(source=model.name, format=info.format, digest=info.digest,
                           size_bytes=info.size_bytes,
                           inputs=tuple(Tensor(name=t.name, dtype=t.dtype, shape=t.shape)
                                        for t in info.inputs),
                           outputs=tuple(Tensor(name=t.name, dtype=t.dtype, shape=t.shape)
                                         for t in info.outputs)),
        fit=FitSection.from_report(report), device=result.device,
    ))
    return out


def _every_bundle(
    root: Path, options: tuple[tuple[str, str], ...] = ()
) -> dict[tuple[str, str], Path]:
    """{(model, target): bundle} for every TFLM test model on every MCU target."""
    if not MODELS:
        pytest.skip(f"no TFLM test models in {TFLM_DIR}")
    return {
        (m, t): build_bundle(TFLM_DIR / m, t, root / f"{t}-{m}", options)
        for m in MODELS
        for t in TARGETS
    }


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    return _every_bundle(tmp_path_factory.mktemp("mcu"))


@pytest.fixture(scope="module")
def bundles_update_off(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Without model updates the model is compiled into the firmware (g_model)."""
    return _every_bundle(tmp_path_factory.mktemp("mcu-noupdate"), (("update", "off"),))


def settings_value(bundle: Path, name: str) -> int:
    text = (bundle / "src" / "model_settings.h").read_text()
    match = re.search(rf"constexpr size_t {name} = (\d+);", text)
    assert match, name
    return int(match.group(1))


# ---- the model array, through the cross-compiler -------------------------------------------


@needs_arm
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", MODELS)
def test_model_array_compiled_for_target_equals_tflite(
    bundles_update_off: dict[tuple[str, str], Path], model: str, target: str, tmp_path: Path
) -> None:
    bundle = bundles_update_off[(model, target)]
    spec = resolve_target(target).spec
    assert isinstance(spec, McuTarget)
    flags = (*gcc_arm.cpu_flags(spec.mcu.core, spec.mcu.fpu), "-fdata-sections")
    obj = tmp_path / "model_data.o"
    gcc_arm.compile_cxx(bundle / "src" / "model_data.cc", obj, flags, bundle / "src")
    expected = (TFLM_DIR / model).read_bytes()

    symbols = gcc_arm.symbols(obj)
    sizes = {
        m.group(2): int(m.group(1))
        for m in re.finditer(r"\s(\d+) OBJECT\s.*\s(\w+)$", symbols, re.M)
    }
    assert sizes["g_model"] == len(expected)
    headers = gcc_arm.READELF.run(["-SW", obj]).stdout.decode()
    section = next(ln for ln in headers.splitlines() if ".rodata.g_model " in ln + " ")
    assert int(section.split()[-1]) >= 16  # the section's alignment (alignas(16))
    arch = gcc_arm.READELF.run(["-A", obj]).stdout.decode()
    assert ("v7E-M" in arch) and (("FP" in arch) if spec.mcu.fpu != "none" else True)

    raw = tmp_path / "g_model.bin"
    gcc_arm.dump_section(obj, ".rodata.g_model", raw)
    assert raw.read_bytes() == expected
    gcc_arm.dump_section(obj, ".rodata.g_model_len", raw)
    assert struct.unpack("<I", raw.read_bytes()) == (len(expected),)


# ---- the resolver, against an independent parse ----------------------------------------------


def schema_ops(model: bytes) -> set[str]:
    """Operator names via the schema module shipped in tflite-micro (not the backend's parser)."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if isinstance(v, int)}
    root = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(model, 0))
    used = {op.opcodeIndex for sg in root.subgraphs for op in sg.operators}
    out = set()
    for index in used:
        code = root.operatorCodes[index]
        out.add(names[max(code.builtinCode, code.deprecatedBuiltinCode)])
    return out


def method_to_op(method: str) -> str:
    """AddDepthwiseConv2D -> DEPTHWISE_CONV_2D, AddUnidirectionalSequenceLSTM -> ..._LSTM."""
    body = method.removeprefix("Add")
    body = re.sub(r"(?<=[a-z])(?=[A-Z0-9])", "_", body)
    return body.upper()


@pytest.mark.parametrize("model", MODELS)
def test_resolver_registers_exactly_the_models_ops(
    bundles: dict[tuple[str, str], Path], model: str
) -> None:
    text = (bundles[(model, TARGETS[0])] / "src" / "op_resolver.h").read_text()
    methods = re.findall(r"resolver\.(Add\w+)\(\)", text)
    size = int(re.search(r"MicroMutableOpResolver<(\d+)>", text).group(1))  # type: ignore[union-attr]
    expected = schema_ops((TFLM_DIR / model).read_bytes())
    assert {method_to_op(m) for m in methods} == expected
    assert size == len(methods) == len(expected)


# ---- arena and outputs in the real TFLM interpreter --------------------------------------------


def tflm(model: bytes, arena: int) -> object:
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(model, arena_size=arena)


def tflm_run(model: bytes, arena: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
    interpreter = tflm(model, arena)
    for i, x in enumerate(inputs):
        interpreter.set_input(x, i)  # type: ignore[attr-defined]
    interpreter.invoke()  # type: ignore[attr-defined]
    outputs = []
    i = 0
    while True:
        try:
            outputs.append(np.array(interpreter.get_output(i)))  # type: ignore[attr-defined]
        except (IndexError, RuntimeError, ValueError):
            return outputs
        i += 1
        if i > 16:
            return outputs


def _run_child(model: bytes, arena: int, inputs: list[np.ndarray]) -> None:
    import faulthandler
    import os

    faulthandler.disable()
    try:
        tflm_run(model, arena, inputs)
    except (RuntimeError, ValueError):
        os._exit(1)
    os._exit(0)


def tflm_fails(model: bytes, arena: int, inputs: list[np.ndarray]) -> bool:
    """In a forked child: TFLM sometimes segfaults on a too-small arena instead of failing."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(
        target=_run_child, args=(model, arena, inputs)
    )
    child.start()
    child.join()
    return child.exitcode != 0


def reference_run(model: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # TFLM runs reference kernels; the desktop's optimized kernels round differently (measured:
    # up to 4 LSB on micro_speech's softmax), so compare against its reference kernels.
    interpreter = Interpreter(
        model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF
    )
    interpreter.allocate_tensors()
    for detail, x in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], x)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def sample_inputs(model: bytes, seed: int) -> list[np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=model).get_input_details()
    rng = np.random.default_rng(seed)
    out = []
    for d in details:
        info = np.iinfo(d["dtype"])
        out.append(
            rng.integers(info.min, info.max, size=d["shape"], endpoint=True, dtype=d["dtype"])
        )
    return out


@pytest.mark.parametrize("model", MODELS)
def test_tflm_runs_in_generated_arena_and_matches_reference(
    bundles: dict[tuple[str, str], Path], model: str
) -> None:
    data = (TFLM_DIR / model).read_bytes()
    for target in TARGETS:
        arena = settings_value(bundles[(model, target)], "kTensorArenaSize")
        for seed in range(3):
            inputs = sample_inputs(data, seed)
            got = tflm_run(data, arena, inputs)
            want = reference_run(data, inputs)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and g.dtype == w.dtype
                assert np.max(np.abs(g.astype(np.int32) - w.astype(np.int32))) <= 1


@pytest.mark.parametrize("model", MODELS)
def test_generated_arena_is_measured_plus_margin_and_below_fails(
    bundles: dict[tuple[str, str], Path], model: str
) -> None:
    data = (TFLM_DIR / model).read_bytes()
    bundle = bundles[(model, TARGETS[0])]
    measured = settings_value(bundle, "kTensorArenaMeasured")
    chosen = settings_value(bundle, "kTensorArenaSize")
    assert chosen % 16 == 0 and measured * 1.10 <= chosen < measured * 1.10 + 16
    inputs = sample_inputs(data, 0)
    assert not tflm_fails(data, measured, inputs)  # the measurement is enough ...
    assert tflm_fails(data, measured - 16, inputs)  # ... and tight to 16 bytes
    assert tflm_fails(data, measured // 2, inputs)  # well below fails


def test_hello_world_approximates_sine(bundles: dict[tuple[str, str], Path]) -> None:
    bundle = bundles[("hello_world_int8.tflite", TARGETS[0])]
    settings = (bundle / "src" / "model_settings.h").read_text()

    def const(name: str) -> float:
        return float(re.search(rf"{name} = (-?[\d.e+-]+)f?;", settings).group(1))  # type: ignore[union-attr]

    data = (TFLM_DIR / "hello_world_int8.tflite").read_bytes()
    arena = settings_value(bundle, "kTensorArenaSize")
    errors = []
    for x in np.linspace(0.0, 2 * math.pi, 40):
        q = int(np.clip(round(x / const("kInput0Scale")) + const("kInput0ZeroPoint"), -128, 127))
        (out,) = tflm_run(data, arena, [np.array([[q]], dtype=np.int8)])
        y = const("kOutput0Scale") * (int(out.reshape(-1)[0]) - const("kOutput0ZeroPoint"))
        errors.append(abs(y - math.sin(x)))
    assert max(errors) < 0.2 and float(np.mean(errors)) < 0.1


# ---- the whole CLI path ---------------------------------------------------------------------


def test_cli_build_writes_a_verified_project(tmp_path: Path) -> None:
    out = tmp_path / "hw"
    proc = edgepack(
        "build",
        str(TFLM_DIR / "hello_world_int8.tflite"),
        "--target",
        "nrf52840-dk",
        "--out",
        str(out),
        "--json",
    )
    document = json.loads(proc.stdout)
    assert document["mcu"]["arena_bytes"] == settings_value(out, "kTensorArenaSize")
    manifest = read_manifest(out)
    assert check_files(out, manifest) == []
    listed = {f.path for f in manifest.files}
    assert {
        "src/model_data.cc",
        "src/op_resolver.h",
        "zephyr/prj.conf",
        "model/hello_world_int8.tflite",
    } <= listed
    again = tmp_path / "again"
    edgepack(
        "build",
        str(TFLM_DIR / "hello_world_int8.tflite"),
        "--target",
        "nrf52840-dk",
        "--out",
        str(again),
    )
    assert (again / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_cli_refuses_a_model_too_large_with_both_numbers(tmp_path: Path) -> None:
    small = tmp_path / "tiny-m0.toml"
    small.write_text(
        'name = "tiny-m0"\ndescription = "32 KB RAM part"\ndevice_class = "mcu"\n'
        '[mcu]\ncore = "cortex-m0plus"\nfreq_mhz = 48\n'
        "[memory]\nram_kb = 32\nflash_kb = 256\nram_reserved_kb = 8\nflash_reserved_kb = 32\n"
        '[runtime]\nsdk = "cmake"\nboard = "generic"\n'
    )
    out = tmp_path / "out"
    proc = edgepack(
        "build",
        str(TFLM_DIR / "simple_add_model.tflite"),
        "--target",
        str(small),
        "--out",
        str(out),
        check=False,
    )
    assert proc.returncode == 5
    line = proc.stderr.strip().splitlines()[-1]
    assert "ram needs" in line and "the target has 32.0 KiB" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [small]


# ---- model-update stub: host gcc + ctypes ------------------------------------------------------


@pytest.fixture(scope="module")
def stub_lib(
    bundles: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory
) -> object:
    src = bundles[(MODELS[0], TARGETS[0])] / "src"
    library = tmp_path_factory.mktemp("stub") / "libmodel_update.so"
    cc.shared_library([src / "model_update.c"], library, src)
    return load_stub(library)


MODEL_V1 = (TFLM_DIR / "hello_world_int8.tflite").read_bytes() if MODELS else b""
MODEL_V2 = (TFLM_DIR / "simple_add_model.tflite").read_bytes() if MODELS else b""


@pytest.fixture
def installed(stub_lib: object) -> Iterator[tuple[object, Flash]]:
    """A device as the factory flashes it: slot 0 (A) holds MODEL_V1 written from the image
    edgepack builds for slot A, and the update module boots it as verified and active."""
    flash = Flash(size=2 * Stub.SLOT_SIZE)
    assert Stub(stub_lib, flash).boot_result == EP_ERR_NO_MODEL  # type: ignore[arg-type]
    flash.data[0 : Stub.SLOT_SIZE] = slot_image(MODEL_V1, Stub.SLOT_SIZE, Stub.HEADER_AREA)
    device = Stub(stub_lib, flash)  # type: ignore[arg-type]
    assert device.boot_result == 0 and device.verify(0) == 0
    yield stub_lib, flash


def assert_boots(lib: object, flash: Flash, allowed: dict[int, bytes]) -> int:
    """Reboot on ``flash`` (power back on): a verified model is active and is one of ``allowed``
    (slot -> model bytes). Returns the active slot."""
    flash.cut_after = None
    device = Stub(lib, flash)  # type: ignore[arg-type]
    slot = device.active()
    assert slot in allowed, f"active slot {slot}, allowed {sorted(allowed)}"
    assert device.verify(slot) == 0
    assert device.slot_bytes(slot, len(allowed[slot])) == allowed[slot]
    return slot


def test_update_good_switches_slots_and_survives_reboot(installed: tuple[object, Flash]) -> None:
    lib, flash = installed
    device = Stub(lib, flash)  # type: ignore[arg-type]
    assert device.active() == 0
    assert device.update(MODEL_V2, 2, chunk=100) == 1
    assert device.active() == 1
    assert assert_boots(lib, flash, {1: MODEL_V2}) == 1
    # and a third version goes back into slot 0, leaving v2 as the fallback
    assert Stub(lib, flash).update(MODEL_V1, 3) == 0  # type: ignore[arg-type]
    assert assert_boots(lib, flash, {0: MODEL_V1}) == 0


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"corrupt_chunk": 3}, EP_ERR_CRC),
        ({"length": len(MODEL_V2) + 1}, EP_ERR_LENGTH),
        ({"length": len(MODEL_V2) - 1}, EP_ERR_LENGTH),
        ({"sha": hashlib.sha256(b"another model").digest()}, EP_ERR_HASH),
        ({"crc": 0x12345678}, EP_ERR_CRC),
        ({"length": Stub.SLOT_SIZE}, EP_ERR_LENGTH),
    ],
    ids=[
        "corrupted-chunk",
        "length-too-long",
        "length-too-short",
        "bad-hash",
        "bad-crc",
        "larger-than-slot",
    ],
)
def test_failed_update_keeps_the_previous_model(
    installed: tuple[object, Flash], kwargs: dict[str, object], code: int
) -> None:
    lib, flash = installed
    device = Stub(lib, flash)  # type: ignore[arg-type]
    assert device.update(MODEL_V2, 2, **kwargs) == code  # type: ignore[arg-type]
    assert device.active() == 0
    assert assert_boots(lib, flash, {0: MODEL_V1}) == 0


def count_writes(lib: object) -> int:
    flash = Flash(size=2 * Stub.SLOT_SIZE)
    Stub(lib, flash).update(MODEL_V1, 1)  # type: ignore[arg-type]
    before = flash.writes
    Stub(lib, flash).update(MODEL_V2, 2)  # type: ignore[arg-type]
    return flash.writes - before


@pytest.mark.parametrize("torn", [False, True], ids=["clean-cut", "torn-write"])
def test_power_cut_after_every_write_leaves_a_verified_model(stub_lib: object, torn: bool) -> None:
    total = count_writes(stub_lib)
    assert total == 2 + math.ceil(len(MODEL_V2) / 256)  # invalidate, chunks, commit
    outcomes = set()
    for cut in range(1, total + 1):
        flash = Flash(size=2 * Stub.SLOT_SIZE)
        assert Stub(stub_lib, flash).update(MODEL_V1, 1) == 0  # type: ignore[arg-type]
        flash.cut_after = flash.writes + cut
        flash.torn = torn
        Stub(stub_lib, flash).update(MODEL_V2, 2)  # type: ignore[arg-type]
        committed = cut == total and not torn
        allowed = {1: MODEL_V2} if committed else {0: MODEL_V1}
        outcomes.add(assert_boots(stub_lib, flash, allowed))
        # the device keeps working: the next update after the reboot succeeds
        device = Stub(stub_lib, flash)  # type: ignore[arg-type]
        assert device.update(MODEL_V2, 3) in (0, 1)
    assert outcomes == {0, 1} if not torn else outcomes == {0}


def test_active_slot_failing_verification_falls_back(installed: tuple[object, Flash]) -> None:
    lib, flash = installed
    assert Stub(lib, flash).update(MODEL_V2, 2) == 1  # type: ignore[arg-type]
    flash.data[Stub.SLOT_SIZE + 10] ^= 0xFF  # bit rot in the newest model
    assert assert_boots(lib, flash, {0: MODEL_V1}) == 0
    # a model the firmware cannot load is rejected by the application: back to the other slot
    flash.data[Stub.SLOT_SIZE + 10] ^= 0xFF
    device = Stub(lib, flash)  # type: ignore[arg-type]
    assert device.active() == 1
    assert device.lib.ep_update_reject_active(device.ctx) == 0
    assert assert_boots(lib, flash, {0: MODEL_V1}) == 0


def test_stub_crc32_matches_zlib(stub_lib: object) -> None:
    import zlib

    for blob in (b"", b"123456789", MODEL_V1):
        assert stub_lib.ep_crc32(0, blob, len(blob)) == zlib.crc32(blob)  # type: ignore[attr-defined]


@needs_arm
@pytest.mark.parametrize("target", TARGETS)
def test_update_stub_cross_compiles_within_its_flash_estimate(
    bundles: dict[tuple[str, str], Path], target: str, tmp_path: Path
) -> None:
    spec = resolve_target(target).spec
    assert isinstance(spec, McuTarget)
    src = bundles[(MODELS[0], target)] / "src"
    obj = tmp_path / "model_update.o"
    gcc_arm.GCC.run(
        [
            "-std=c99",
            "-Os",
            "-Wall",
            "-Wextra",
            "-Werror",
            *gcc_arm.cpu_flags(spec.mcu.core, spec.mcu.fpu),
            "-I",
            src,
            "-c",
            src / "model_update.c",
            "-o",
            obj,
        ]
    )
    headers = gcc_arm.READELF.run(["-SW", obj]).stdout.decode()
    text = sum(
        int(m.group(1), 16)
        for m in re.finditer(r"\.text\S*\s+PROGBITS\s+\S+\s+\S+\s+(\S+)", headers)
    )
    assert 0 < text <= UPDATE_STUB_BYTES
