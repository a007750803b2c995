"""Binary wheels for the target platform, installed with pypa/installer into one layer.

pip downloads the wheels for the target's manylinux tags (never for the host), the content cache
keeps them by sha256 under a lock keyed by platform and pins, and the installed layer is cached by
the wheel hashes, so a warm build calls pip for nothing.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

from packager.console import console
from packager.errors import InputError, NetworkError, VerifyError
from packager.image.cache import ContentCache, cached_layer, key_of, store_layer
from packager.image.layer import (
    Compression,
    LayerBlob,
    hash_file,
    normalize_path,
    tree_entries,
    with_parents,
)
from packager.image.slim import LayerPolicy, layer_policy, no_policy
from packager.image.spec import WheelSet
from packager.tools import pip
from packager.tools import python as host_python

_LOCK_VERSION = 1
_LAYER_VERSION = 1


@dataclass(frozen=True)
class LockedWheel:
    """One wheel of the "wheel-lock" record: its file name, sha256 hex and size in bytes."""

    filename: str
    sha256: str  # hex
    size: int


@dataclass(frozen=True)
class WheelLayer:
    """The installed-wheels layer blob and the locked wheels it holds.

    ``cached``: taken from the content cache as it was; ``compiled``: it ships ``.pyc`` files;
    ``description``: every wheel file name, for the image history's ``created_by``.
    """

    blob: LayerBlob
    wheels: tuple[LockedWheel, ...]
    cached: bool
    compiled: bool
    description: str


def lock_key(wheels: WheelSet, arch: str) -> str:
    """The "wheel-lock" record key: sha256 hex of arch, platform tags, Python, pins, with_deps."""
    return key_of(
        {
            "version": _LOCK_VERSION,
            "arch": arch,
            "platforms": pip.platform_tags(arch, wheels.glibc),
            "python": wheels.python_version,
            "requirements": sorted(wheels.requirements),
            "with_deps": wheels.with_deps,
        }
    )


def bytecode_compiler(wheels: WheelSet, release: str | None = None) -> str | None:
    """The host CPython that writes the layer's ``.pyc``, or None for a layer without them.

    ``release`` is the exact CPython release the image ships ("3.11.2", from the Debian lock of
    its ``python3.X-minimal``): then only an interpreter of that release compiles (Debian 12's
    ``/usr/bin/python3.11`` on a host whose own Python is another patch release), so every host
    writes the same bytes (packager.tools.python). Unknown (a user's base image): the building
    interpreter when its minor version is the image's, as the image would compile itself."""
    if release is not None:
        if ".".join(release.split(".")[:2]) != wheels.python_version:
            return None
        return host_python.interpreter_for(release)
    if sys.implementation.name == "cpython" and (
        f"{sys.version_info.major}.{sys.version_info.minor}" == wheels.python_version
    ):
        return sys.executable
    return None


def wheel_policy(wheels: WheelSet) -> LayerPolicy:
    """What the slim policy removes from the wheel layer (nothing when ``wheels.slim`` is False)."""
    if not wheels.slim:
        return no_policy("wheels")
    return layer_policy("wheels", site_packages=wheels.site_packages)


def layer_key(
    wheels: WheelSet,
    locked: tuple[LockedWheel, ...],
    epoch: int,
    compression: Compression = "gzip",
    compiler: str | None = None,
) -> str:
    """The wheel layer's cache key; ``compiler`` is the CPython release that writes its ``.pyc``
    (None: none are written)."""
    return key_of(
        {
            "version": _LAYER_VERSION,
            "wheels": sorted(w.sha256 for w in locked),
            "site_packages": wheels.site_packages,
            "interpreter": wheels.interpreter,
            "python": wheels.python_version,
            "bytecode": compiler is not None,
            # CPython's compiler output changes between patch releases (3.11.2 and 3.11.7
            # compile numpy's pad() differently, issue 13): a layer of another interpreter's
            # .pyc is not this build's.
            "compiler": compiler,
            "epoch": epoch,
            # A policy edit must never reuse a layer built under the old one.
            "slim": wheel_policy(wheels).key(),
            "compression": compression,
        }
    )


def _lock_from_record(doc: dict[str, Any] | None) -> tuple[LockedWheel, ...] | None:
    if not doc or doc.get("version") != _LOCK_VERSION:
        return None
    try:
        return tuple(LockedWheel(**w) for w in doc["wheels"])
    except (KeyError, TypeError):
        return None


def download_wheels(wheels: WheelSet, arch: str, cache: ContentCache) -> tuple[LockedWheel, ...]:
    """Run pip for the target platform and move the wheels into the content cache."""
    console.status(f"downloading wheels for linux/{arch}: {' '.join(wheels.requirements)}")
    # Without dependency resolution each pin is its own download, which gives a progress bar;
    # with it, pip must see all pins at once.
    batches = (
        [[r] for r in wheels.requirements] if not wheels.with_deps else [list(wheels.requirements)]
    )
    with (
        cache.staging_dir("wheels-dl-") as staging,
        console.progress("wheels", len(batches), bytes_=False) as bar,
    ):
        for batch in batches:
            pip.download(
                batch,
                staging,
                arch=arch,
                python_version=wheels.python_version,
                with_deps=wheels.with_deps,
                glibc=wheels.glibc,
            )
            bar.advance(1)
        locked = []
        for path in sorted(staging.glob("*.whl")):
            digest, size = hash_file(path)
            cache.adopt(path, digest)
            locked.append(LockedWheel(path.name, digest.removeprefix("sha256:"), size))
    if not locked:
        raise NetworkError(f"pip downloaded no wheels for {' '.join(wheels.requirements)}")
    return tuple(locked)


def locked_wheels(
    wheels: WheelSet, arch: str, cache: ContentCache, *, refresh: bool, offline: bool
) -> tuple[LockedWheel, ...]:
    """The stored wheel lock for these pins and platform, else pip's download of them, then stored.

    ``refresh`` ignores a stored lock. Raises NetworkError (exit 9) when ``offline`` and none is
    stored.
    """
    key = lock_key(wheels, arch)
    locked = None if refresh else _lock_from_record(cache.get_record("wheel-lock", key))
    if locked is not None:
        return locked
    if offline:
        raise NetworkError(
            f"offline: no cached wheels for {' '.join(wheels.requirements)} on linux/{arch}",
            hint="build once with network access to fill the cache",
        )
    locked = download_wheels(wheels, arch, cache)
    cache.put_record(
        "wheel-lock", key, {"version": _LOCK_VERSION, "wheels": [vars(w) for w in locked]}
    )
    return locked


def scheme(root: Path, wheels: WheelSet) -> dict[str, str]:
    """Where each wheel scheme key lands inside ``root`` (the image's root, staged)."""
    site = root / normalize_path(wheels.site_packages)
    include = root / "usr/local/include" / f"python{wheels.python_version}"
    return {
        "purelib": str(site),
        "platlib": str(site),
        "headers": str(include),
        "scripts": str(root / "usr/local/bin"),
        "data": str(root / "usr/local"),
    }


def install_wheels(paths: list[Path], wheels: WheelSet, root: Path) -> None:
    """Install the wheels (named as on PyPI) into ``root`` with the image's interpreter."""
    destination = SchemeDictionaryDestination(
        scheme(root, wheels),
        interpreter=wheels.interpreter,
        script_kind="posix",
        bytecode_optimization_levels=(),
    )
    for path in paths:
        try:
            # installer warns (and skips) when a wheel ships __pycache__ files; numpy does.
            with WheelFile.open(path) as source, warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                install(source, destination, additional_metadata={"INSTALLER": b"edgepack\n"})
        except Exception as exc:  # installer raises plain exceptions for malformed wheels
            raise InputError(
                f"{path.name}: cannot install this wheel ({exc})",
                hint="pin another version of the package",
            ) from exc


def compile_bytecode(root: Path, wheels: WheelSet, interpreter: str) -> None:
    """Unchecked-hash .pyc files, written by ``interpreter`` with a fixed hash seed: byte-stable,
    and emulated start-up skips compiling."""
    site = root / normalize_path(wheels.site_packages)
    host_python.compile_tree(interpreter, site, wheels.site_packages)


def build_wheel_layer(
    wheels: WheelSet,
    arch: str,
    epoch: int,
    cache: ContentCache,
    *,
    refresh: bool = False,
    offline: bool = False,
    compression: Compression = "gzip",
    python_release: str | None = None,
) -> WheelLayer:
    """The wheel layer; ``python_release`` is the exact CPython release the image ships, when
    known (see :func:`bytecode_compiler`)."""
    locked = locked_wheels(wheels, arch, cache, refresh=refresh, offline=offline)
    description = "wheels: " + " ".join(w.filename for w in locked)
    interpreter = bytecode_compiler(wheels, python_release)
    compiled = interpreter is not None
    if interpreter is None and python_release is not None:
        console.warn(
            f"no CPython {python_release} (the image's) on this host: the wheel layer ships no "
            f".pyc, so its start-up compiles them (install python{wheels.python_version} "
            f"{python_release} for byte-identical .pyc across hosts)"
        )
    compiler = host_python.release_of(interpreter) if interpreter is not None else None
    key = layer_key(wheels, locked, epoch, compression, compiler)
    hit = cached_layer(cache, "wheel-layer", key)
    if hit is not None:
        return WheelLayer(hit, locked, True, compiled, description)
    with cache.staging_dir("wheels-root-") as staging:
        named: list[Path] = []
        (staging / "whl").mkdir()
        for wheel in locked:
            blob = cache.verified_blob("sha256:" + wheel.sha256)
            if blob is None:
                if offline:
                    raise NetworkError(
                        f"offline: cached wheel {wheel.filename} is missing",
                        hint="build once with network access",
                    )
                # The blob went missing: download again and insist on the same bytes.
                again = {w.sha256 for w in download_wheels(wheels, arch, cache)}
                blob = cache.verified_blob("sha256:" + wheel.sha256)
                if wheel.sha256 not in again or blob is None:
                    raise VerifyError(
                        f"{wheel.filename}: the index now serves different bytes",
                        hint="rebuild with the wheel lock refreshed",
                    )
            link = staging / "whl" / wheel.filename
            os.symlink(blob, link)
            named.append(link)
        root = staging / "root"
        root.mkdir()
        console.status(f"installing {len(named)} wheels into {wheels.site_packages}")
        install_wheels(named, wheels, root)
        if interpreter is not None:
            compile_bytecode(root, wheels, interpreter)
        kept, _ = wheel_policy(wheels).split(tree_entries(root))
        layer = store_layer(
            cache,
            "wheel-layer",
            key,
            with_parents(kept),
            mtime=epoch,
            label=f"wheels ({arch})",
            compression=compression,
        )
    return WheelLayer(layer, locked, False, compiled, description)
