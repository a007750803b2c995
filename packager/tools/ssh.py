"""ssh and scp (OpenSSH): commands on, and copies to and from, a remote device.

The one place edgepack starts ``ssh``/``scp`` (used by ``edgepack engine build --on
ssh://HOST``). What reaches them is never a shell string built from user input:

- the destination comes from :func:`parse_ssh_url`: a whole-string allow-list (ASCII host name,
  IPv4 or bracketed IPv6 literal, POSIX-style user name, port 1-65535), so nothing the user types
  becomes an ssh option (``-oProxyCommand=...``) or a shell word (``host;rm``); it is passed after
  ``--`` all the same;
- the remote command is built by :func:`remote_command` from an argv, every word
  ``shlex.quote``-d (ssh hands the remote user's shell one string);
- every call runs with ``BatchMode=yes`` (never a password or passphrase prompt: an unattended
  release job fails instead of hanging), ``StrictHostKeyChecking=yes`` (an unknown or changed
  host key is refused, never trusted on first use: the plan this fetches is installed as root on
  a fleet), agent and X11 forwarding off, and bounded waits (``ConnectTimeout``,
  ``ServerAlive*``, and a wall-clock limit per call after which the client is killed).

The known hosts are the user's own (``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts``)
unless :class:`SshOptions` names a file (``--known-hosts FILE``), which then is the only one read.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.errors import ToolFailedError, UsageError
from packager.runtime.engine_build import KILL_GRACE_S, _stop
from packager.tools.base import Tool

SSH = Tool("ssh", "ssh", "openssh-client")
SCP = Tool("scp", "scp", "openssh-client")

# ssh exits 255 for its own errors (connection, authentication, host key); anything else is the
# remote command's status (ssh(1), EXIT STATUS).
SSH_ERROR = 255
CONNECT_TIMEOUT_S = 20
# A dead link is noticed after ALIVE_INTERVAL_S * ALIVE_COUNT seconds without an answer.
ALIVE_INTERVAL_S = 15
ALIVE_COUNT = 4
# The last lines kept of a command's output for an error message, each cut to MAX_LINE bytes.
TAIL_LINES = 20
MAX_LINE = 2000

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}", re.ASCII)
# useradd's default NAME_REGEX widened to upper case and dots (what sshd accepts in practice).
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", re.ASCII)
_PORT = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
_URL = re.compile(
    r"ssh://(?:(?P<user>[^@/]*)@)?(?P<host>\[[^\]/]*\]|[^:/@\[\]]*)(?::(?P<port>[^/]*))?/?",
    re.ASCII,
)
# A file name handed to ssh's -o options: ssh splits these values at white space and expands
# %-tokens and ~ in them (ssh_config(5)), so only plain path characters pass.
_OPTION_PATH = re.compile(r"[A-Za-z0-9._/+-]{1,4096}", re.ASCII)
# A remote path edgepack builds (a mktemp -d directory and names under it).
REMOTE_PATH = re.compile(r"/(?:[A-Za-z0-9._+-]+/)*[A-Za-z0-9._+-]+", re.ASCII)


@dataclass(frozen=True)
class SshHost:
    """Where to connect: ``host`` (a name, IPv4 address or IPv6 literal without brackets),
    ``user`` (None: ssh's default: ssh_config or the local user), ``port`` (None: 22 or
    ssh_config's)."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{user}{host}{port}"

    @property
    def scp_prefix(self) -> str:
        """``[USER@]HOST`` as scp's remote operand spells it (``[::1]`` for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host


def parse_ssh_url(text: str, where: str = "--on") -> SshHost:
    """``ssh://[USER@]HOST[:PORT]`` -> :class:`SshHost`; UsageError (exit 2) naming ``where``.

    Every part is checked whole against an allow-list (ASCII only); a host starting with ``-``,
    holding a shell or ssh metacharacter, or any non-ASCII character is refused.
    """
    shown = repr(text[:200])
    hint = "use ssh://[USER@]HOST[:PORT], e.g. ssh://nvidia@orin-ref-01:22"
    if not isinstance(text, str) or not text.isascii():
        raise UsageError(f"{where}: {shown} is not an ssh://HOST address (ASCII only)", hint=hint)
    match = _URL.fullmatch(text)
    if match is None:
        raise UsageError(f"{where}: {shown} is not an ssh://[USER@]HOST[:PORT] address",
                         hint=hint)
    user, host, port = match.group("user"), match.group("host"), match.group("port")
    if user is not None and not _USER.fullmatch(user):
        raise UsageError(f"{where}: user {user!r} is not a user name (letters, digits, '_', "
                         "'.', '-'; not starting with '-')", hint=hint)
    if host.startswith("["):
        literal = host[1:-1]
        if not _IPV6.fullmatch(literal) or ":" not in literal:
            raise UsageError(f"{where}: host {host!r} is not an IPv6 address", hint=hint)
        host = literal
    elif not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise UsageError(f"{where}: host {host!r} is not a host name or IP address (letters, "
                         "digits, '-' and '.'; not starting with '-')", hint=hint)
    number: int | None = None
    if port is not None:
        if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
            raise UsageError(f"{where}: port {port!r} is not 1..65535", hint=hint)
        number = int(port)
    return SshHost(host=host, user=user or None, port=number)


@dataclass(frozen=True)
class SshOptions:
    """How to authenticate the device and ourselves.

    ``known_hosts``: the only known-hosts file read (None: ssh's defaults); ``identity``: the
    private key to offer (None: the agent / ssh_config's); both plain paths (see
    :func:`check_option_path`).
    """

    known_hosts: Path | None = None
    identity: Path | None = None


def check_option_path(path: Path, where: str) -> Path:
    """``path`` as an absolute file name ssh's ``-o`` reads literally; UsageError otherwise."""
    absolute = Path(os.path.abspath(path))
    if not _OPTION_PATH.fullmatch(str(absolute)):
        raise UsageError(f"{where}: {str(path)[:200]!r}: use a path of letters, digits and "
                         "'._/+-' (ssh splits and expands others)")
    if not absolute.is_file():
        raise UsageError(f"{where}: {absolute}: no such file")
    return absolute


def ssh_options(options: SshOptions) -> list[str]:
    """The ``-o`` options every ssh and scp call gets (module docstring)."""
    args = [
        "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
        "-o", f"ServerAliveInterval={ALIVE_INTERVAL_S}",
        "-o", f"ServerAliveCountMax={ALIVE_COUNT}",
        "-o", "ForwardAgent=no",
        "-o", "ForwardX11=no",
        "-o", "ClearAllForwardings=yes",
        "-o", "PermitLocalCommand=no",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    if options.known_hosts is not None:
        args += ["-o", f"UserKnownHostsFile={options.known_hosts}",
                 "-o", "GlobalKnownHostsFile=/dev/null"]
    if options.identity is not None:
        args += ["-o", f"IdentityFile={options.identity}", "-o", "IdentitiesOnly=yes"]
    return args


def remote_command(argv: Sequence[str]) -> str:
    """One shell command line from ``argv``, each word quoted (what ssh sends the remote
    shell)."""
    return " ".join(shlex.quote(word) for word in argv)


def ssh_argv(host: SshHost, options: SshOptions, command: str) -> list[str]:
    """ssh's arguments (without the program) to run ``command`` on ``host``."""
    args = ["-T", *ssh_options(options)]
    if host.port is not None:
        args += ["-p", str(host.port)]
    if host.user is not None:
        args += ["-l", host.user]
    return [*args, "--", host.host, command]


def scp_argv(host: SshHost, options: SshOptions, sources: Sequence[str], dest: str) -> list[str]:
    """scp's arguments (without the program): ``-q -r -p``, ssh's options, ``--``, operands."""
    args = ["-q", "-r", "-p", *ssh_options(options)]
    if host.port is not None:
        args += ["-P", str(host.port)]
    return [*args, "--", *sources, dest]


def remote_path(host: SshHost, path: str) -> str:
    """``[USER@]HOST:PATH`` for scp; ``path`` must match :data:`REMOTE_PATH` (ValueError)."""
    if not REMOTE_PATH.fullmatch(path) or "/../" in f"{path}/":
        raise ValueError(f"{path!r} is not a plain absolute remote path")
    return f"{host.scp_prefix}:{path}"


@dataclass(frozen=True)
class Finished:
    """A finished ssh/scp call: its exit status and the last lines it printed."""

    returncode: int
    tail: tuple[str, ...]

    def last(self, lines: int = 3) -> str:
        shown = [line for line in self.tail if line.strip()][-lines:]
        return " | ".join(shown)[-600:] or "(no output)"


class TimedOut(ToolFailedError):
    """The call ran past its wall-clock limit and was killed."""


# _stop (SIGTERM the client's process group, SIGKILL after 5 s, reap it) is the on-device
# builder's own (packager/runtime/engine_build.py): runtime/ may not import host code, so the
# host side imports it.


def _run(
    tool: Tool,
    args: Sequence[str],
    *,
    timeout_s: float,
    on_line: Callable[[str], None] | None,
    what: str,
) -> Finished:
    """Run ``tool`` with ``args``, stdout and stderr merged, each line to ``on_line`` as it
    comes; killed (TimedOut) past ``timeout_s`` whether or not it prints."""
    process = tool.popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, new_session=True)
    lines: queue.Queue[bytes | None] = queue.Queue(maxsize=1024)

    def pump() -> None:
        assert process.stdout is not None
        while True:
            raw = process.stdout.readline(MAX_LINE)  # bounded: a line without end is cut
            if not raw:
                break
            lines.put(raw)
        lines.put(None)

    reader = threading.Thread(target=pump, name=f"{tool.name}-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                raw = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if raw is None:  # output closed: the exit status, within what is left of the limit
                code = process.wait(timeout=max(0.1, deadline - time.monotonic()))
                return Finished(returncode=code, tail=tuple(tail))
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            tail.append(text)
            if on_line is not None:
                on_line(text)
    except subprocess.TimeoutExpired:
        pass
    finally:  # past the limit, or an error: the client (and what it started) is stopped
        _stop(process)
        if process.stdout is not None:
            process.stdout.close()
        reader.join(timeout=KILL_GRACE_S)
    raise TimedOut(f"{what}: no result after {timeout_s:.0f} s; stopped",
                   hint="raise --timeout if the device is slow")


def connection_problem(host: SshHost, finished: Finished) -> ToolFailedError:
    """ssh's own failure (exit 255) as one line with the fix for the usual causes."""
    text = " ".join(finished.tail)
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION" in text:
        hint = ("its host key is not in the known hosts (or changed): check the key's "
                "fingerprint on the device, add it (ssh-keyscan HOST >> FILE) and pass "
                "--known-hosts FILE")
    elif "Permission denied" in text:
        hint = "no key was accepted: pass --identity KEY or load one into ssh-agent"
    else:
        hint = "check the address, the port and that sshd runs on the device"
    return ToolFailedError(f"{host.url}: ssh could not connect: {finished.last(2)}", hint=hint)


def run(
    host: SshHost,
    options: SshOptions,
    argv: Sequence[str],
    *,
    timeout_s: float,
    on_line: Callable[[str], None] | None = None,
    what: str = "ssh",
) -> Finished:
    """Run ``argv`` (quoted word by word) on ``host``; the remote status is the caller's to
    judge. ToolFailedError when ssh itself fails (exit 255); TimedOut past ``timeout_s``."""
    finished = _run(SSH, ssh_argv(host, options, remote_command(argv)), timeout_s=timeout_s,
                    on_line=on_line, what=f"{host.url}: {what}")
    if finished.returncode == SSH_ERROR:
        raise connection_problem(host, finished)
    return finished


def _copy(host: SshHost, argv: list[str], *, timeout_s: float, what: str) -> None:
    """Run scp with ``argv``; ToolFailedError naming ``what`` unless it exits 0 (ssh's own
    connection failure, exit 255 with no ``scp:`` line, explained as such)."""
    finished = _run(SCP, argv, timeout_s=timeout_s, on_line=None, what=f"{host.url}: {what}")
    if finished.returncode != 0:
        if finished.returncode == SSH_ERROR and "scp:" not in " ".join(finished.tail):
            raise connection_problem(host, finished)
        raise ToolFailedError(f"{host.url}: {what} failed "
                              f"(exit {finished.returncode}): {finished.last()}")


def copy_to(
    host: SshHost, options: SshOptions, sources: Sequence[Path], remote_dir: str,
    *, timeout_s: float,
) -> None:
    """Copy local files and directories (recursively, modes kept) into ``remote_dir``."""
    dest = remote_path(host, remote_dir) + "/"
    _copy(host, scp_argv(host, options, [os.fspath(s) for s in sources], dest),
          timeout_s=timeout_s, what=f"scp to {remote_dir}")


def copy_from(
    host: SshHost, options: SshOptions, remote_files: Sequence[str], local_dir: Path,
    *, timeout_s: float,
) -> None:
    """Copy remote files into the existing local directory ``local_dir``."""
    sources = [remote_path(host, path) for path in remote_files]
    _copy(host, scp_argv(host, options, sources, os.fspath(local_dir) + "/"),
          timeout_s=timeout_s, what="scp from the device")
