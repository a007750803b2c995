"""Proof before flash: MCU bundles' firmware built with Debian's arm-none-eabi-g++ against the
standalone TensorFlow Lite Micro tree (../shared/third_party/tflite-micro), run on emulated
Cortex-M boards by qemu-system-arm, and compared with the tflite-micro Python interpreter.

All 4 shared models x both boards x both kernel sets, 5 inputs each, exact int8 equality.
Compiled TFLM objects are cached in ~/.cache/edgepack/tflm-objects (set XDG_CACHE_HOME to an empty
directory for a cold run). Measured for this whole file on the 2-core CI machine (load ~2 from
other jobs): 8 min 18 s cold, 1 min 52 s warm."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from packager.backends.mcu import emulate as mcu_emulate
from packager.errors import FitError, VerifyError
from packager.models.tflite import analyze_tflite
from packager.tools import gcc_arm, qemu
from tests.integration.conftest import edgepack
from tests.integration.test_mcu_bundle import TFLM_DIR, build_bundle, tflm_run

pytestmark = pytest.mark.integration

TREE = Path(__file__).resolve().parents[3] / "shared" / "third_party" / "tflite-micro" / (
    "tflite-micro-90b983c.tar.zst")
BOARDS = {"nrf52840-dk": "mps2-an386", "stm32f746-disco": "mps2-an500"}
INPUTS = 5

needs_emulator = pytest.mark.skipif(
    not (gcc_arm.GXX.available() and qemu.QEMU_SYSTEM_ARM.available() and TREE.is_file()),
    reason="needs gcc-arm-none-eabi, libstdc++-arm-none-eabi-newlib, qemu-system-arm and "
    f"{TREE}",
)


def _inputs(model: bytes, n: int, seed: int) -> list[list[np.ndarray]]:
    analysis = analyze_tflite(model, "model")
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n):
        row = []
        for t in analysis.inputs:
            info = np.iinfo(np.dtype(t.dtype))
            row.append(rng.integers(info.min, info.max + 1, size=t.shape, dtype=t.dtype))
        runs.append(row)
    return runs


MODELS = ("hello_world_int8.tflite", "micro_speech_quantized.tflite", "simple_add_model.tflite",
          "trained_lstm_int8.tflite")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("mcu-emulate")
    return {
        (m, t): build_bundle(TFLM_DIR / m, t, root / f"{t}-{m}", (("update", "off"),))
        for m in MODELS
        if (TFLM_DIR / m).is_file()
        for t in BOARDS
    }


def _arena(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return int(manifest["device"]["arena_bytes"])


@needs_emulator
@pytest.mark.parametrize("kernels", ["reference", "cmsis-nn"])
@pytest.mark.parametrize("target", list(BOARDS))
@pytest.mark.parametrize("name", MODELS)
def test_firmware_outputs_equal_interpreter(
    bundles: dict[tuple[str, str], Path], name: str, target: str, kernels: str
) -> None:
    """Every shared model's whole firmware, built from the bundle's own files, answers bit for
    bit like the TFLM interpreter on 5 int8 inputs, on the board of the target's core, with
    either kernel set. The LSTM is stateful: under the generated project's policy (state reset
    before every inference) both kernel sets answer like a freshly loaded interpreter."""
    if (name, target) not in bundles:
        pytest.skip(f"{name} not in {TFLM_DIR}")
    bundle = bundles[(name, target)]
    model = (bundle / "model" / name).read_bytes()
    inputs = _inputs(model, INPUTS, seed=14)
    run = mcu_emulate.emulate_bundle(bundle, inputs, tree=str(TREE), kernels=kernels)
    assert run.board == BOARDS[target] and run.kernels == kernels
    assert len(run.outputs) == INPUTS
    wants = [tflm_run(model, _arena(bundle), x) for x in inputs]
    for got, want in zip(run.outputs, wants, strict=True):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.int8 and g.dtype == w.dtype
            np.testing.assert_array_equal(g, w.reshape(g.shape))
    # As many distinct answers as the interpreter gives: a firmware answering a constant passes
    # above only where the interpreter is constant too.
    assert len({o[0].tobytes() for o in run.outputs}) == len({w[0].tobytes() for w in wants})
    assert 0 < run.arena_used <= run.arena_size == _arena(bundle)
    assert len(run.instructions) == INPUTS and all(i > 0 for i in run.instructions)
    # The whole firmware holds at least the model and TFLM's interpreter; RAM the arena.
    assert run.flash_bytes > len(model) + 20_000
    assert run.ram_bytes >= run.arena_size
    if name == "hello_world_int8.tflite":
        assert len({o[0].tobytes() for o in run.outputs}) > 1
        # A few thousand instructions per inference (the issue measured 8,190 with reference
        # kernels, 4,234 with CMSIS-NN, on the M4): bounded, not timed.
        assert all(1_000 < i < 100_000 for i in run.instructions)


@needs_emulator
def test_wrong_core_is_reported(bundles: dict[tuple[str, str], Path]) -> None:
    """A Cortex-M7 firmware (the stm32f746's flags and startup) on the Cortex-M4 board."""
    bundle = bundles[("hello_world_int8.tflite", "stm32f746-disco")]
    with pytest.raises(VerifyError, match=r"different core.*0xc27 \(cortex-m7\).*0xc24 "
                                          r"\(cortex-m4\)"):
        mcu_emulate.emulate_bundle(bundle, None, tree=str(TREE), board_override="mps2-an386")


@needs_emulator
def test_cli_run_json(bundles: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """`edgepack run MCU_BUNDLE --inputs DIR --json` carries outputs, instruction counts, the
    estimate's basis, arena used and linked sizes."""
    bundle = bundles[("hello_world_int8.tflite", "nrf52840-dk")]
    model = (bundle / "model" / "hello_world_int8.tflite").read_bytes()
    inputs = _inputs(model, 2, seed=3)
    folder = tmp_path / "in"
    folder.mkdir()
    for n, row in enumerate(inputs):
        np.save(folder / f"{n}.npy", row[0])
    proc = edgepack("run", str(bundle), "--inputs", str(folder), "--json",
                    env={"EDGEPACK_TFLM_TREE": str(TREE)})
    doc = json.loads(proc.stdout)
    assert doc["board"] == "mps2-an386"
    assert doc["kernels"] == "cmsis-nn"  # the Cortex-M default
    assert len(doc["outputs"]) == 2 and len(doc["instructions"]) == 2
    for got, row in zip(doc["outputs"], inputs, strict=True):
        want = tflm_run(model, _arena(bundle), row)[0]
        assert np.array_equal(np.array(got[0], dtype=np.int8), want.reshape(-1).reshape(
            np.array(got[0]).shape))
    assert doc["latency_estimate_basis"].startswith("estimate:")
    assert doc["arena_used_bytes"] <= doc["arena_bytes"]
    assert doc["linked"]["flash_bytes"] > len(model)


@needs_emulator
def test_cli_refuses_missing_tree(bundles: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    bundle = bundles[("hello_world_int8.tflite", "nrf52840-dk")]
    proc = edgepack("run", str(bundle), check=False, env={"EDGEPACK_TFLM_TREE": ""})
    assert proc.returncode != 0
    assert "TFLM_TREE" in proc.stderr or "tflm-tree" in proc.stderr
    assert "Traceback" not in proc.stderr


def _cmake(bundle: Path, build: Path, tree: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["cmake", "-S", str(bundle / "cmake"), "-B", str(build), "-G", "Ninja",
         f"-DTFLM_TREE={tree}", "-DCMAKE_SYSTEM_NAME=Generic",
         "-DCMAKE_C_COMPILER=arm-none-eabi-gcc", "-DCMAKE_CXX_COMPILER=arm-none-eabi-g++",
         "-DCMAKE_TRY_COMPILE_TARGET_TYPE=STATIC_LIBRARY", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
         *extra],
        capture_output=True, text=True, timeout=120, check=False)


def _configure(bundle: Path, build: Path, *extra: str) -> dict[str, str]:
    """Configure the bundle's own CMake glue for arm-none-eabi against the unpacked tree that
    holds reference/ and cmsis-nn/; {source file: compile command} from compile_commands.json."""
    tree = mcu_emulate.tflm_tree(str(TREE), "reference").parent
    proc = _cmake(bundle, build, tree, *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((build / "compile_commands.json").read_text())
    return {e["file"]: e["command"] for e in doc}


@needs_emulator
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                    reason="apt-get install cmake ninja-build")
def test_cmake_glue_kernel_sets(bundles: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """The bundle's CMake glue builds CMSIS-NN kernels by default on a Cortex-M target (the
    cmsis-nn tree, -DCMSIS_NN, CMSIS-NN's C sources) and reference kernels on request."""
    bundle = bundles[("hello_world_int8.tflite", "nrf52840-dk")]
    glue = (bundle / "cmake" / "CMakeLists.txt").read_text()
    assert 'set(EDGEPACK_KERNELS "cmsis-nn" CACHE STRING' in glue
    default = _configure(bundle, tmp_path / "default")
    tflm = [f for f in default if "/tensorflow/lite/micro/" in f]
    assert tflm and all("/cmsis-nn/" in f for f in tflm)
    assert any("/third_party/cmsis_nn/Source/" in f for f in default)
    assert all("-DCMSIS_NN" in default[f] for f in tflm)
    assert all("-mcpu=cortex-m4" in default[f] for f in tflm)
    ref = _configure(bundle, tmp_path / "ref", "-DEDGEPACK_KERNELS=reference")
    tflm = [f for f in ref if "/tensorflow/lite/micro/" in f]
    assert tflm and all("/reference/" in f and "-DCMSIS_NN" not in ref[f] for f in tflm)
    assert not any("cmsis_nn" in f for f in ref)
    # A single tree of the other kernel set is refused at configure time, naming both.
    cmsis_tree = mcu_emulate.tflm_tree(str(TREE), "cmsis-nn")
    proc = _cmake(bundle, tmp_path / "mismatch", cmsis_tree, "-DEDGEPACK_KERNELS=reference")
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())  # cmake wraps messages
    assert "has cmsis-nn kernels, EDGEPACK_KERNELS is reference" in message
    assert "-DEDGEPACK_KERNELS=cmsis-nn" in message


def _small_flash_target(tmp_path: Path, flash_kb: int) -> Path:
    text = (Path(__file__).resolve().parents[2] / "targets" / "nrf52840-dk.toml").read_text()
    text = text.replace('name = "nrf52840-dk"', 'name = "tiny-flash-m4"')
    text = text.replace("flash_kb = 1024", f"flash_kb = {flash_kb}")
    text = text.replace("flash_reserved_kb = 128", "flash_reserved_kb = 0")
    path = tmp_path / "tiny-flash-m4.toml"
    path.write_text(text)
    return path


@needs_emulator
def test_build_refuses_on_linked_flash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hello_world's flash estimate (~15 KB) fits 32 KB, its linked firmware (~45 KB) does not:
    the build is refused with both numbers."""
    monkeypatch.setenv("EDGEPACK_TFLM_TREE", str(TREE))
    target = _small_flash_target(tmp_path, 32)
    with pytest.raises(FitError, match=r"linked firmware does not fit flash: [\d,]+ B .*"
                                       r"> 32,768 B usable; the estimate was [\d,]+ B") as err:
        build_bundle(TFLM_DIR / "hello_world_int8.tflite", str(target), tmp_path / "b",
                     (("update", "off"),))
    estimate = int(str(err.value).rsplit("the estimate was ", 1)[1].split(" B")[0].replace(",", ""))
    assert estimate <= 32 * 1024  # the estimate alone would have let it through


@needs_emulator
def test_build_records_proof(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the toolchain and a tree, the build proves the firmware and the manifest carries the
    linked sizes; --opt emulate=off skips with a note."""
    monkeypatch.setenv("EDGEPACK_TFLM_TREE", str(TREE))
    bundle = build_bundle(TFLM_DIR / "hello_world_int8.tflite", "nrf52840-dk", tmp_path / "b",
                          (("update", "off"),))
    proof = json.loads((bundle / "manifest.json").read_text())["device"]["proof"]
    assert proof["emulated"] is True and proof["outputs_equal_interpreter"] is True
    assert proof["board"] == "mps2-an386" and proof["linked"]["flash_bytes"] > 20_000
    assert proof["kernels"] == "cmsis-nn"
    off = build_bundle(TFLM_DIR / "hello_world_int8.tflite", "nrf52840-dk", tmp_path / "c",
                       (("update", "off"), ("emulate", "off")))
    proof = json.loads((off / "manifest.json").read_text())["device"]["proof"]
    assert proof == {"emulated": False, "note": "skipped: --opt emulate=off"}


# A hostile bundle source: a constructor (the harness's startup runs __libc_init_array) that uses
# semihosting (Arm semihosting spec 2.0: SYS_OPEN 0x01, SYS_CLOSE 0x02, SYS_WRITE 0x05, SYS_WRITE0
# 0x04; open modes 4 = "w", 8 = "a") to write host files by absolute path, and reports each
# SYS_OPEN's answer on the console.
_HOSTILE_C = r"""
#include <stdint.h>
#include <string.h>

static int32_t hostile_call(uint32_t op, const void* arg) {
  register uint32_t r0 __asm__("r0") = op;
  register const void* r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return (int32_t)r0;
}

static void hostile_write(const char* path, uint32_t mode) {
  static const char payload[] = "pwned\n";
  uint32_t open_args[3] = {(uint32_t)path, mode, (uint32_t)strlen(path)};
  int32_t fd = hostile_call(0x01u, open_args);
  char line[16] = "HOSTILE open ";
  line[13] = fd < 0 ? '-' : '+';
  line[14] = '\n';
  line[15] = 0;
  hostile_call(0x04u, line);
  if (fd >= 0) {
    uint32_t write_args[3] = {(uint32_t)fd, (uint32_t)payload, sizeof payload - 1};
    hostile_call(0x05u, write_args);
    uint32_t close_args[1] = {(uint32_t)fd};
    hostile_call(0x02u, close_args);
  }
}

__attribute__((constructor)) static void hostile(void) {
  hostile_write("@ROOTDIR@/created", 4u);
  hostile_write("@ROOTDIR@/existing", 8u);
  hostile_write("@OPENDIR@/created", 4u);
}
"""


@needs_emulator
def test_firmware_cannot_write_host_files(
    bundles: dict[tuple[str, str], Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Semihosting lets firmware open and write host files by absolute path; a bundle's sources
    are untrusted. Neither a root-owned 0755 directory (as root, qemu runs as nobody) nor a
    world-writable one (the filesystem is read-only but qemu's scratch directory) takes a file,
    and a root-owned file is not appended to, through `edgepack run` or the API."""
    import hashlib
    import shutil
    import tempfile

    # Under /tmp itself, 0755 all the way down (pytest's own tmp_path is under a 0700
    # directory): nobody reaches both directories, so only the confinement stops the writes.
    top = Path(tempfile.mkdtemp(prefix="edgepack-hostile-"))
    request.addfinalizer(lambda: shutil.rmtree(top))
    top.chmod(0o755)
    root_dir = top / "root-owned"
    root_dir.mkdir()
    root_dir.chmod(0o755)
    open_dir = top / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    existing = root_dir / "existing"
    existing.write_text("root's\n")
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[("hello_world_int8.tflite", "nrf52840-dk")], bundle)
    source = (_HOSTILE_C.replace("@ROOTDIR@", str(root_dir))
              .replace("@OPENDIR@", str(open_dir))).encode()
    (bundle / "src" / "hostile.c").write_bytes(source)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"].append({"path": "src/hostile.c", "size": len(source),
                              "sha256": hashlib.sha256(source).hexdigest()})
    manifest["files"].sort(key=lambda e: e["path"])
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    proc = edgepack("run", str(bundle), "--json", check=False,
                    env={"EDGEPACK_TFLM_TREE": str(TREE)})
    assert "Traceback" not in proc.stderr
    run = mcu_emulate.emulate_bundle(bundle, None, tree=str(TREE))

    assert not (root_dir / "created").exists()
    assert not (open_dir / "created").exists()
    assert existing.read_text() == "root's\n"
    # The hostile code did run (three opens, all refused) and the firmware still worked.
    assert run.log.count("HOSTILE open -") == 3, run.log
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["board"] == "mps2-an386"
