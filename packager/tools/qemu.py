"""qemu-user emulation through binfmt_misc, so a foreign-architecture image runs on this host.

Only ``edgepack run`` (and the tests) need it; builds never emulate anything.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from packager.errors import ToolFailedError, ToolMissingError
from packager.tools.base import Tool

MOUNT = Tool("mount", "mount", "mount")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
_QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64", "armv7": "arm"}
_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armv7"}


def host_arch() -> str:
    machine = platform.machine()
    return _HOST_ARCH.get(machine, machine)


def needs_emulation(arch: str) -> bool:
    return arch != host_arch()


def _conf_file(qemu_name: str) -> Path:
    return Path(f"/usr/lib/binfmt.d/qemu-{qemu_name}.conf")


def binfmt_registered(arch: str) -> bool:
    entry = BINFMT / f"qemu-{_QEMU_NAMES.get(arch, arch)}"
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except OSError:
        return False


def ensure_binfmt(arch: str) -> None:
    """Make sure binaries of ``arch`` run through qemu-user; register it when we are root."""
    if not needs_emulation(arch) or binfmt_registered(arch):
        return
    qemu_name = _QEMU_NAMES.get(arch, arch)
    conf = _conf_file(qemu_name)
    if not conf.is_file():
        raise ToolMissingError(
            f"qemu-user emulation for {arch} is not installed",
            hint="install it with: apt-get install qemu-user-static binfmt-support",
        )
    if os.geteuid() != 0:
        raise ToolFailedError(
            f"binfmt_misc has no qemu-{qemu_name} entry and only root can register it",
            hint="run once as root: systemctl restart systemd-binfmt (or: edgepack run as root)",
        )
    if not (BINFMT / "register").exists():
        MOUNT.run(["-t", "binfmt_misc", "binfmt_misc", BINFMT], timeout=30)
    line = conf.read_text().strip().splitlines()[-1]
    try:
        (BINFMT / "register").write_text(line)
    except OSError as exc:
        if not binfmt_registered(arch):
            raise ToolFailedError(
                f"could not register qemu-{qemu_name} with binfmt_misc: {exc}"
            ) from exc
    if not binfmt_registered(arch):
        raise ToolFailedError(f"qemu-{qemu_name} did not register with binfmt_misc")
