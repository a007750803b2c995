"""`edgepack run` emulates the device's CPU, not qemu's `max`: an rpi4 bundle's image (built from
a model generated here) runs under podman + qemu-user on a Cortex-A72, where an ARMv8.2 dot
product instruction (`sdot`, which a Raspberry Pi 4 lacks) is an illegal instruction, while the
same instruction runs under `max`. Also a bare arm64 ELF through binfmt_misc, which shows the
mechanism (QEMU_CPU in the environment of the exec'ing process) without any container."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from packager.backends import get_backend
from packager.backends.linux.trial import plan_emulation
from packager.bundle.manifest import Manifest
from packager.targets import resolve_target
from packager.tools.qemu import QEMU_CPU_ENV
from tests.integration.conftest import REPO, build_json, free_port
from tests.process_guard import Processes

pytestmark = pytest.mark.integration

SDOT = 0x4E829420  # sdot v0.4s, v1.16b, v2.16b (ARMv8.2-A DotProd; not on Cortex-A72/A53)
RET = 0xD65F03C0

# Runs inside the arm64 image: execute `sdot; ret` from an executable page in a forked child,
# and read what the kernel/qemu says about the CPU (HWCAP from getauxval, /proc/cpuinfo).
PROBE = f"""
import ctypes, json, mmap, os, signal
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(({SDOT}).to_bytes(4, "little") + ({RET}).to_bytes(4, "little"))
function = ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
pid = os.fork()
if pid == 0:
    function()
    os._exit(0)
_, status = os.waitpid(pid, 0)
if os.WIFSIGNALED(status):
    sdot = signal.Signals(os.WTERMSIG(status)).name
else:
    sdot = "ok" if os.WEXITSTATUS(status) == 0 else "exit %d" % os.WEXITSTATUS(status)
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
libc.getauxval.argtypes = [ctypes.c_ulong]
hwcap = libc.getauxval(16)  # AT_HWCAP
parts = [ln.split(":")[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("CPU part")]
print(json.dumps({{"sdot": sdot, "asimddp": bool(hwcap & (1 << 20)),
                  "atomics": bool(hwcap & (1 << 8)), "cpu_part": parts[0]}}))
"""


def arm64_elf(words: list[int]) -> bytes:
    """A static arm64 Linux ELF whose code is ``words`` followed by exit(0)."""
    code = struct.pack(f"<{len(words) + 3}I", *words, 0xD2800000, 0xD2800BA8, 0xD4000001)
    base, ehdr, phdr = 0x400000, 64, 56
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack(
        "<HHIQQQIHHHHHH", 2, 183, 1, base + ehdr + phdr, ehdr, 0, 0, ehdr, phdr, 1, 0, 0, 0
    )
    total = ehdr + phdr + len(code)
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return header + program + code


@pytest.mark.parametrize(
    ("target", "traps"), [("rpi4", True), ("rpi-zero-2w", True), ("rpi5", False)]
)
def test_the_planned_emulation_traps_what_the_device_cannot_execute(
    target: str, traps: bool, arm64_emulation: None, tmp_path: Path
) -> None:
    """The environment `edgepack run` gives an emulated container, applied to a bare arm64 ELF
    started through binfmt_misc as a container's processes are: `sdot` is an illegal
    instruction on a Pi 4 (Cortex-A72) and Zero 2 W (Cortex-A53), and runs on a Pi 5
    (Cortex-A76) and on qemu's `max`."""
    binary = tmp_path / "sdot"
    binary.write_bytes(arm64_elf([SDOT]))
    binary.chmod(0o755)
    loaded = resolve_target(target)
    # Only the target table matters here: the one the build writes (Backend.target_meta).
    manifest = Manifest.model_construct(target=get_backend(loaded.device_class).target_meta(loaded))

    def run(override: str | None) -> int:
        emulation = plan_emulation(manifest, "arm64", override, tmp_path)
        env = {**os.environ, **dict(emulation.env)}
        return subprocess.run([str(binary)], env=env, capture_output=True, timeout=60).returncode

    assert run(None) == (-signal.SIGILL if traps else 0)
    assert run("max") == 0


def _tiny_onnx(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def rpi4_bundle(tmp_path_factory: pytest.TempPathFactory, edgepack_cache: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cpu")
    model = _tiny_onnx(root / "tiny.onnx")
    return build_json(
        str(model), "--target", "rpi4", "--out", str(root / "rpi4"),
        "--cache-dir", str(edgepack_cache),
    )


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as response:
            return int(response.status) == 200
    except OSError:
        return False


def _probe(container: str, *env: str) -> dict[str, Any]:
    args = ["podman", "exec", *(a for e in env for a in ("-e", e)), container]
    proc = subprocess.run(
        [*args, "/usr/bin/python3.11", "-c", PROBE], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_run_emulates_a_cortex_a72_for_an_rpi4_bundle(
    rpi4_bundle: dict[str, Any],
    arm64_emulation: None,
    processes: Processes,
    cleanup_containers: list[str],
) -> None:
    port = free_port()
    container = f"edgepack-run-{rpi4_bundle['model_name']}-{port}"
    cleanup_containers.append(container)
    proc = processes.own(
        subprocess.Popen(
            [sys.executable, "-m", "packager", "run", rpi4_bundle["bundle"], "--port", str(port),
             "--timeout", "600", "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while not _ready(url):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "runtime not ready"
            time.sleep(1.0)
        # The runtime answers on the emulated Pi 4 CPU ...
        body = json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode()
        request = urllib.request.Request(
            f"{url}/v2/models/{rpi4_bundle['model_name']}/infer", data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            outputs = json.loads(response.read())["outputs"]
        assert [round(v, 4) for v in outputs[0]["data"]] == [6.0, 7.0, 8.0]
        # ... which has no dot product: the instruction traps, as it would on the board.
        device = _probe(container)
        assert device == {"sdot": "SIGILL", "asimddp": False, "atomics": False,
                          "cpu_part": "0xd08"}
        # The same probe in the same container on qemu's default CPU runs it.
        everything = _probe(container, f"{QEMU_CPU_ENV}=max")
        assert everything["sdot"] == "ok" and everything["asimddp"] and everything["atomics"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
    document = json.loads(stdout)
    assert document["emulated"] is True and document["cpu"] == "cortex-a72", stderr


def test_an_illegal_instruction_in_the_container_is_reported_not_waited_out(
    arm64_emulation: None, tmp_path: Path, cleanup_containers: list[str]
) -> None:
    """As the container's PID 1 an emulated process cannot die of SIGILL (qemu re-raises it at
    itself, which the kernel ignores for a namespace's init), so the container hangs: the trial
    must read qemu's last words and say what happened instead of waiting for readiness."""
    import tarfile

    from packager.backends.linux.trial import wait_ready
    from packager.errors import RuntimeCheckError
    from packager.tools.containers import find_engine

    binary = tmp_path / "sdot"
    binary.write_bytes(arm64_elf([SDOT]))
    binary.chmod(0o755)
    archive = tmp_path / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(binary, arcname="sdot")
    ref = "localhost/edgepack-test-sdot:1"
    subprocess.run(["podman", "import", "--arch", "arm64", str(archive), ref], check=True,
                   capture_output=True, timeout=120)
    engine = find_engine("podman")
    name = f"edgepack-test-sdot-{free_port()}"
    cleanup_containers.append(name)
    try:
        engine.run_detached(ref, name=name, platform="linux/arm64",
                            env=[(QEMU_CPU_ENV, "cortex-a72")], extra=["--entrypoint", "/sdot"])
        with pytest.raises(RuntimeCheckError) as err:
            wait_ready(engine, name, f"http://127.0.0.1:{free_port()}", 120, "cortex-a72")
        line = err.value.one_line()
        assert "signal 4 (Illegal instruction)" in line and "cortex-a72" in line
    finally:
        engine.remove(name)
        engine.remove_image(ref)
