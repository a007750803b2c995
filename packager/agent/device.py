"""What this device is, for a release's ``compat.requires`` (packager.agent.protocol): the L4T
release and the GPU's compute capability of an NVIDIA Jetson, read from the device itself.

The agent imports nothing from the rest of edgepack (tests/unit/agent/test_boundary.py), so this
is its own small reader of the files packager/runtime/jetson_preflight.py reads for the
first-boot preflight, with the same rules:

- L4T release: the first line of ``/etc/nv_tegra_release``
  (``# R36 (release), REVISION: 3.0, GCID: ...`` -> r36.3.0).
- SM: the SoC from ``/proc/device-tree/compatible`` (NUL-separated; ``nvidia,tegra234``), else
  ``/sys/module/tegra_fuse/parameters/tegra_chip_id`` (decimal: 33 = 0x21 T210, 24 = 0x18 T186,
  25 = 0x19 T194, 35 = 0x23 T234); T210 5.3, T186 6.2, T194 7.2, T234 8.7 (NVIDIA's "CUDA GPUs"
  compute capability table). Jetson has no nvidia-smi.

``sysroot`` prefixes every path (tests point it at a fixture tree; on a device it is ``/``).
Every read is bounded (:data:`MAX_READ`); a file that is absent or unreadable is "not found", never
an exception.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .protocol import check_requires, l4t_tuple

MAX_READ = 4096
SOC_SM = {"tegra210": 53, "tegra186": 62, "tegra194": 72, "tegra234": 87}
CHIP_ID_SOC = {33: "tegra210", 24: "tegra186", 25: "tegra194", 35: "tegra234"}
_RELEASE_LINE = re.compile(r"# R([0-9]{1,3}) \(release\), REVISION: ([0-9]{1,3})\.([0-9]{1,3})\b")


@dataclass(frozen=True)
class DeviceFacts:
    """The device as the requirements see it; None where it could not be read, with ``*_found``
    saying what was there instead (for the skip reason)."""

    l4t: tuple[int, int, int] | None
    l4t_found: str
    sm: int | None
    sm_found: str


def _read(sysroot: Path, path: str) -> bytes | None:
    """At most MAX_READ bytes of ``sysroot/path``; None when it cannot be read. O_NONBLOCK: a
    FIFO planted at the path cannot hold the agent."""
    try:
        fd = os.open(sysroot / path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        return os.read(fd, MAX_READ)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_l4t(sysroot: Path) -> tuple[tuple[int, int, int] | None, str]:
    raw = _read(sysroot, "etc/nv_tegra_release")
    if raw is None:
        return None, "no /etc/nv_tegra_release"
    lines = raw.decode("utf-8", "replace").splitlines()[:1]
    match = _RELEASE_LINE.match(lines[0]) if lines else None
    if match is None:
        return None, f"an unreadable /etc/nv_tegra_release ({(lines or [''])[0][:60]!r})"
    release = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return release, "r{}.{}.{}".format(*release)


def read_sm(sysroot: Path) -> tuple[int | None, str]:
    raw = _read(sysroot, "proc/device-tree/compatible")
    if raw is not None:
        for entry in raw.decode("ascii", "replace").split("\0"):
            soc = entry.strip().removeprefix("nvidia,")
            if entry.strip().startswith("nvidia,") and soc in SOC_SM:
                return SOC_SM[soc], f"sm{SOC_SM[soc]} ({soc})"
    raw = _read(sysroot, "sys/module/tegra_fuse/parameters/tegra_chip_id")
    if raw is not None:
        text = raw.decode("ascii", "replace").strip()
        if re.fullmatch(r"[0-9]{1,3}", text) and int(text) in CHIP_ID_SOC:
            soc = CHIP_ID_SOC[int(text)]
            return SOC_SM[soc], f"sm{SOC_SM[soc]} ({soc}, chip id {text})"
        return None, f"an unknown Tegra chip id {text[:16]!r}"
    return None, "no Tegra SoC in /proc/device-tree/compatible or tegra_chip_id"


def read_facts(sysroot: Path) -> DeviceFacts:
    l4t, l4t_found = read_l4t(sysroot)
    sm, sm_found = read_sm(sysroot)
    return DeviceFacts(l4t, l4t_found, sm, sm_found)


def unmet(requires: dict[str, str], facts: DeviceFacts) -> str:
    """'' when the device meets every requirement, else ONE line saying which requirement is not
    met (expected and found), or which is unknown or invalid (then nothing is guessed)."""
    try:
        checked = check_requires(requires)
    except ValueError as exc:
        return str(exc)
    problems = []
    low, below = checked.get("l4t_min"), checked.get("l4t_below")
    if low is not None or below is not None:
        wanted = " and ".join(
            part
            for part in (f">= {low}" if low else "", f"< {below}" if below else "")
            if part
        )
        if facts.l4t is None:
            problems.append(f"L4T {wanted} required, found {facts.l4t_found}")
        elif (low and facts.l4t < l4t_tuple(low)) or (below and facts.l4t >= l4t_tuple(below)):
            problems.append(f"L4T {wanted} required, found {facts.l4t_found}")
    sm = checked.get("sm")
    if sm is not None and facts.sm != int(sm):
        problems.append(f"sm{sm} required, found {facts.sm_found}")
    return "; ".join(problems)
