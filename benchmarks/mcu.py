"""MCU bundles per test model: measured vs generated arena vs upstream constants, flash estimate,
and the time to render a project and verify it (cross-compile model_data.cc, read g_model back).

    .venv/bin/python benchmarks/mcu.py [nrf52840-dk]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from packager.backends.base import BuildRequest
from packager.backends.mcu import emulate as mcu_emulate
from packager.backends.mcu.backend import McuBackend
from packager.models.tflite import inspect_tflite
from packager.targets import McuTarget, resolve_target
from packager.tools import gcc_arm

TFLM = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "tflm"
# kTensorArenaSize hand-set in the upstream tflite-micro examples.
UPSTREAM = {"hello_world_int8.tflite": 3_000, "person_detect.tflite": 136 * 1024}


def verify(bundle: Path, model: bytes, spec: McuTarget, work: Path) -> None:
    obj = work / "model_data.o"
    flags = (*gcc_arm.cpu_flags(spec.mcu.core, spec.mcu.fpu), "-fdata-sections")
    gcc_arm.compile_cxx(bundle / "src" / "model_data.cc", obj, flags, bundle / "src")
    raw = work / "g_model.bin"
    gcc_arm.dump_section(obj, ".rodata.g_model", raw)
    if raw.read_bytes() != model:
        raise SystemExit(f"{bundle}: g_model differs from the .tflite")


def main() -> None:
    target_name = sys.argv[1] if len(sys.argv) > 1 else "nrf52840-dk"
    target = resolve_target(target_name)
    assert isinstance(target.spec, McuTarget)
    print(f"target {target_name} ({target.spec.mcu.core}, arena margin "
          f"{target.spec.runtime.arena_margin_percent} %)")
    header = (f"{'model':32} {'bytes':>7} {'measured':>9} {'generated':>10} {'upstream':>9} "
              f"{'flash est':>10} {'ram need':>9} {'render s':>9} {'verify s':>9} "
              f"{'flash lnk':>10} {'ram lnk':>8} {'insn ref':>10} {'insn cmsis':>10} "
              f"{'lnk/est':>7}")
    emulate = bool(os.environ.get("EDGEPACK_TFLM_TREE"))
    print(header)
    print("-" * len(header))
    for path in sorted(TFLM.glob("*.tflite")):
        backend = McuBackend()
        # update=off: the model compiled into model_data.cc (what `verify` reads back), and the
        # build's own proof step skipped (the loop below runs both kernel sets itself).
        request = BuildRequest(model=path, target=target_name,
                               options=(("update", "off"), ("emulate", "off")))
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            start = time.perf_counter()
            info = inspect_tflite(path)
            report = backend.fit(request, info, target)
            plan = backend.plan(request, info, target, report)
            bundle = work / "bundle"
            bundle.mkdir()
            result = backend.execute(plan, bundle, work)
            rendered = time.perf_counter() - start
            start = time.perf_counter()
            verify(bundle, path.read_bytes(), target.spec, work)
            verified = time.perf_counter() - start
            runs = {k: mcu_emulate.emulate_project(bundle, set(result.files), target.spec,
                                                   None, kernels=k)
                    for k in mcu_emulate.KERNEL_SETS} if emulate else {}
        arena = plan.payload.arena
        ram, flash = report.resources
        upstream = UPSTREAM.get(path.name)
        print(f"{path.name:32} {info.size_bytes:>7} {arena.measured_bytes:>9} "
              f"{arena.chosen_bytes:>10} {upstream if upstream else '-':>9} "
              f"{flash.needed_bytes:>10} {ram.needed_bytes:>9} {rendered:>9.3f} {verified:>9.3f} "
              + (f"{runs['reference'].flash_bytes:>10} {runs['reference'].ram_bytes:>8} "
                 f"{runs['reference'].instructions[0]:>10} {runs['cmsis-nn'].instructions[0]:>10} "
                 f"{runs['reference'].flash_bytes / flash.needed_bytes:>7.2f}" if runs else
                 "(set EDGEPACK_TFLM_TREE for linked sizes and instruction counts)"))
    print("person_detect.tflite (upstream 136 KiB = 139264 B) is not in ../shared/testdata/tflm.")
    print("render = inspect + fit (arena bisection in the TFLM interpreter) + plan + write;")
    print("verify = arm-none-eabi-g++ -c model_data.cc for the target CPU + objcopy compare.")
    print("flash/ram lnk = arm-none-eabi-size of the linked firmware (text+data, data+bss), "
          "reference kernels;")
    print("insn = instructions per inference on zeros under qemu -icount shift=0 (+-40), "
          "reference vs CMSIS-NN kernels; lnk/est = linked flash / estimated flash.")


if __name__ == "__main__":
    main()
