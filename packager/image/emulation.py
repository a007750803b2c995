"""Data for running arm64 images under qemu-user on an x86 host.

qemu-user passes the host's /proc/cpuinfo through; onnxruntime parses it for ARM feature flags and
crashes on x86 text, so an emulated container gets an arm64 cpuinfo bind-mounted over
/proc/cpuinfo instead: the one of the core qemu emulates (``QEMU_CPU``), so that what the runtime
reads there agrees with what the emulated CPU does (its HWCAP comes from qemu itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

CPUINFO_MOUNT = "/proc/cpuinfo"


@dataclass(frozen=True)
class ArmCore:
    """What Linux prints in /proc/cpuinfo for one core (MIDR fields and the HWCAP names)."""

    part: int
    variant: int
    revision: int
    features: str


# Feature lines and MIDR values as the Linux kernel prints them on the devices of the shipped
# targets (arch/arm64/kernel/cpuinfo.c names): Raspberry Pi Zero 2 W (BCM2710A1, Cortex-A53 r0p4),
# Pi 4 (BCM2711, Cortex-A72 r0p3), Pi 5 (BCM2712, Cortex-A76 r4p1), Jetson Nano (Tegra X1,
# Cortex-A57 r1p1). The Broadcom parts of the Pi 4 and Zero 2 W lack the crypto extensions.
ARM_CORES: dict[str, ArmCore] = {
    "cortex-a53": ArmCore(0xD03, 0x0, 4, "fp asimd evtstrm crc32 cpuid"),
    "cortex-a57": ArmCore(0xD07, 0x1, 1, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": ArmCore(0xD08, 0x0, 3, "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": ArmCore(
        0xD0B,
        0x4,
        1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
        "dcpop asimddp",
    ),
}


def arm64_cpuinfo() -> Path:
    """The packaged Cortex-A72 cpuinfo, a real file for ``-v PATH:/proc/cpuinfo:ro``."""
    path = Path(str(resources.files("packager.image") / "data" / "cpuinfo-arm64.txt"))
    if not path.is_file():
        raise FileNotFoundError(f"edgepack installation is missing {path}")
    return path


def cpuinfo_text(cpu: str, cores: int) -> str | None:
    """/proc/cpuinfo of ``cores`` cores of the qemu CPU model ``cpu``; None for a model without
    an entry in :data:`ARM_CORES` (then the packaged Cortex-A72 file is used)."""
    core = ARM_CORES.get(cpu)
    if core is None:
        return None
    blocks = [
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {core.features}\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x{core.variant:x}\n"
        f"CPU part\t: 0x{core.part:03x}\nCPU revision\t: {core.revision}\n"
        for n in range(max(cores, 1))
    ]
    return "\n".join(blocks)
