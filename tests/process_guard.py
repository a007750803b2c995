"""What a test session started, so that nothing it started outlives it (issue 17).

A session marks itself with a random token in the environment (:data:`TOKEN_ENV`), which every
process it starts inherits unless a test hands it a fresh environment. At the session's end a live
process (zombies are already dead) was left behind when it

- carries the token in /proc/<pid>/environ (a server started with ``start_new_session`` and
  re-parented to init still does), or
- descends from the pytest process, or
- runs in (cwd) or names on its command line one of the session's own directories (its pytest
  temporary directory: a container's conmon keeps the cwd of the ``podman run`` that made it).

Containers: a container named :data:`CONTAINER_PREFIX`... (every runtime container of a bundle:
``edgepack-<name>``, ``edgepack-run-<name>-<port>``) created during the session that the session
declared (:func:`suite_container`) or whose conmon runs in the session's directory.

Only /proc is read (no psutil); Linux only, like the suite.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

TOKEN_ENV = "EDGEPACK_TEST_SESSION"
CONTAINER_PREFIX = "edgepack-"
PROC = Path("/proc")
# Helpers of the pytest interpreter itself, not of a test: they end with it (multiprocessing's
# resource tracker and forkserver, torch inductor's compile workers). Only as pytest's children.
INTERPRETER_HELPERS = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "torch._inductor.compile_worker",
)


@dataclass(frozen=True)
class Leftover:
    """One live process the session left behind, and why it counts as the session's."""

    pid: int
    why: str
    cmdline: str
    cwd: str

    def line(self) -> str:
        return f"pid {self.pid} ({self.why}, cwd {self.cwd}): {self.cmdline[:200]}"


_Popen = TypeVar("_Popen", bound="subprocess.Popen[Any]")


class Processes:
    """The processes one test started (``own(Popen(...))``); the fixture's finalizer stops each,
    whether the test passed or not: SIGTERM, ``grace_s`` to exit, then SIGKILL, always reaped."""

    def __init__(self, grace_s: float = 30.0) -> None:
        self.grace_s = grace_s
        self.started: list[subprocess.Popen[Any]] = []

    def own(self, process: _Popen) -> _Popen:
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            terminate(process, self.grace_s)


def terminate(process: subprocess.Popen[Any], grace_s: float) -> None:
    """SIGTERM, ``grace_s`` to exit, then SIGKILL; always reaped (nothing to do for a process
    that has already exited)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def new_token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return None


def _pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def _state_and_ppid(pid: int) -> tuple[str, int] | None:
    raw = _read(PROC / str(pid) / "stat")
    if raw is None:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; it ends at the last ')'.
    fields = raw.rsplit(b")", 1)[1].split()
    return fields[0].decode(), int(fields[1])


def alive(pid: int) -> bool:
    """Running (or stopped), not a zombie and not gone."""
    state = _state_and_ppid(pid)
    return state is not None and state[0] not in ("Z", "X")


def environ(pid: int) -> dict[str, str]:
    raw = _read(PROC / str(pid) / "environ") or b""
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in pairs}


def cmdline(pid: int) -> str:
    raw = _read(PROC / str(pid) / "cmdline") or b""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def cwd(pid: int) -> str:
    try:
        return os.readlink(PROC / str(pid) / "cwd")
    except OSError:
        return "?"


def _inside(path: str, directory: Path) -> bool:
    return path == str(directory) or path.startswith(str(directory).rstrip("/") + "/")


def leftovers(token: str, root_pid: int, directories: Sequence[Path] = ()) -> list[Leftover]:
    """Live processes started under the session ``token`` whose pytest process is ``root_pid``
    (itself excluded, as is the calling process)."""
    parents: dict[int, int] = {}
    for pid in _pids():
        state = _state_and_ppid(pid)
        if state is not None and state[0] not in ("Z", "X"):
            parents[pid] = state[1]
    descendants: set[int] = set()
    frontier = {root_pid}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - descendants
        descendants |= frontier
    found = []
    for pid in sorted(parents):
        if pid in (root_pid, os.getpid()):
            continue
        where, line = cwd(pid), cmdline(pid)
        if parents[pid] == root_pid and any(h in line for h in INTERPRETER_HELPERS):
            continue
        if pid in descendants:
            why = f"descends from pytest {root_pid}"
        elif environ(pid).get(TOKEN_ENV) == token:
            why = f"carries {TOKEN_ENV}"
        elif any(_inside(where, d) for d in directories):
            why = "cwd in the session's directory"
        elif any(re.search(re.escape(str(d)) + r"(?=/|\s|$)", line) for d in directories):
            why = "command line names the session's directory"
        else:
            continue
        found.append(Leftover(pid, why, line, where))
    return found


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment sets ``name`` to ``value`` (for a fixture that owns
    whatever its stand-in started, recorded or not)."""
    return [pid for pid in _pids() if alive(pid) and environ(pid).get(name) == value]


def listeners(port: int) -> list[int]:
    """Pids holding a TCP socket that listens on ``port`` (any address, IPv4 or IPv6), from
    /proc/net/tcp{,6} (state 0A is LISTEN) and each process's fd links ``socket:[inode]``."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        for row in (_read(PROC / "net" / table) or b"").decode().splitlines()[1:]:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    holders = set()
    for pid in _pids() if inodes else []:
        try:
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:  # gone, or not ours
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:[") and link[len("socket:[") : -1] in inodes:
                holders.add(pid)
                break
    return sorted(holders)


def stop(pids: Iterable[int], *, grace_s: float = 5.0, kill: bool = False) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace_s`` (only SIGKILL with ``kill``: a power cut); returns
    the pids still alive after ``grace_s`` more (bounded: one stuck in the kernel is reported, not
    waited for)."""
    pending = [pid for pid in pids if alive(pid)]
    steps = [(signal.SIGTERM, grace_s)] if not kill else []
    for sig, wait_s in [*steps, (signal.SIGKILL, grace_s)]:
        for pid in pending:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait_s
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
            pending = [pid for pid in pending if alive(pid)]
        if not pending:
            break
    return pending


_SUITE_CONTAINERS: set[str] = set()


def suite_container(name: str) -> str:
    """Declare that this session creates a container named ``name`` (install.sh's
    ``edgepack-<name>``, ``edgepack run``'s ``edgepack-run-<name>-<port>``): the guard then fails
    the session if one by that name, created during it, is still there at its end."""
    _SUITE_CONTAINERS.add(name)
    return name


def _podman(*args: str) -> str:
    """podman's stdout, or "" without podman or when it does not answer within a minute (the
    guard must not hang the suite)."""
    podman = shutil.which("podman")
    if podman is None:
        return ""
    try:
        return subprocess.run(
            [podman, *args], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def containers() -> dict[str, str]:
    """{container id: name} of every podman container named CONTAINER_PREFIX...; {} without
    podman."""
    found = {}
    for line in _podman("ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}").splitlines():
        ident, _, name = line.partition(" ")
        if name.startswith(CONTAINER_PREFIX):
            found[ident] = name
    return found


def session_containers(before: set[str], directories: Sequence[Path]) -> dict[str, str]:
    """Containers created since ``before`` (ids) that belong to this session: a name it declared
    (:func:`suite_container`), or a running one whose conmon runs in one of ``directories`` (conmon
    keeps the cwd of the ``podman run`` that made it, e.g. an agent running in tmp_path).

    Other sessions' containers on the same host (another checkout, a developer's own bundles) are
    left alone: the guard neither blames nor removes them."""
    new = {i: n for i, n in containers().items() if i not in before}
    if not new:
        return {}
    conmons = {}
    out = _podman("container", "inspect", "--format", "{{.Id}} {{.State.ConmonPid}}", *new)
    for line in out.splitlines():
        ident, _, pid = line.partition(" ")
        if pid.isdigit() and int(pid) > 0:
            conmons[ident] = int(pid)
    return {
        ident: name
        for ident, name in new.items()
        if name in _SUITE_CONTAINERS
        or (ident in conmons and any(_inside(cwd(conmons[ident]), d) for d in directories))
    }


def remove_containers(idents: Iterable[str]) -> None:
    for ident in idents:
        _podman("rm", "-f", "-t", "1", ident)
