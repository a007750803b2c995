"""qemu-user emulation through binfmt_misc, so a foreign-architecture image runs on this host.

Only ``edgepack run`` (and the tests) need it; builds never emulate anything.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from packager.errors import ToolFailedError, ToolMissingError
from packager.tools.base import Tool

MOUNT = Tool("mount", "mount", "mount")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
_QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64", "armv7": "arm"}
_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armv7"}

# qemu-user reads the CPU model to emulate from this environment variable (qemu docs,
# "QEMU User space emulator": QEMU_CPU, same as -cpu). Under binfmt_misc the kernel starts qemu
# with the environment of the exec'ing process, so a container's environment reaches it, and
# every process the container starts inherits it.
QEMU_CPU_ENV = "QEMU_CPU"
# The model qemu-user emulates when nothing is set: every extension it implements (ARMv8.x
# atomics, dot product, SVE, ...), more than any Raspberry Pi has.
QEMU_DEFAULT_CPU = "max"
# cpu.model (target files) -> qemu's CPU model of that core (`qemu-aarch64 -cpu help`; all but
# cortex-a76 and neoverse-n1 are in qemu 6.x, those two since qemu 7.0). A core qemu does not
# model gets no entry: its target names the closest one in cpu.qemu, or runs under "max".
QEMU_CPU_MODELS: dict[str, str] = {
    "cortex-a35": "cortex-a35",
    "cortex-a53": "cortex-a53",
    "cortex-a57": "cortex-a57",
    "cortex-a72": "cortex-a72",
    "cortex-a76": "cortex-a76",
    "neoverse-n1": "neoverse-n1",
    "a64fx": "a64fx",
}
# The name form qemu CPU models take; a manifest's value is checked against it before use.
QEMU_CPU_PATTERN = r"[a-z0-9][a-z0-9.-]{0,31}"


def host_arch() -> str:
    """This host's architecture in OCI terms (``amd64``, ``arm64``, ``armv7``); an unknown
    machine name as :func:`platform.machine` gives it."""
    machine = platform.machine()
    return _HOST_ARCH.get(machine, machine)


def needs_emulation(arch: str) -> bool:
    """Whether binaries of OCI architecture ``arch`` need qemu-user on this host."""
    return arch != host_arch()


def _conf_file(qemu_name: str) -> Path:
    return Path(f"/usr/lib/binfmt.d/qemu-{qemu_name}.conf")


def binfmt_registered(arch: str) -> bool:
    """Whether binfmt_misc has an enabled ``qemu-<arch>`` entry (False when it cannot be read)."""
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


def emulated_cpu(model: str, override: str | None = None) -> str | None:
    """The qemu CPU model for a target CPU: ``override`` (the target's cpu.qemu) if set, else
    :data:`QEMU_CPU_MODELS`; None when qemu models no such core."""
    return override or QEMU_CPU_MODELS.get(model)


def qemu_user_tool(arch: str) -> Tool:
    """qemu-user for OCI architecture ``arch`` (``qemu-aarch64-static`` or ``qemu-aarch64``,
    Debian's qemu-user-static)."""
    name = _QEMU_NAMES.get(arch, arch)
    return Tool(f"qemu-{name}", f"qemu-{name}-static", "qemu-user-static", (f"qemu-{name}",))


@lru_cache(maxsize=4)
def qemu_cpu_models(arch: str) -> frozenset[str]:
    """The CPU models this host's qemu-user for ``arch`` emulates (``-cpu help``)."""
    # qemu-user 7.2 exits 1 after printing the list; the list is the answer.
    proc = qemu_user_tool(arch).run(["-cpu", "help"], timeout=30, check=False)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return frozenset(
        m.group(1) for m in re.finditer(r"^\s+(\S+)", text, re.M) if re.fullmatch(
            QEMU_CPU_PATTERN, m.group(1))
    )


# --- qemu-system-arm: whole Cortex-M boards (edgepack run on an MCU bundle) ----------------------

QEMU_SYSTEM_ARM = Tool("qemu-system-arm", "qemu-system-arm", "qemu-system-arm")
# The confinement qemu-system-arm runs in (see run_system_arm).
BWRAP = Tool("bwrap", "bwrap", "bubblewrap")
SETPRIV = Tool("setpriv", "setpriv", "util-linux")
# The uid/gid qemu runs as when edgepack is root (Debian's base-passwd: 65534 both).
_NOBODY = "nobody"
_NOGROUP = "nogroup"
# What the emulated firmware may do on this host: semihosting gives it console output and exit,
# and also file and SYS_SYSTEM calls; the seccomp sandbox refuses spawning processes (so
# SYS_SYSTEM cannot run a command) and privilege changes.
_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def _confined(scratch: Path, argv: list[str]) -> list[str]:
    """bwrap's arguments that run ``argv`` with the whole filesystem read-only (every submount:
    bwrap remounts them all) but ``scratch``, a private /dev and /proc, no network, in new
    pid/ipc/uts namespaces, killed with its parent. As root, ``setpriv`` then drops to
    nobody:nogroup with no supplementary groups, no capabilities and no_new_privs; as another
    user, bwrap needs an unprivileged user namespace and the user stays who it is."""
    confine = [
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", str(scratch),
        str(scratch), "--chdir", str(scratch), "--unshare-pid", "--unshare-ipc",
        "--unshare-net", "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent",
        "--new-session",
    ]
    if os.geteuid() != 0:
        return ["--unshare-user", *confine, "--", *argv]
    drop = [SETPRIV.require(), f"--reuid={_NOBODY}", f"--regid={_NOGROUP}", "--clear-groups",
            "--inh-caps=-all", "--no-new-privs", "--"]
    return [*confine, "--", *drop, *argv]


def run_system_arm(board: str, elf: Path, loads: list[tuple[Path, int]], *, timeout: float) -> str:
    """Run a bare-metal ELF on ``board`` (``-M``) with semihosting and ``-icount shift=0`` (one
    virtual ns per instruction) until it exits; ``loads`` puts files at guest addresses. Returns
    what the firmware printed. A run past ``timeout`` seconds is killed (by its pid, in
    Tool.run) and reported; a non-zero exit is reported with the output's tail.

    The firmware is untrusted (a bundle's C sources) and semihosting lets it open, write and
    remove host files by any path, as the user qemu runs as. So qemu runs confined
    (:func:`_confined`): the filesystem read-only but a fresh scratch directory holding copies of
    ``elf`` and ``loads`` (owned by nobody when root), and as root under nobody:nogroup. Where
    that confinement cannot be set up (no bwrap; not root and no unprivileged user namespaces,
    e.g. kernel.unprivileged_userns_clone=0 or Ubuntu's AppArmor restriction; a container
    without CAP_SYS_ADMIN) nothing runs: ToolMissingError / ToolFailedError."""
    if not re.fullmatch(r"mps2-an[0-9]{3}", board):
        raise ToolFailedError(f"qemu-system-arm: board '{board}' is not an mps2 board")
    qemu_exe = QEMU_SYSTEM_ARM.require()
    BWRAP.require()
    with tempfile.TemporaryDirectory(prefix="edgepack-qemu-") as tmp:
        scratch = Path(tmp)
        kernel = scratch / "firmware.elf"
        shutil.copyfile(elf, kernel)
        args = [
            qemu_exe, "-M", board, "-nodefaults", "-nic", "none", "-display", "none",
            "-monitor", "none", "-serial", "none",
            "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
            "-sandbox", _SANDBOX, "-kernel", str(kernel),
        ]
        for n, (path, addr) in enumerate(loads):
            copy = scratch / f"load{n}.bin"
            shutil.copyfile(path, copy)
            args += ["-device", f"loader,file={copy},addr=0x{addr:08x},force-raw=on"]
        if os.geteuid() == 0:
            for p in (scratch, *scratch.iterdir()):
                shutil.chown(p, _NOBODY, _NOGROUP)
        proc = BWRAP.run(_confined(scratch, args), cwd=scratch, timeout=timeout, check=False)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode != 0 and (m := re.search(r"^bwrap: (.*)$", text, re.M)):
        raise ToolFailedError(
            f"qemu-system-arm: could not confine the firmware's host access (bwrap: "
            f"{m.group(1)[:200]}); semihosting would let it write host files, so it does not run",
            hint="run as root, or allow unprivileged user namespaces "
                 "(sysctl kernel.unprivileged_userns_clone=1)")
    if proc.returncode != 0 and "\nEP " not in "\n" + text:
        tail = " | ".join(text.strip().splitlines()[-3:])[-300:]
        raise ToolFailedError(f"qemu-system-arm ({board}) exit {proc.returncode}: {tail}")
    return text
