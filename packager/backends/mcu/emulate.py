"""Proof before flash: an MCU bundle's firmware compiled, linked and run on an emulated Cortex-M.

``edgepack run MCU_BUNDLE`` builds the bundle's own sources (``src/``, and the emulator harness
``emulate/``: startup, linker script per board, a main that runs N inferences) with Debian's
``arm-none-eabi-g++`` against a TensorFlow Lite Micro tree, runs the ELF under
``qemu-system-arm`` with semihosting, and reads back the raw outputs, SysTick ticks per
inference, the arena used, and the linked flash/RAM (``arm-none-eabi-size``).

Only the TFLM sources the model links are compiled: the core, the kernel files that define the
resolver's ``Register_*`` functions, then whatever the linker still reports undefined (found by
name in the tree), iterated. Objects are cached under ``~/.cache/edgepack/tflm-objects`` keyed by
(source sha256, tree id, compiler, flags, kernel set).

Instruction counts: QEMU models no cycles, but with ``-icount shift=0`` its virtual clock
advances exactly 1 ns per guest instruction, and the mps2 boards clock SysTick from the 25 MHz
SYSCLK (QEMU hw/arm/mps2.c), so one SysTick tick is 40 instructions: counts are exact to +-40.
The latency at the target's clock is an *estimate*: instructions / f_cpu, i.e. 1 cycle per
instruction, which ignores flash wait states and multi-cycle instructions.

The bundle's CMake file is never run here (CMake executes what a CMakeLists says); the sources
are compiled directly, with the flags that CMake file declares for the core.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from packager.errors import ToolFailedError, UsageError, VerifyError
from packager.tools import gcc_arm, qemu

if TYPE_CHECKING:
    from packager.bundle.manifest import Manifest
    from packager.targets import McuTarget

# Target core -> the QEMU board that emulates it, and the CPUID PartNo of that core (Arm
# Cortex-M4/M7 Technical Reference Manuals, "CPUID Base Register").
EMULATED_BOARDS: dict[str, dict[str, Any]] = {
    "cortex-m4": {"board": "mps2-an386", "qemu_core": "cortex-m4", "partno": 0xC24},
    "cortex-m7": {"board": "mps2-an500", "qemu_core": "cortex-m7", "partno": 0xC27},
}
# Both boards: 4 MB SSRAM at 0x0 (code) and 4 MB at 0x20000000 (QEMU hw/arm/mps2.c). The target's
# RAM sits at the bottom; the harness's I/O window above any target RAM.
IO_ADDR = 0x20200000
IO_KB = 2048
MPS2_SYSCLK_HZ = 25_000_000
INSTRUCTIONS_PER_TICK = 1_000_000_000 // MPS2_SYSCLK_HZ  # icount shift=0: 1 ns per instruction
KERNEL_SETS = ("reference", "cmsis-nn")
_TREE_ENV = "EDGEPACK_TFLM_TREE"
_QEMU_TIMEOUT_S = 120.0
_MAX_INPUTS = 64
_UNDEFINED = re.compile(r"undefined reference to `([^'(]+)")
_CORE_DIRS = ("tensorflow/lite/micro/arena_allocator", "tensorflow/lite/micro/memory_planner",
              "tensorflow/lite/micro/tflite_bridge", "tensorflow/lite/core",
              "tensorflow/lite/c", "tensorflow/lite/schema", "tensorflow/compiler")
_CORE_SKIP = re.compile(r".*(test|mock|fake|recording|hexdump|system_setup).*")


def default_kernels(core: str) -> str:
    """The TFLM kernel set a target's core builds with by default: ``cmsis-nn`` on Cortex-M
    (Arm's optimized int8 kernels; the issue measured 1.9-12.7x fewer instructions per inference
    than the reference kernels, with bit-identical int8 outputs), ``reference`` elsewhere."""
    return "cmsis-nn" if core.startswith("cortex-m") else "reference"


# Cores no firmware proof exists for here, and why (checked with apt-cache search on Debian 13:
# its only Xtensa GCC is gcc-xtensa-lx106, for the ESP8266, and qemu-system-xtensa has no ESP32-S3
# machine; xtensa-esp32s3-elf-gcc and Espressif's QEMU fork are not packaged).
_UNPROVEN_WHY = {
    "xtensa-lx7": "no ESP32-S3 (Xtensa LX7) toolchain or emulator is installable here (Debian "
                  "packages Xtensa GCC only for the ESP8266's lx106, and its qemu-system-xtensa "
                  "has no ESP32-S3 machine)",
}


def proof_note(core: str) -> tuple[bool, str]:
    """(provable, one line): whether ``edgepack build``/``run`` can prove firmware for ``core``
    on this kind of machine (Debian packages only), and how or why not."""
    board = EMULATED_BOARDS.get(core)
    if board is not None:
        return True, (f"firmware compiled, linked and run under qemu-system-arm on {board['board']}"
                      f" ({default_kernels(core)} kernels by default), outputs compared with the "
                      "TFLM interpreter")
    why = _UNPROVEN_WHY.get(core, f"no emulated board for {core} here")
    return False, f"{why}; the project is rendered unproven"


def board_context(core: str, flash_kb: int, ram_kb: int, stack_bytes: int) -> dict[str, Any]:
    """Template context of the emulated board for ``core``; empty when none emulates it."""
    board = EMULATED_BOARDS.get(core)
    if board is None:
        return {}
    return {**board, "flash_kb": 4096, "ram_kb": min(ram_kb, 2048),
            "io_addr": IO_ADDR, "io_kb": IO_KB, "stack_bytes": stack_bytes}


@dataclass(frozen=True)
class FirmwareRun:
    """What one emulated run measured. ``ticks`` per inference are SysTick ticks."""

    board: str
    kernels: str
    outputs: tuple[tuple[np.ndarray, ...], ...]
    ticks: tuple[int, ...]
    arena_used: int
    arena_size: int
    text: int
    data: int
    bss: int
    freq_mhz: int
    compiled: int
    cached: int
    log: str = field(default="")

    @property
    def instructions(self) -> tuple[int, ...]:
        return tuple(t * INSTRUCTIONS_PER_TICK for t in self.ticks)

    @property
    def flash_bytes(self) -> int:
        return self.text + self.data

    @property
    def ram_bytes(self) -> int:
        return self.data + self.bss

    def to_json(self) -> dict[str, Any]:
        n = len(self.ticks)
        mean = sum(self.instructions) // n if n else 0
        return {
            "board": self.board,
            "kernels": self.kernels,
            "arena_used_bytes": self.arena_used,
            "arena_bytes": self.arena_size,
            "linked": {"flash_bytes": self.flash_bytes, "ram_bytes": self.ram_bytes,
                       "text": self.text, "data": self.data, "bss": self.bss,
                       "source": "arm-none-eabi-size of the linked ELF"},
            "instructions": list(self.instructions),
            "instructions_resolution": INSTRUCTIONS_PER_TICK,
            "instructions_source": "qemu -icount shift=0 (1 ns per instruction) read through "
                                   f"SysTick at {MPS2_SYSCLK_HZ // 1_000_000} MHz",
            "latency_estimate_ms": round(mean / (self.freq_mhz * 1000.0), 4),
            "latency_estimate_basis": f"estimate: instructions / {self.freq_mhz} MHz "
                                      "(1 cycle per instruction; no wait states)",
            "outputs": [[o.tolist() for o in run] for run in self.outputs],
            "objects": {"compiled": self.compiled, "cached": self.cached},
        }


# --- the TFLM tree -----------------------------------------------------------------------------

def cache_root() -> Path:
    """edgepack's cache folder: ``$XDG_CACHE_HOME/edgepack``, else ``~/.cache/edgepack``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgepack"


def tflm_tree(spec: str | None, kernels: str) -> Path:
    """The TFLM tree of ``kernels``: ``spec`` (or $EDGEPACK_TFLM_TREE) names a directory holding
    ``reference/`` and ``cmsis-nn/`` or the ``.tar.zst`` archive of both (unpacked once into the
    cache, keyed by its sha256)."""
    if kernels not in KERNEL_SETS:
        raise UsageError(f"--kernels: '{kernels}' is not one of {', '.join(KERNEL_SETS)}")
    raw = spec or os.environ.get(_TREE_ENV)
    if not raw:
        raise UsageError(
            "no TensorFlow Lite Micro tree to build the firmware against",
            hint=f"pass --tflm-tree DIR|ARCHIVE or set {_TREE_ENV} (create_tflm_tree.py output)",
        )
    path = Path(raw)
    if path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        root = cache_root() / "tflm-src" / digest[:16]
        if not (root / ".complete").is_file():
            _unpack(path, root)
        path = root
    tree = path / kernels
    if not (tree / "tensorflow" / "lite" / "micro" / "micro_interpreter.cc").is_file():
        raise UsageError(f"{path}: no TFLM tree '{kernels}/' (micro_interpreter.cc missing)")
    return tree


def _unpack(archive: Path, root: Path) -> None:
    from packager.tools.zstd import ZSTD

    tar = ZSTD.run(["-d", "-c", archive], timeout=120).stdout
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=_mkdir(root.parent)))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(staging, filter="data")  # refuses links/paths outside staging
    (staging / ".complete").write_text("ok\n")
    if root.exists():
        shutil.rmtree(root)
    staging.rename(root)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tree_id(tree: Path) -> str:
    """Identity of a tree for the object cache: its core headers' hashes (a changed header
    changes the id)."""
    h = hashlib.sha256()
    for rel in sorted(tree.glob("tensorflow/lite/**/*.h")):
        h.update(str(rel.relative_to(tree)).encode() + b"\0" + rel.read_bytes())
    return h.hexdigest()


# --- compile and link ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Toolchain:
    tree: Path
    kernels: str
    cpu: tuple[str, ...]
    cache: Path
    tree_id: str

    def includes(self, extra: Sequence[Path] = ()) -> list[str]:
        dirs = [*extra, self.tree, self.tree / "third_party/flatbuffers/include",
                self.tree / "third_party/gemmlowp", self.tree / "third_party/ruy",
                self.tree / "third_party/kissfft"]
        if self.kernels == "cmsis-nn":
            dirs += [self.tree / "third_party/cmsis_nn", self.tree / "third_party/cmsis_nn/Include"]
        return [f"-I{d}" for d in dirs]

    def flags(self, source: Path) -> list[str]:
        common = [*self.cpu, "-Os", "-ffunction-sections", "-fdata-sections",
                  "-DTF_LITE_STATIC_MEMORY", "-DTF_LITE_DISABLE_X86_NEON",
                  "-DPROJECT_GENERATION"]
        if self.kernels == "cmsis-nn":
            common.append("-DCMSIS_NN")
        if source.suffix == ".c":
            return ["-std=c11", *common]
        return ["-std=c++17", *common, "-fno-exceptions", "-fno-rtti",
                "-fno-threadsafe-statics"]


def _compile_cached(tc: _Toolchain, source: Path) -> tuple[Path, bool]:
    flags = tc.flags(source)
    key = hashlib.sha256(json.dumps([
        hashlib.sha256(source.read_bytes()).hexdigest(), str(source.relative_to(tc.tree)),
        tc.tree_id, tc.kernels, flags, gcc_arm.version()]).encode()).hexdigest()
    obj = tc.cache / f"{key[:32]}.o"
    if obj.is_file():
        return obj, True
    tmp = tc.cache / f".{key[:32]}.{os.getpid()}.tmp.o"
    gcc_arm.compile_object(source, tmp, [*flags, *tc.includes()], timeout=600)
    tmp.replace(obj)
    return obj, False


def _definers(pool: Sequence[Path], name: str) -> list[Path]:
    """Sources in ``pool`` that define function/object ``name`` (a definition line: a name at
    line start scope followed by '(' and no ';' at its end)."""
    pat = re.compile(rf"^[A-Za-z_][\w:<>,\*& ]*\b{re.escape(name)}\s*\((?!.*;\s*$)", re.M)
    pat_var = re.compile(rf"^(?:const\s+)?[\w:<>]+\s+{re.escape(name)}\s*(?:\[|=)", re.M)
    return [p for p in pool if pat.search(t := p.read_text("utf-8", "replace"))
            or pat_var.search(t)]


def _initial_sources(tree: Path, op_methods: Sequence[str]) -> tuple[list[Path], list[Path]]:
    micro = tree / "tensorflow/lite/micro"
    core = [p for p in sorted(micro.glob("*.cc")) if not _CORE_SKIP.fullmatch(p.name)]
    for d in _CORE_DIRS:
        core += [p for p in sorted((tree / d).rglob("*.c*")) if p.suffix in (".c", ".cc")
                 and not _CORE_SKIP.fullmatch(p.name)]
    # Everything else is a candidate, chosen by the symbols the link still misses.
    pool = [p for p in sorted((tree / "tensorflow").rglob("*.c*")) if p.suffix in (".c", ".cc")
            and not _CORE_SKIP.fullmatch(p.name) and p not in core]
    if (tree / "third_party/cmsis_nn/Source").is_dir():
        pool += sorted((tree / "third_party/cmsis_nn/Source").rglob("*.c"))
    resolver = (micro / "micro_mutable_op_resolver.h").read_text("utf-8", "replace")
    chosen = [micro / "kernels/kernel_util.cc"]
    for method in op_methods:
        m = re.search(rf"{re.escape(method)}\([^)]*\)\s*\{{[^}}]*?(Register_\w+)\(", resolver, re.S)
        if m:
            chosen += _definers(pool, m.group(1))
    return core + sorted(set(chosen) - set(core)), pool


def build_firmware(bundle: Path, tc: _Toolchain, op_methods: Sequence[str], work: Path,
                   board_ld: Path, listed: set[str]) -> tuple[Path, int, int]:
    """Compile and link the bundle's firmware from its listed ``src/`` and ``emulate/`` sources
    (the harness main replaces src/main.cc; only the startup of ``board_ld``'s board); return
    (ELF, objects compiled, objects cached)."""
    sources, pool = _initial_sources(tc.tree, op_methods)
    board = board_ld.stem
    own = [bundle / rel for rel in sorted(listed)
           if (re.fullmatch(r"src/[\w.-]+\.(c|cc)", rel) and rel != "src/main.cc")
           or rel in ("emulate/main.cc", f"emulate/startup_{board}.c")]
    objs: dict[Path, Path] = {}
    compiled = cached = 0
    workers = max(1, os.cpu_count() or 1)
    for p in own:
        o = work / f"{p.parent.name}_{p.name}.o"
        flags = tc.flags(p)
        gcc_arm.compile_object(p, o, [*flags, "-Wall", "-Werror", *tc.includes([bundle / "src"])],
                               timeout=600)
        objs[p] = o
    elf = work / "firmware.elf"
    for _ in range(8):
        todo = [s for s in sources if s not in objs]
        with ThreadPoolExecutor(workers) as pool_ex:
            for src, (obj, hit) in zip(todo, pool_ex.map(lambda s: _compile_cached(tc, s), todo),
                                       strict=True):
                objs[src] = obj
                cached += hit
                compiled += not hit
        proc = gcc_arm.link(list(objs.values()), elf, [*tc.cpu, "-T", str(board_ld)],
                            work / "firmware.map")
        if proc.returncode == 0:
            return elf, compiled, cached
        err = (proc.stderr + proc.stdout).decode("utf-8", "replace")
        missing = {m.split("::")[-1].strip() for m in _UNDEFINED.findall(err)}
        added = [d for name in sorted(missing) for d in _definers(pool, name) if d not in objs]
        if not added:
            raise ToolFailedError("firmware link failed: " + " | ".join(
                ln for ln in err.splitlines() if "error" in ln or "undefined" in ln)[-600:])
        sources += sorted(set(added))
    raise ToolFailedError("firmware link did not converge after 8 rounds")


# --- run ---------------------------------------------------------------------------------------

def io_image(model: bytes | None, records: Sequence[bytes]) -> bytes:
    """The EMU_IO blob the harness main reads (see emulate/main.cc for the layout)."""
    header = 7 * 4
    model_off = 64
    model_len = len(model) if model else 0
    inputs_off = (model_off + model_len + 15) // 16 * 16
    rec = len(records[0]) if records else 0
    blob = bytearray(inputs_off + rec * len(records))
    struct.pack_into("<7I", blob, 0, 0x4F495045, 1, len(records), model_off, model_len,
                     inputs_off, rec)
    assert header <= model_off
    if model:
        blob[model_off:model_off + model_len] = model
    for i, r in enumerate(records):
        blob[inputs_off + i * rec:inputs_off + (i + 1) * rec] = r
    if len(blob) > IO_KB * 1024:
        raise UsageError(f"model and inputs take {len(blob)} B, over the {IO_KB} KB I/O window")
    return bytes(blob)


def _core_name(partno: int) -> str:
    names = {int(b["partno"]): core for core, b in EMULATED_BOARDS.items()}
    return names.get(partno, "unknown core")


Outputs = tuple[tuple[np.ndarray, ...], ...]


def parse_output(text: str, out_dtypes: Sequence[tuple[np.dtype[Any], tuple[int, ...]]],
                 count: int) -> tuple[Outputs, tuple[int, ...], int, int]:
    """Parse the harness's ``EP`` lines: (outputs per run, ticks per run, arena used, arena)."""
    if m := re.search(r"^EP cpu-mismatch built=([0-9a-f]{8}) running=([0-9a-f]{8})$", text, re.M):
        built, running = int(m.group(1), 16), int(m.group(2), 16)
        raise VerifyError(
            f"firmware built for a different core: compiled for CPUID part 0x{built:03x} "
            f"({_core_name(built)}), the emulated board's core is 0x{running:03x} "
            f"({_core_name(running)})")
    if m := re.search(r"^EP (fault .*|error .*)$", text, re.M):
        raise VerifyError(f"firmware stopped under emulation: {m.group(1)}")
    arena = re.search(r"^EP arena (\d+) (\d+)$", text, re.M)
    runs = re.findall(r"^EP run (\d+) (\d+)$", text, re.M)
    outs = re.findall(r"^EP out (\d+) ([0-9a-f]*)$", text, re.M)
    if arena is None or len(runs) != count or len(outs) != count * len(out_dtypes) \
            or f"EP done {count}" not in text:
        tail = " | ".join(text.strip().splitlines()[-3:])[-300:]
        raise VerifyError(f"firmware did not finish {count} inferences: {tail or '(no output)'}")
    results = []
    for r in range(count):
        row = []
        for o, (dtype, shape) in enumerate(out_dtypes):
            raw = bytes.fromhex(outs[r * len(out_dtypes) + o][1])
            row.append(np.frombuffer(raw, dtype=dtype).reshape(shape))
        results.append(tuple(row))
    return tuple(results), tuple(int(t) for _, t in runs), int(arena.group(1)), int(arena.group(2))


def run_firmware(elf: Path, board: str, io_blob: bytes, work: Path) -> str:
    """Run ``elf`` on the emulated ``board`` with ``io_blob`` loaded at :data:`IO_ADDR`; what the
    firmware printed (:func:`packager.tools.qemu.run_system_arm`: ToolFailedError when it
    fails or runs past 120 s)."""
    io_file = work / "io.bin"
    io_file.write_bytes(io_blob)
    return qemu.run_system_arm(board, elf, [(io_file, IO_ADDR)], timeout=_QEMU_TIMEOUT_S)


# --- the whole thing -----------------------------------------------------------------------------

def _manifest(bundle: Path) -> Manifest:
    """``bundle``'s manifest with its files checked and its ``device`` section an MCU's
    (:class:`~packager.backends.mcu.manifest.McuSection`); VerifyError otherwise."""
    from packager.backends.mcu.manifest import McuSection
    from packager.bundle.manifest import MANIFEST, check_files, read_manifest

    manifest = read_manifest(bundle)
    problems = check_files(bundle, manifest)
    if problems:
        raise VerifyError(f"{bundle}: {problems[0]}", hint="rebuild or copy it again")
    if manifest.device is None:
        raise VerifyError(f"{bundle}: not an MCU bundle (manifest has no 'device' section)")
    manifest.device_as(McuSection, str(bundle / MANIFEST))
    return manifest


def emulate_bundle(bundle: Path, inputs: Sequence[Sequence[np.ndarray]] | None, *,
                   tree: str | None = None, kernels: str | None = None,
                   core_override: str | None = None, board_override: str | None = None,
                   count: int = 1, manifest: Manifest | None = None) -> FirmwareRun:
    """Build ``bundle``'s firmware and run it on its emulated board.

    ``manifest``: ``bundle``'s, already verified by the caller (``edgepack run``); None reads
    and checks it here.

    ``kernels``: ``reference`` or ``cmsis-nn``; None is the core's default
    (:func:`default_kernels`: CMSIS-NN on Cortex-M).
    ``inputs``: per inference, one array per model input in the tensor's own dtype (int8 for a
    quantized model); None runs ``count`` inferences on zeros. ``core_override`` compiles for
    another core (its board's startup) and ``board_override`` runs on another board: both exist
    to prove that a wrong-core firmware is caught.
    Raises UsageError (no tree / bad input), VerifyError (not an MCU bundle, wrong core, fault),
    ToolMissingError / ToolFailedError (toolchain, QEMU, timeouts).
    """
    from packager.targets import McuTarget, resolve_target

    if manifest is None:
        manifest = _manifest(bundle)
    target = resolve_target(manifest.target.name)
    # Only what the manifest lists (and check_files verified) is compiled: never a stray or
    # linked file that happens to sit in src/.
    listed = {e.path for e in manifest.files}
    if not isinstance(target.spec, McuTarget):
        raise VerifyError(f"{bundle}: target {target.name} is not an MCU")
    return emulate_project(bundle, listed, target.spec, inputs, tree=tree, kernels=kernels,
                           core_override=core_override, board_override=board_override,
                           count=count)


def emulate_project(bundle: Path, listed: set[str], spec: McuTarget,
                    inputs: Sequence[Sequence[np.ndarray]] | None, *, tree: str | None = None,
                    kernels: str | None = None, core_override: str | None = None,
                    board_override: str | None = None, count: int = 1,
                    before_run: Callable[[int, int], None] | None = None) -> FirmwareRun:
    """:func:`emulate_bundle` on a rendered project (``bundle``: a bundle or the build's
    staging directory) whose files ``listed`` (relative paths) are the ones to compile.
    ``before_run(flash_bytes, ram_bytes)`` sees the linked sizes before anything runs (the
    build's fit check raises from it)."""
    from packager.backends.mcu.backend import resolver_ops
    from packager.models.tflite import analyze_tflite

    core = core_override or spec.mcu.core
    built_for = EMULATED_BOARDS.get(core)
    if built_for is None:
        raise UsageError(f"{spec.name}: no emulator for core {core} (emulated: "
                         f"{', '.join(EMULATED_BOARDS)}); the bundle is built but not proven")
    board = board_override or str(built_for["board"])
    kernels = kernels or default_kernels(core)
    ld = bundle / "emulate" / f"{built_for['board']}.ld"
    if not ld.is_file():
        raise VerifyError(f"{bundle}: {ld.relative_to(bundle)} missing (bundle made before "
                          "emulation support: rebuild it)")
    models = [bundle / rel for rel in sorted(listed)
              if re.fullmatch(r"model/[\w.-]+\.tflite", rel)]
    if len(models) != 1:
        raise VerifyError(f"{bundle}/model: expected exactly one .tflite file")
    model_bytes = models[0].read_bytes()
    analysis = analyze_tflite(model_bytes, str(models[0]))
    ops = resolver_ops(analysis, str(models[0]))
    in_specs = [(np.dtype(t.dtype), tuple(t.shape)) for t in analysis.inputs]
    out_specs = [(np.dtype(t.dtype), tuple(t.shape)) for t in analysis.outputs]
    if inputs is None:
        inputs = [[np.zeros(s, d) for d, s in in_specs] for _ in range(count)]
    if not 1 <= len(inputs) <= _MAX_INPUTS:
        raise UsageError(f"between 1 and {_MAX_INPUTS} inputs per run, got {len(inputs)}")
    records = []
    for n, arrays in enumerate(inputs):
        if len(arrays) != len(in_specs):
            raise UsageError(f"input {n}: {len(arrays)} arrays, the model takes {len(in_specs)}")
        rec = b""
        for a, (dtype, shape) in zip(arrays, in_specs, strict=True):
            if a.dtype != dtype or int(a.size) != int(np.prod(shape)):
                raise UsageError(f"input {n}: {a.dtype}{list(a.shape)}, the model takes "
                                 f"{dtype}{list(shape)}")
            rec += np.ascontiguousarray(a).tobytes()
        records.append(rec)
    slots = "src/model_update.c" in listed
    tc = _Toolchain(tree=(t := tflm_tree(tree, kernels)), kernels=kernels,
                    cpu=gcc_arm.cpu_flags(core, spec.mcu.fpu if core == spec.mcu.core
                                          else _fpu_for(core, spec.mcu.fpu)),
                    cache=_mkdir(cache_root() / "tflm-objects"), tree_id=_tree_id(t))
    with tempfile.TemporaryDirectory(prefix="edgepack-fw-") as tmp:
        work = Path(tmp)
        elf, compiled, cached = build_firmware(bundle, tc, [o.method for o in ops], work, ld,
                                               listed)
        text, data, bss = gcc_arm.section_sizes(elf)
        if before_run is not None:
            before_run(text + data, data + bss)
        if data + bss > spec.memory.ram_kb * 1024:
            raise VerifyError(f"{spec.name}: static RAM {data + bss:,} B (data + bss, the arena "
                              f"included) is over the target's {spec.memory.ram_kb} KB")
        log = run_firmware(elf, board, io_image(model_bytes if slots else None, records), work)
    outs, ticks, used, size = parse_output(log, out_specs, len(records))
    return FirmwareRun(board=board, kernels=kernels, outputs=outs, ticks=ticks, arena_used=used,
                       arena_size=size, text=text, data=data, bss=bss,
                       freq_mhz=spec.mcu.freq_mhz, compiled=compiled, cached=cached, log=log)


def _fpu_for(core: str, fpu: str) -> str:
    # The board's core decides the FPU when compiling for another core on purpose.
    return {"cortex-m4": "fpv4-sp-d16", "cortex-m7": "fpv5-d16"}.get(core, fpu) \
        if fpu != "none" else "none"


def load_inputs(bundle: Path, files: Sequence[Path]) -> list[list[np.ndarray]]:
    """One inference per ``.npy`` file (single-input models): int arrays go in as they are, float
    arrays are quantized with the input tensor's scale and zero point (as run() in
    edgepack_inference.cc does). Loaded without pickle: the files are untrusted."""
    from packager.models.tflite import analyze_tflite

    models = sorted((bundle / "model").glob("*.tflite"))
    if len(models) != 1:
        raise VerifyError(f"{bundle}/model: expected exactly one .tflite file")
    analysis = analyze_tflite(models[0].read_bytes(), str(models[0]))
    if len(analysis.inputs) != 1:
        raise UsageError(f"{models[0].name} takes {len(analysis.inputs)} inputs; --input/--inputs "
                         "give one .npy per inference, for single-input models")
    t = analysis.inputs[0]
    dtype = np.dtype(t.dtype)
    runs: list[list[np.ndarray]] = []
    for f in files:
        try:
            a = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{f}: not a .npy array ({exc})") from exc
        if int(a.size) != int(np.prod(t.shape)):
            raise UsageError(f"{f}: {a.size} values, input '{t.name}' takes {list(t.shape)}")
        if a.dtype.kind == "f" and dtype.kind in "iu" and t.quant is not None:
            info = np.iinfo(dtype)
            q = np.round(a / t.quant.scales[0]) + t.quant.zero_points[0]
            a = np.clip(q, info.min, info.max)
        runs.append([a.astype(dtype).reshape(t.shape)])
    return runs
