"""pip (``python -m pip`` of the running interpreter): downloads wheels for a foreign platform."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packager.errors import NetworkError, ToolFailedError
from packager.tools.base import Tool, _tail

# The interpreter edgepack runs under always has pip next to it in a venv; the apt package is
# for a system Python without it.
PIP = Tool("pip", sys.executable, "python3-pip")

_MACHINE = {"arm64": "aarch64", "amd64": "x86_64"}


def platform_tags(arch: str, glibc: tuple[int, int] = (2, 36)) -> list[str]:
    """Every manylinux tag a system with ``glibc`` runs, newest first.

    pip takes ``--platform`` tags literally (it does not widen ``manylinux_2_28`` to older
    glibc versions), so the whole compatible range is listed; Debian 12 ships glibc 2.36.
    """
    machine = _MACHINE[arch]
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 16, -1)]
    tags.append(f"manylinux2014_{machine}")
    if machine == "x86_64":
        tags += [f"manylinux_2_12_{machine}", f"manylinux2010_{machine}",
                 f"manylinux_2_5_{machine}", f"manylinux1_{machine}"]
    return tags


def download(
    requirements: list[str],
    dest: Path,
    *,
    arch: str,
    python_version: str,
    with_deps: bool,
    glibc: tuple[int, int] = (2, 36),
) -> None:
    """Download binary wheels of ``requirements`` for linux/``arch`` CPython ``python_version``
    on a system with ``glibc`` (:func:`platform_tags`)."""
    abi = "cp" + python_version.replace(".", "")
    args: list[str] = ["-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                       "--only-binary=:all:", "--dest", str(dest)]
    for tag in platform_tags(arch, glibc):
        args += ["--platform", tag]
    args += ["--python-version", python_version, "--implementation", "cp",
             "--abi", abi, "--abi", "abi3", "--abi", "none"]
    if not with_deps:
        args.append("--no-deps")
    proc = PIP.run([*args, *requirements], timeout=1800, check=False)
    if proc.returncode == 0:
        return
    err = (proc.stderr or b"").decode("utf-8", "replace")
    m = re.search(r"No matching distribution found for (\S+)", err)
    if m:
        raise ToolFailedError(
            f"pip: no linux/{arch} wheel of '{m[1]}' for CPython {python_version}",
            hint="pin a version that publishes a manylinux wheel for this platform",
        )
    if re.search(r"(ConnectionError|Max retries|NewConnectionError|timed out|ProxyError)", err):
        raise NetworkError(
            f"pip download of {', '.join(requirements)} failed: {_tail(proc.stderr)}",
            hint="check the network, proxy or package index settings",
        )
    raise ToolFailedError(f"pip download of {', '.join(requirements)} failed: {_tail(proc.stderr)}")
