"""``edgepack engine build BUNDLE --on ssh://HOST``: the optional backend capability behind it.

A device class whose bundles carry an accelerator engine that only the device itself can build
(a TensorRT plan is tied to the GPU and the TensorRT release) may build it on a reference device
of the same model over ssh, so a fleet installs the prebuilt plan instead of building it on every
device. The core (packager/commands/engine.py) reaches it through :class:`BuildsEngineOn`, never
by naming the class; a backend without the method has nothing to prebuild (exit 10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from packager.bundle.manifest import Manifest
from packager.tools.ssh import SshHost, SshOptions


@dataclass(frozen=True)
class EngineBuildOn:
    """What ``engine build --on`` asks of the reference device.

    - ``host``/``ssh``: where and how to connect (packager.tools.ssh).
    - ``timeout_s``: the whole remote build's limit (s); ``progress_s``: a progress line at
      least this often while it runs (s).
    - ``trtexec``/``lib_dirs``/``python``: the device's builder, where its libraries are, and
      its interpreter (None / () / "python3": the backend's defaults).
    - ``device_root``: where the device's identity files are read (``/``; a fixture tree in
      tests).
    - ``work``: an empty local directory the backend may use.
    - ``on_line``: receives each progress line.
    """

    host: SshHost
    ssh: SshOptions
    timeout_s: int
    progress_s: int
    trtexec: str | None
    lib_dirs: tuple[str, ...]
    python: str
    device_root: str
    work: Path
    on_line: Callable[[str], None]


@dataclass(frozen=True)
class AddedFile:
    """A file to add to the bundle: ``path`` (bundle-relative, POSIX) gets ``source``'s bytes."""

    path: str
    source: Path


@runtime_checkable
class BuildsEngineOn(Protocol):
    """A backend that can prebuild its engine on a reference device."""

    def build_engine_on(
        self, root: Path, manifest: Manifest, job: EngineBuildOn
    ) -> tuple[AddedFile, ...]:
        """Build on ``job.host`` the engine ``manifest`` expects; the files to add to the bundle
        at ``root`` (checked: their key is the manifest's). Raises EdgepackError (nothing is
        added) when the device is not the bundle's, the build fails or the key differs."""
        ...
