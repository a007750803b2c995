"""dpkg-deb: reads .deb archives (their data tar and control fields) without installing them."""

from __future__ import annotations

from pathlib import Path

from packager.errors import InputError, ToolFailedError
from packager.tools.base import Tool

DPKG_DEB = Tool("dpkg-deb", "dpkg-deb", "dpkg")


def fsys_tarfile(deb: Path, dest: Path) -> None:
    """Write the package's filesystem tar (``data.tar`` decompressed) to ``dest``."""
    with dest.open("wb") as out:
        proc = DPKG_DEB.popen(["--fsys-tarfile", deb], stdout=out.fileno(), stderr=None)
        code = proc.wait()
    if code != 0:
        raise ToolFailedError(
            f"dpkg-deb --fsys-tarfile {deb.name} failed (exit {code})",
            hint=f"the cached package may be damaged: delete {deb} and rebuild",
        )


def control(deb: Path) -> str:
    """The package's control stanza (``Package:``, ``Version:``, ``Depends:``, ...)."""
    proc = DPKG_DEB.run(["--field", deb], check=False)
    if proc.returncode != 0:
        raise InputError(
            f"{deb}: not a readable Debian package",
            hint="delete it from the cache and rebuild",
        )
    return proc.stdout.decode("utf-8", "replace")
