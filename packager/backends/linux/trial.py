"""``edgepack run``: try a bundle on this machine before flashing it.

The bundle's own image runs in a real container engine: natively when the architectures match,
under qemu-user emulation otherwise. Emulation is of the device's own CPU model (the manifest's
``target.cpu.qemu``: cortex-a72 for a Raspberry Pi 4), not qemu's default ``max`` with every ARMv8.x
extension, so code the device cannot execute stops here with an illegal instruction too. Nothing
about the image is changed for the trial.
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from packager.backends.base import TryRequest
from packager.bundle.manifest import Manifest, TargetInfo, Tensor
from packager.console import console
from packager.errors import RuntimeCheckError, ToolMissingError, UsageError, VerifyError
from packager.image.emulation import cpuinfo_text
from packager.tools.containers import Engine, find_engine
from packager.tools.qemu import (
    QEMU_CPU_ENV,
    QEMU_CPU_PATTERN,
    QEMU_DEFAULT_CPU,
    emulated_cpu,
    ensure_binfmt,
    needs_emulation,
    qemu_cpu_models,
)

CPUINFO = Path(__file__).resolve().parents[2] / "image" / "data"
_V2_DATATYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "float64": "FP64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class RunResult:
    """What ``edgepack run`` did with a container bundle: the engine, whether (and as which qemu
    CPU) it was emulated, the served model's URL, seconds until ready, and the smoke test's
    result (:func:`smoke_inference`; None without ``--smoke-test``)."""

    bundle: Path
    engine: str
    emulated: bool
    url: str
    ready_after_s: float
    smoke: dict[str, Any] | None
    cpu: str | None = None  # the qemu CPU model emulated; None when the image runs natively

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "engine": self.engine,
            "emulated": self.emulated,
            "cpu": self.cpu,
            "url": self.url,
            "ready_after_s": round(self.ready_after_s, 2),
            "smoke_test": self.smoke,
        }


def _http(url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"} if body else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def choose_cpu(target: TargetInfo | None, override: str | None) -> tuple[str, bool]:
    """(qemu CPU model, whether it is the device's own) for an emulated run of a bundle whose
    manifest ``target`` table is given: ``override`` (--cpu), else the manifest's
    ``cpu.qemu``, else the qemu model named like its ``cpu.model``; qemu's ``max`` (not the
    device's own) when none of these gives one.

    Raises VerifyError when the manifest's value is not a qemu CPU name (manifests are
    untrusted input), UsageError for a bad --cpu."""
    if override is not None:
        if not re.fullmatch(QEMU_CPU_PATTERN, override):
            raise UsageError(
                f"--cpu {override!r}: not a qemu CPU model name",
                hint="e.g. --cpu cortex-a72, or --cpu max for every extension qemu has",
            )
        return override, True
    cpu = target.cpu if target is not None else None
    if cpu is None:
        return QEMU_DEFAULT_CPU, False
    value: object = cpu.qemu if cpu.qemu is not None else emulated_cpu(cpu.model)
    if value is None:
        return QEMU_DEFAULT_CPU, False
    if not isinstance(value, str) or not re.fullmatch(QEMU_CPU_PATTERN, value):
        raise VerifyError(
            f"manifest.json: target.cpu.qemu {str(value)[:40]!r} is not a qemu CPU model name",
            hint="rebuild the bundle",
        )
    return value, True


# qemu-user's last words when the guest dies of a signal it does not handle. As the container's
# PID 1 the process cannot die of that signal, so the container hangs instead of exiting.
_QEMU_FATAL = re.compile(r"qemu: uncaught target signal (\d+) \(([^)]*)\)")


# One readiness poll's longest wait (s), and its floor near the deadline: a positive timeout
# (0 would make the socket non-blocking, so the poll could never succeed).
_POLL_TIMEOUT_S = 5.0
_MIN_POLL_S = 0.05


def wait_ready(
    engine: Engine, container: str, base_url: str, timeout_s: float, cpu: str | None = None
) -> float:
    """Poll ``/v2/health/ready`` (OIP v2) about once a second until it answers 200; seconds taken.
    RuntimeCheckError (exit 12) when the container exits, dies of a signal under qemu, or is
    not ready within ``timeout_s`` seconds.

    Each poll's timeout is 5 s or the time left, whichever is less (floor :data:`_MIN_POLL_S`),
    and the pause between polls ends at the deadline too, so a runtime that accepts and never
    answers is given up on about ``timeout_s`` after the start (plus the engine's own
    is_running/logs calls). urllib applies the timeout to each socket operation, so a server that
    trickles its answer byte by byte can still stretch one poll."""
    start = time.monotonic()
    deadline = start + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        # urllib's timeout bounds each socket operation; a server that accepts and never
        # answers holds one poll that long.
        poll_s = max(min(_POLL_TIMEOUT_S, remaining), _MIN_POLL_S)
        status, _ = _http(f"{base_url}/v2/health/ready", timeout=poll_s)
        if status == 200:
            return time.monotonic() - start
        if not engine.is_running(container):
            logs = engine.logs(container, tail=20).strip().splitlines()
            tail = " | ".join(logs[-3:]) if logs else "(no output)"
            raise RuntimeCheckError(f"the runtime exited before it was ready: {tail}")
        if cpu is not None:
            fatal = _QEMU_FATAL.search(engine.logs(container, tail=20))
            if fatal:
                raise RuntimeCheckError(
                    f"the runtime died of signal {fatal.group(1)} ({fatal.group(2)}) on the "
                    f"emulated {cpu} CPU before it was ready",
                    hint="the image uses an instruction this CPU lacks: build it for the device's "
                    "CPU (see the target's cpu.isa), or try --cpu max to see if that is the cause",
                )
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    raise RuntimeCheckError(
        f"the runtime was not ready within {timeout_s:.0f}s at {base_url}/v2/health/ready",
        hint="see the container's log with '<engine> logs' or raise --timeout",
    )


def smoke_inference(base_url: str, name: str, inputs: Sequence[Tensor]) -> dict[str, Any]:
    """One inference on zeros of the model's input shapes (dynamic dims as 1)."""
    tensors = []
    for tensor in inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in tensor.shape]
        count = 1
        for d in shape:
            count *= d
        dtype = tensor.dtype
        value: Any = False if dtype == "bool" else 0
        tensors.append(
            {
                "name": tensor.name,
                "shape": shape,
                "datatype": _V2_DATATYPES.get(dtype, "FP32"),
                "data": [value] * count,
            }
        )
    body = json.dumps({"inputs": tensors}).encode()
    start = time.monotonic()
    status, payload = _http(f"{base_url}/v2/models/{name}/infer", body, timeout=120)
    elapsed = time.monotonic() - start
    if status != 200:
        raise RuntimeCheckError(
            f"inference on {name} failed: HTTP {status} {payload[:200].decode('utf-8', 'replace')}"
        )
    outputs = json.loads(payload).get("outputs", [])
    return {
        "latency_s": round(elapsed, 3),
        "outputs": [{"name": o["name"], "shape": o["shape"]} for o in outputs],
    }


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Emulation:
    """How an emulated container is started: the CPU and what the engine is given for it."""

    cpu: str
    env: tuple[tuple[str, str], ...]
    volumes: tuple[str, ...]


def plan_emulation(
    manifest: Manifest, arch: str, override: str | None, scratch: Path
) -> Emulation:
    """QEMU_CPU for the container, and a /proc/cpuinfo of that core written into ``scratch``
    (onnxruntime reads /proc/cpuinfo at import and crashes on the host's x86 text).

    Raises ToolMissingError when this host's qemu does not emulate the chosen CPU."""
    cpu, own = choose_cpu(manifest.target, override)
    if not own:
        console.warn(
            f"the bundle's manifest names no CPU model qemu emulates; running on qemu's "
            f"'{cpu}' CPU (every extension), so an instruction the device lacks will not show "
            "here (set cpu.qemu in the target file, or pass --cpu)"
        )
    available = qemu_cpu_models(arch)
    if cpu not in available:
        raise ToolMissingError(
            f"qemu-user for {arch} on this host does not emulate the CPU model '{cpu}'",
            hint="install a newer qemu-user-static (cortex-a76 needs qemu 7.0), or pass --cpu "
            "with one of: " + ", ".join(sorted(available)),
        )
    cpuinfo = CPUINFO / f"cpuinfo-{arch}.txt"
    cores = manifest.target.cpu.cores if manifest.target.cpu is not None else None
    text = cpuinfo_text(cpu, cores if cores is not None and 0 < cores <= 256 else 4)
    if text is not None:
        cpuinfo = scratch / "cpuinfo"
        cpuinfo.write_text(text, encoding="ascii")
    volumes = (f"{cpuinfo}:/proc/cpuinfo:ro",) if cpuinfo.is_file() else ()
    return Emulation(cpu=cpu, env=((QEMU_CPU_ENV, cpu),), volumes=volumes)


def run_bundle(request: TryRequest, manifest: Manifest) -> RunResult:
    """Start the image of a bundle ``edgepack run`` has verified on 127.0.0.1 ``request.port``
    (emulated by qemu-user on the device's CPU model when foreign): with ``smoke_test`` one
    inference on zeros, then stop; else serve until Ctrl-C / SIGTERM."""
    image = manifest.image
    if image is None:
        raise UsageError(
            f"{request.bundle}: this {manifest.target.device_class} bundle has no image",
            hint="rebuild it with 'edgepack build'",
        )
    platform = image.platform
    arch = platform.split("/")[1]
    engine = find_engine(request.engine)
    emulated = needs_emulation(arch)
    with tempfile.TemporaryDirectory(prefix="edgepack-run-") as scratch:
        emulation = None
        if emulated:
            ensure_binfmt(arch)
            emulation = plan_emulation(manifest, arch, request.cpu, Path(scratch))
        cpu = emulation.cpu if emulation else None
        console.status(f"loading {image.ref} into {engine.name}")
        engine.load(request.bundle / image.archive)
        container = f"edgepack-run-{manifest.name}-{request.port}"
        engine.remove(container)
        container_port = image.port
        base_url = f"http://127.0.0.1:{request.port}"
        console.status(
            f"starting {container} ({platform}"
            f"{f', emulated by qemu-user on a {cpu} CPU' if emulated else ''})"
        )
        engine.run_detached(
            image.ref,
            name=container,
            publish=[f"127.0.0.1:{request.port}:{container_port}"],
            volumes=emulation.volumes if emulation else (),
            platform=platform,
            env=emulation.env if emulation else (),
        )
        try:
            with _stop_on_sigterm():
                ready_after = wait_ready(engine, container, base_url, request.timeout_s, cpu)
                console.status(
                    f"ready after {ready_after:.1f}s: {base_url}/v2/models/{manifest.name}"
                )
                smoke = None
                if request.smoke_test:
                    smoke = smoke_inference(
                        base_url, manifest.name, manifest.model.inputs
                    )
                    console.status(f"inference OK in {smoke['latency_s']}s")
                else:
                    console.status("serving; press Ctrl-C to stop")
                    _serve_until_stopped(engine, container)
        except KeyboardInterrupt:
            smoke = None
            ready_after = 0.0
        finally:
            engine.remove(container)
    return RunResult(
        bundle=request.bundle,
        engine=engine.name,
        emulated=emulated,
        url=f"{base_url}/v2/models/{manifest.name}",
        ready_after_s=ready_after,
        smoke=smoke,
        cpu=cpu,
    )


def _serve_until_stopped(engine: Engine, container: str) -> None:
    follower = engine.follow_logs(container)
    try:
        while engine.is_running(container):
            time.sleep(1.0)
        raise RuntimeCheckError(f"{container} stopped: {engine.logs(container, tail=5).strip()}")
    finally:
        follower.terminate()
