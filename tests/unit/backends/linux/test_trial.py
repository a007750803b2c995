"""`edgepack run` emulates the device's CPU model, chosen from what the bundle's manifest says.

The manifest's target table comes from the build's own writer (the backend's target_meta) for
the shipped targets, so these tests follow the real path from target file to QEMU_CPU.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import cast

import pytest

from packager.backends import get_backend
from packager.backends.linux.trial import choose_cpu, wait_ready
from packager.bundle.manifest import CpuInfo, TargetInfo
from packager.errors import RuntimeCheckError, TargetError, UsageError, VerifyError
from packager.image.emulation import cpuinfo_text
from packager.targets import LoadedTarget, parse_target, resolve_target
from packager.tools.containers import Engine
from packager.tools.qemu import QEMU_CPU_ENV, QEMU_DEFAULT_CPU, emulated_cpu
from tests.ports import raw_listener


def _target_meta(target: LoadedTarget) -> TargetInfo:
    return get_backend(target.device_class).target_meta(target)


@pytest.mark.parametrize(
    ("target", "cpu"),
    [
        ("rpi4", "cortex-a72"),
        ("rpi-zero-2w", "cortex-a53"),
        ("rpi5", "cortex-a76"),
        ("jetson-nano", "cortex-a57"),
        ("jetson-orin-nano", "neoverse-n1"),  # cpu.qemu: qemu has no Cortex-A78AE
    ],
)
def test_run_emulates_the_targets_own_cpu(target: str, cpu: str) -> None:
    meta = _target_meta(resolve_target(target))
    assert meta.cpu is not None and meta.cpu.qemu == cpu
    assert choose_cpu(meta, None) == (cpu, True)
    assert QEMU_CPU_ENV == "QEMU_CPU"


def test_a_core_qemu_does_not_model_falls_back_to_max_and_says_so() -> None:
    target = _target_meta(resolve_target("jetson-xavier-nx"))  # NVIDIA Carmel
    assert target.cpu is not None and target.cpu.qemu is None
    assert choose_cpu(target, None) == (QEMU_DEFAULT_CPU, False)
    old = TargetInfo(name="old", device_class="linux-container")
    assert choose_cpu(old, None) == ("max", False)
    assert choose_cpu(target, "cortex-a72") == ("cortex-a72", True)


@pytest.mark.parametrize(
    "value", ["cortex-a72\n", "cortex-a72 -d in_asm", "../../x", "", "A72", 72, "x" * 40]
)
def test_a_hostile_manifest_cpu_is_refused(value: object) -> None:
    with pytest.raises(VerifyError) as err:
        # model_construct: past the manifest's own type check (an int is refused there), to
        # show the reader refuses a string that is no qemu CPU name.
        cpu = CpuInfo.model_construct(model="cortex-a72", cores=4, qemu=value)
        choose_cpu(TargetInfo(name="t", device_class="x", cpu=cpu), None)
    assert "target.cpu.qemu" in err.value.one_line()


def test_a_bad_cpu_option_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as err:
        choose_cpu(None, "max,pauth=off;reboot")
    assert "--cpu" in err.value.one_line()


def _linux_target(cpu: dict[str, object]) -> dict[str, object]:
    return {
        "name": "board",
        "description": "a board",
        "device_class": "linux-container",
        "platform": {"arch": "arm64"},
        "cpu": {"cores": 4, **cpu},
        "memory": {"ram_mb": 1024},
        "storage": {"kind": "sd", "size_mb": 16384},
    }


def test_cpu_qemu_in_a_target_overrides_the_model_and_is_allow_listed() -> None:
    loaded = parse_target(_linux_target({"model": "cortex-a55", "qemu": "cortex-a53"}), "b.toml")
    assert _target_meta(loaded).cpu == CpuInfo(model="cortex-a55", cores=4, qemu="cortex-a53")
    assert emulated_cpu("cortex-a55") is None
    for bad in ("cortex-a53\n", "cortex-a53 -strace", "Cortex-A53", "a" * 33):
        with pytest.raises(TargetError) as err:
            parse_target(_linux_target({"model": "cortex-a55", "qemu": bad}), "b.toml")
        assert "cpu.qemu" in err.value.one_line()


@pytest.mark.parametrize(
    ("cpu", "part", "has_dotprod"),
    [("cortex-a53", "0xd03", False), ("cortex-a72", "0xd08", False), ("cortex-a76", "0xd0b", True)],
)
def test_cpuinfo_matches_the_emulated_core(cpu: str, part: str, has_dotprod: bool) -> None:
    text = cpuinfo_text(cpu, 4)
    assert text is not None
    assert text.count("processor\t:") == 4 and text.count(f"CPU part\t: {part}\n") == 4
    assert ("asimddp" in text) == has_dotprod
    assert cpuinfo_text("max", 4) is None


class _RunningContainer:
    """STAND-IN for the container engine (no container here): the container is running and has
    printed nothing. Only the readiness wait is under test; it answers on the real socket."""

    def is_running(self, name: str) -> bool:
        return True

    def logs(self, name: str, tail: int = 50) -> str:
        return ""


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A real HTTP endpoint on loopback (an ephemeral port) that accepts every connection, reads
    nothing and never answers; yields its base URL and the connections it accepted."""
    with raw_listener(lambda connection, stop: None) as (port, accepted):
        yield f"http://127.0.0.1:{port}", accepted


def test_the_readiness_wait_ends_at_its_timeout_against_a_silent_server(
    silent_server: tuple[str, list[socket.socket]],
) -> None:
    """Each poll may block up to 5 s: unbounded by the time left, a 1 s wait took 6 s (one
    5 s poll, then a 1 s pause). Bounded, it ends within the timeout plus a small constant (a
    liveness bound, 3 s here for a loaded machine, below the 5 s one poll used to add)."""
    base_url, accepted = silent_server
    engine = cast(Engine, _RunningContainer())
    timeout_s = 1.0
    started = time.monotonic()
    with pytest.raises(RuntimeCheckError, match=r"not ready within 1s"):
        wait_ready(engine, "c", base_url, timeout_s)
    elapsed = time.monotonic() - started
    assert accepted, "the wait never reached the server"
    assert elapsed < timeout_s + 3.0
