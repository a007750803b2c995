"""apt-get / apt-cache under a private configuration, for resolving a foreign-architecture rootfs.

Every call passes ``-o`` options that point apt's state, cache, sources and preferences into a
directory edgepack owns, so the host's dpkg architectures, sources and package state are never
read or changed. The host's ``/etc/apt/apt.conf.d`` parts still apply: proxies are configured there.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from packager.errors import NetworkError, ToolFailedError
from packager.tools.base import Tool, _tail

APT_GET = Tool("apt-get", "apt-get", "apt")
APT_CACHE = Tool("apt-cache", "apt-cache", "apt")

_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class AptRoot:
    """A private apt state directory for one (architecture, sources) pair."""

    root: Path
    arch: str

    @property
    def sources_list(self) -> Path:
        return self.root / "sources.list"

    def options(self) -> list[str]:
        d = self.root
        pairs = {
            "APT::Architecture": self.arch,
            "APT::Architectures::": self.arch,
            "Dir::State": d,
            "Dir::State::Lists": d / "lists",
            "Dir::State::status": d / "status",
            "Dir::Cache": d,
            "Dir::Cache::archives": d / "archives",
            "Dir::Etc::SourceList": self.sources_list,
            "Dir::Etc::SourceParts": d / "sources.list.d",
            "Dir::Etc::Preferences": d / "preferences",
            "Dir::Etc::PreferencesParts": d / "preferences.d",
            "Debug::NoLocking": "1",
            "APT::Install-Recommends": "0",
            "APT::Get::Assume-Yes": "1",
        }
        return [arg for key, value in pairs.items() for arg in ("-o", f"{key}={value}")]

    def prepare(self, source_lines: list[str]) -> None:
        """Create the directory skeleton apt expects, with an empty dpkg status."""
        for sub in ("lists/partial", "archives/partial", "sources.list.d", "preferences.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for name in ("status", "preferences"):
            (self.root / name).touch()
        self.sources_list.write_text("".join(line + "\n" for line in source_lines))


def _stderr(proc: subprocess.CompletedProcess[bytes]) -> str:
    return (proc.stderr or b"").decode("utf-8", "replace")


def update(apt: AptRoot) -> None:
    """Fetch the package indexes into the private state directory."""
    proc = APT_GET.run([*apt.options(), "-q", "update"], timeout=_TIMEOUT_S, check=False)
    err = _stderr(proc)
    if proc.returncode != 0 or re.search(r"^(W: Failed to fetch|E: )", err, re.M):
        raise NetworkError(
            f"apt-get update for {apt.arch} failed: {_tail(proc.stderr)}",
            hint=f"check the mirrors in {apt.sources_list} and the network or proxy",
        )


@dataclass(frozen=True)
class PlannedDownload:
    """One line of ``apt-get install --print-uris``."""

    uri: str
    filename: str
    size: int


_URI_LINE = re.compile(r"^'(?P<uri>[^']+)' (?P<file>\S+) (?P<size>\d+)")


def parse_print_uris(text: str) -> list[PlannedDownload]:
    """The downloads in ``apt-get install --print-uris`` output, lines ``'URI' FILE SIZE ...``
    (size in bytes); other lines are skipped."""
    found = []
    for line in text.splitlines():
        m = _URI_LINE.match(line)
        if m:
            found.append(PlannedDownload(m["uri"], m["file"], int(m["size"])))
    return found


def _install_failure(err: str, packages: list[str]) -> ToolFailedError:
    for pattern in (
        r"Unable to locate package (\S+)",
        r"Package '?([^' ]+)'? has no installation candidate",
        r"Version '[^']+' for '([^']+)' was not found",
    ):
        m = re.search(pattern, err)
        if m:
            return ToolFailedError(
                f"apt: package '{m[1]}' is not available for this architecture and suite",
                hint="check the name in the base package list, or refresh the package lock",
            )
    if "unmet dependencies" in err:
        return ToolFailedError(
            f"apt: the packages {', '.join(packages)} have unmet dependencies: "
            + _tail(err.encode()),
            hint="drop or change the conflicting package",
        )
    return ToolFailedError(f"apt-get install failed: {_tail(err.encode())}")


def print_uris(apt: AptRoot, packages: list[str]) -> list[PlannedDownload]:
    """The full dependency closure of ``packages`` (on an empty system), without downloading."""
    proc = APT_GET.run(
        [*apt.options(), "-q", "install", "--print-uris", "--no-install-recommends", *packages],
        timeout=_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise _install_failure(_stderr(proc), packages)
    return parse_print_uris(proc.stdout.decode("utf-8", "replace"))


def show(apt: AptRoot, specs: list[str]) -> str:
    """``apt-cache show`` stanzas for ``name=version`` specs (SHA256 comes from here)."""
    proc = APT_CACHE.run([*apt.options(), "show", "--no-all-versions", *specs], check=False)
    if proc.returncode != 0:
        raise _install_failure(_stderr(proc), specs)
    return proc.stdout.decode("utf-8", "replace")


def fetched_package(line: str) -> str | None:
    """The package in apt's "Get:2 http://mirror suite/main arm64 zlib1g arm64 1:1.2 [82 kB]"."""
    parts = line.split()
    if len(parts) > 5 and parts[0].startswith("Get:"):
        return parts[4]
    return None


def download(
    apt: AptRoot, specs: list[str], dest: Path, on_fetched: Callable[[str], None] | None = None
) -> None:
    """Download exact ``name=version`` debs into ``dest``; apt checks them against the index.

    ``on_fetched`` is called with each package name as apt reports it ("Get:N ... name arch
    version [size]"), for a progress bar.
    """

    def line(text: str) -> None:
        name = fetched_package(text)
        if on_fetched is not None and name is not None:
            on_fetched(name)

    proc = APT_GET.stream([*apt.options(), "download", *specs], line, cwd=dest, timeout=_TIMEOUT_S)
    if proc.returncode != 0:
        raise NetworkError(
            f"apt-get download failed: {_tail(proc.stderr)}",
            hint="check the network or proxy; if the pinned versions left the mirror, "
            "rebuild with the package lock refreshed",
        )
