"""A minimal Debian root filesystem for the target architecture, as one deterministic layer.

The real apt resolves the package closure under a private configuration in the cache (the host's
architectures and sources are never touched) and the result is pinned in a lock: package, version,
file name, size and the SHA256 from the signed index. The debs live in the content cache and the
finished layer blob is cached by the lock and everything else that shapes it, so a warm build runs
neither apt nor dpkg-deb. Packages are unpacked with ``dpkg-deb --fsys-tarfile`` and merged into
Debian 12's merged-/usr layout the way debootstrap does; maintainer scripts are not run.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote

from packager.console import console
from packager.errors import NetworkError, TargetError, VerifyError
from packager.image import layer
from packager.image.cache import ContentCache, cached_layer, key_of, store_layer
from packager.image.slim import LayerPolicy, layer_policy, no_policy
from packager.image.spec import DebianBase
from packager.tools import apt, dpkg

DEFAULT_PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1")

# Top-level directories that are symlinks into usr/ (debootstrap's setup_merged_usr for Debian 12).
MERGED_USR_DIRS: dict[str, tuple[str, ...]] = {
    "arm64": ("bin", "sbin", "lib"),
    "amd64": ("bin", "sbin", "lib", "lib64"),
}

DEBIAN_RELEASES = {"bullseye": "11", "bookworm": "12", "trixie": "13"}

# Licence notices stay even when usr/share/doc is excluded: redistributing the image needs them.
_KEEP_ALWAYS = re.compile(r"usr/share/doc/[^/]+/copyright")

_LOCK_VERSION = 1
_LAYER_VERSION = 1


@dataclass(frozen=True)
class LockedPackage:
    """One .deb of the resolved closure as the signed Packages index lists it; ``size`` in bytes."""

    package: str
    version: str
    architecture: str
    filename: str  # the .deb's file name as apt writes it
    size: int
    sha256: str  # hex, from the signed Packages index


@dataclass(frozen=True)
class DebianLock:
    """The package closure apt resolved for ``requested`` on one architecture and suite.

    Stored as the "debian-lock" cache record; ``from_json`` returns None for a record of another
    lock version or a malformed one (:func:`load_or_resolve_lock` then resolves again).
    """

    arch: str
    suite: str
    requested: tuple[str, ...]
    packages: tuple[LockedPackage, ...]  # sorted by package name

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _LOCK_VERSION,
            "arch": self.arch,
            "suite": self.suite,
            "requested": list(self.requested),
            "packages": [vars(p) for p in self.packages],
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> DebianLock | None:
        if doc.get("version") != _LOCK_VERSION:
            return None
        try:
            return DebianLock(
                arch=str(doc["arch"]),
                suite=str(doc["suite"]),
                requested=tuple(doc["requested"]),
                packages=tuple(LockedPackage(**p) for p in doc["packages"]),
            )
        except (KeyError, TypeError):
            return None


@dataclass(frozen=True)
class BaseLayer:
    """The Debian base layer blob and the lock it was built from.

    ``cached``: taken from the content cache as it was; ``description``: suite, architecture and
    every package=version, for the image history's ``created_by``.
    """

    blob: layer.LayerBlob
    lock: DebianLock
    cached: bool
    description: str


# --- pure helpers ---------------------------------------------------------------------------


def merged_usr_path(path: str, arch: str) -> str:
    """Where a package path lands on a merged-/usr system: ``bin/ls`` -> ``usr/bin/ls``."""
    path = layer.normalize_path(path)
    head, _, _ = path.partition("/")
    if head in MERGED_USR_DIRS[arch]:
        return "usr/" + path
    return path


def is_excluded(path: str, exclude: tuple[str, ...]) -> bool:
    """True when ``path`` is an excluded path or lies under one (licence notices are kept)."""
    if _KEEP_ALWAYS.fullmatch(path):
        return False
    for pattern in exclude:
        prefix = layer.normalize_path(pattern)
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            return True
    return False


# Each field of a source line is checked whole: no value can add a line, an option such as
# [trusted=yes] or another component to the apt configuration the image is built from.
_SOURCE_FIELDS = {
    "suite": re.compile(r"[a-z]{2,32}"),
    "mirror": re.compile(r"https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?(/[A-Za-z0-9._~+/-]*)?"),
    "keyring": re.compile(r"/[A-Za-z0-9._+/-]{1,255}"),
}


def source_lines(base: DebianBase) -> list[str]:
    """The one-line-style apt sources for ``base``, built from its structured fields.

    Raises TargetError when a field is not of its plain form (the suite comes from the target's
    ``runtime.base``).
    """
    fields = {
        "suite": base.suite,
        "mirror": base.mirror,
        "security mirror": base.security_mirror,
        "keyring": base.keyring,
    }
    for label, value in fields.items():
        pattern = _SOURCE_FIELDS[label.removeprefix("security ")]
        if not pattern.fullmatch(value):
            raise TargetError(
                f"Debian base: {label} {value!r} must match {pattern.pattern}",
                hint="check runtime.base in the target file (e.g. debian:bookworm)",
            )
    signed = f"[signed-by={base.keyring}]"
    return [
        f"deb {signed} {base.mirror} {base.suite} main",
        f"deb {signed} {base.mirror} {base.suite}-updates main",
        f"deb {signed} {base.security_mirror} {base.suite}-security main",
    ]


def lock_key(base: DebianBase, arch: str) -> str:
    """The "debian-lock" record key: sha256 hex of the architecture, suite, sources and packages.

    Raises TargetError (exit 4) as :func:`source_lines` does.
    """
    return key_of(
        {
            "arch": arch,
            "suite": base.suite,
            "sources": source_lines(base),
            "packages": sorted(set(base.packages)),
        }
    )


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """Debian control stanzas (``Key: value`` with indented continuations) as dicts."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, ""
        elif line[0] in " \t" and last:
            current[last] += "\n" + line
        else:
            key, _, value = line.partition(":")
            last = key.strip()
            current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def split_deb_filename(filename: str) -> tuple[str, str, str]:
    """``libc6_2.36-9+deb12u14_arm64.deb`` -> (package, version, arch); ``%3a`` is an epoch."""
    stem = filename.removesuffix(".deb")
    package, version, arch = stem.split("_")
    return package, unquote(version), arch


def passwd_text(users: tuple[tuple[str, int], ...]) -> str:
    """``/etc/passwd``: root, then one nologin account per (name, uid) user, with gid = uid."""
    lines = ["root:x:0:0:root:/root:/bin/sh"]
    lines += [f"{name}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin" for name, uid in users]
    return "".join(line + "\n" for line in lines)


def group_text(users: tuple[tuple[str, int], ...]) -> str:
    """``/etc/group``: root, then one group per (name, uid) user, with gid equal to the uid."""
    lines = ["root:x:0:"] + [f"{name}:x:{uid}:" for name, uid in users]
    return "".join(line + "\n" for line in lines)


def os_release_text(suite: str) -> str:
    """Debian's ``os-release`` (``KEY="value"`` lines) for ``suite``.

    A suite not in DEBIAN_RELEASES gets no version number (VERSION_ID left out).
    """
    number = DEBIAN_RELEASES.get(suite, "")
    pretty = f"Debian GNU/Linux {number} ({suite})" if number else f"Debian GNU/Linux ({suite})"
    fields = {
        "PRETTY_NAME": pretty,
        "NAME": "Debian GNU/Linux",
        "VERSION_ID": number,
        "VERSION": f"{number} ({suite})" if number else suite,
        "VERSION_CODENAME": suite,
        "ID": "debian",
        "HOME_URL": "https://www.debian.org/",
        "BUG_REPORT_URL": "https://bugs.debian.org/",
    }
    return "".join(f'{k}="{v}"\n' for k, v in fields.items() if v)


def dpkg_status_stanza(control: str) -> str:
    """A ``/var/lib/dpkg/status`` entry, so scanners can list what the image contains."""
    out: list[str] = []
    for line in control.rstrip("\n").splitlines():
        out.append(line)
        if line.startswith("Package:"):
            out.append("Status: install ok installed")
    return "\n".join(out) + "\n"


# --- resolution and download -----------------------------------------------------------------


def _apt_root(cache: ContentCache, base: DebianBase, arch: str) -> apt.AptRoot:
    # Keyed by architecture and sources only: every package list shares one set of indexes.
    key = key_of({"arch": arch, "sources": source_lines(base)})
    root = apt.AptRoot(cache.root / "apt" / key[:24], arch)
    root.prepare(source_lines(base))
    return root


def resolve(base: DebianBase, arch: str, cache: ContentCache) -> DebianLock:
    """Run the real apt: update the private indexes, take the closure and its SHA256s."""
    root = _apt_root(cache, base, arch)
    console.status(f"resolving {len(base.packages)} Debian {base.suite} packages for {arch}")
    apt.update(root)
    planned = apt.print_uris(root, list(base.packages))
    specs = []
    for item in planned:
        package, version, _ = split_deb_filename(item.filename)
        specs.append(f"{package}={version}")
    stanzas = {
        (s.get("Package", ""), s.get("Version", "")): s
        for s in parse_stanzas(apt.show(root, specs))
    }
    locked = []
    for item in planned:
        package, version, deb_arch = split_deb_filename(item.filename)
        stanza = stanzas.get((package, version))
        if stanza is None or "SHA256" not in stanza:
            raise VerifyError(
                f"apt index has no SHA256 for {package}={version}", hint="refresh the package lock"
            )
        locked.append(
            LockedPackage(
                package, version, deb_arch, item.filename, item.size, stanza["SHA256"].lower()
            )
        )
    return DebianLock(
        arch, base.suite, tuple(base.packages), tuple(sorted(locked, key=lambda p: p.package))
    )


def load_or_resolve_lock(
    base: DebianBase, arch: str, cache: ContentCache, *, refresh: bool, offline: bool
) -> tuple[DebianLock, bool]:
    """The stored lock for these inputs, or a fresh one; second value: True if it was stored."""
    key = lock_key(base, arch)
    if not refresh:
        doc = cache.get_record("debian-lock", key)
        lock = DebianLock.from_json(doc) if doc else None
        if lock is not None:
            return lock, True
    if offline:
        raise NetworkError(
            f"offline: no package lock for Debian {base.suite}/{arch} in {cache.root}",
            hint="build once with network access to fill the cache",
        )
    lock = resolve(base, arch, cache)
    cache.put_record("debian-lock", key, lock.to_json())
    return lock, False


def fetch_debs(
    lock: DebianLock, base: DebianBase, cache: ContentCache, *, offline: bool
) -> dict[str, Path]:
    """package name -> verified .deb in the content cache, downloading only what is missing."""
    found: dict[str, Path] = {}
    missing: list[LockedPackage] = []
    for pkg in lock.packages:
        path = cache.verified_blob("sha256:" + pkg.sha256)
        if path is None:
            missing.append(pkg)
        else:
            found[pkg.package] = path
    if not missing:
        return found
    if offline:
        names = ", ".join(p.package for p in missing[:5])
        raise NetworkError(
            f"offline: {len(missing)} locked packages are not cached ({names})",
            hint="build once with network access to fill the cache",
        )
    root = _apt_root(cache, base, lock.arch)
    if not any((root.root / "lists").glob("*Packages*")):
        apt.update(root)
    total = sum(p.size for p in missing)
    console.status(f"downloading {len(missing)} Debian packages ({total / 1e6:.1f} MB)")
    sizes = {p.package: p.size for p in missing}
    with (
        cache.staging_dir("debs-") as staging,
        console.progress("Debian packages", total) as bar,
    ):
        apt.download(
            root,
            [f"{p.package}={p.version}" for p in missing],
            staging,
            on_fetched=lambda name: bar.advance(sizes.get(name.split(":")[0], 0)),
        )
        for pkg in missing:
            deb = staging / pkg.filename
            if not deb.is_file():
                candidates = sorted(staging.glob(f"{pkg.package}_*.deb"))
                if len(candidates) != 1:
                    raise NetworkError(
                        f"apt-get download did not produce {pkg.filename}",
                        hint="refresh the package lock",
                    )
                deb = candidates[0]
            digest, size = layer.hash_file(deb)
            if digest != "sha256:" + pkg.sha256 or size != pkg.size:
                raise VerifyError(
                    f"{pkg.filename}: sha256/size differ from the package lock",
                    hint="the mirror changed this version; refresh the package lock",
                )
            found[pkg.package] = cache.adopt(deb, digest)
    return found


# --- merging into one layer ------------------------------------------------------------------


def _member_opener(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        stream = tf.extractfile(member)
        if stream is None:
            raise VerifyError(f"cannot read {member.name} from a package archive")
        return stream

    return open_member


def merge_package_tar(
    tf: tarfile.TarFile,
    entries: dict[str, layer.TarEntry],
    *,
    arch: str,
    exclude: tuple[str, ...],
) -> None:
    """Add one package's filesystem tar to ``entries`` (path -> entry); later packages win."""
    for member in tf.getmembers():
        path = merged_usr_path(member.name, arch)
        if not path or is_excluded(path, exclude):
            continue
        existing = entries.get(path)
        if member.isdir():
            if existing is None or existing.kind != "dir":
                entries[path] = layer.TarEntry(path, "dir", member.mode, member.uid, member.gid)
            continue
        if existing is not None and existing.kind == "dir":
            continue  # a file never replaces a directory another package populated
        if member.issym():
            entries[path] = layer.TarEntry(
                path, "symlink", 0o777, member.uid, member.gid, linkname=member.linkname
            )
        elif member.islnk() or member.isreg():
            # Hard links become copies: sorted output could put the link before its target.
            file = tf.getmember(member.linkname) if member.islnk() else member
            entries[path] = layer.TarEntry(
                path,
                "file",
                file.mode,
                file.uid,
                file.gid,
                size=file.size,
                data=_member_opener(tf, member),
            )
        # Device nodes and fifos have no place in an image layer; engines provide /dev.


def skeleton_entries(
    arch: str, suite: str, users: tuple[tuple[str, int], ...], entries: dict[str, layer.TarEntry]
) -> list[layer.TarEntry]:
    """What debootstrap and base-files would add: merged-/usr links, users, /tmp, os-release."""
    extra: list[layer.TarEntry] = []
    for name in MERGED_USR_DIRS[arch]:
        extra.append(layer.TarEntry(name, "symlink", 0o777, linkname=f"usr/{name}"))
        if f"usr/{name}" not in entries:
            extra.append(layer.TarEntry(f"usr/{name}", "dir", 0o755))
    for path, mode in (
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("root", 0o700),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
    ):
        extra.append(layer.TarEntry(path, "dir", mode))

    def text(path: str, content: str) -> layer.TarEntry:
        data = content.encode()
        return layer.TarEntry(path, "file", 0o644, size=len(data), data=data)

    extra += [text("etc/passwd", passwd_text(users)), text("etc/group", group_text(users))]
    if "etc/os-release" not in entries and "usr/lib/os-release" not in entries:
        extra.append(text("usr/lib/os-release", os_release_text(suite)))
        extra.append(layer.TarEntry("etc/os-release", "symlink", 0o777,
                                    linkname="../usr/lib/os-release"))
    if "usr/bin/python3" not in entries and "usr/bin/python3.11" in entries:
        extra.append(layer.TarEntry("usr/bin/python3", "symlink", 0o777, linkname="python3.11"))
    return extra


def base_policy(base: DebianBase) -> LayerPolicy:
    """What the slim policy removes from this base (nothing when ``base.slim`` is False)."""
    return layer_policy("base") if base.slim else no_policy("base")


def base_layer_key(
    base: DebianBase,
    lock: DebianLock,
    users: tuple[tuple[str, int], ...],
    epoch: int,
    compression: layer.Compression = "gzip",
) -> str:
    """The "debian-layer" record key: sha256 hex of everything that shapes the layer's bytes.

    That is: architecture, suite, the locked .debs' sha256s, excluded paths, users, the mtime
    ``epoch`` (seconds), the slim policy and the compression.
    """
    return key_of(
        {
            "version": _LAYER_VERSION,
            "arch": lock.arch,
            "suite": lock.suite,
            "packages": [p.sha256 for p in lock.packages],
            "exclude": list(base.exclude),
            "users": [list(u) for u in users],
            "epoch": epoch,
            # A policy edit must never reuse a layer built under the old one.
            "slim": base_policy(base).key(),
            "compression": compression,
        }
    )


def build_base_layer(
    base: DebianBase,
    arch: str,
    users: tuple[tuple[str, int], ...],
    epoch: int,
    cache: ContentCache,
    *,
    refresh: bool = False,
    offline: bool = False,
    compression: layer.Compression = "gzip",
) -> BaseLayer:
    """The Debian base layer blob, from the cache when the same lock built it before."""
    lock, _ = load_or_resolve_lock(base, arch, cache, refresh=refresh, offline=offline)
    description = f"debian {lock.suite} {arch}: " + " ".join(
        f"{p.package}={p.version}" for p in lock.packages
    )
    key = base_layer_key(base, lock, users, epoch, compression)
    hit = cached_layer(cache, "debian-layer", key)
    if hit is not None:
        return BaseLayer(hit, lock, True, description)
    debs = fetch_debs(lock, base, cache, offline=offline)
    console.status(f"assembling the Debian base from {len(debs)} packages")
    with cache.staging_dir("rootfs-") as staging, ExitStack() as stack:
        entries: dict[str, layer.TarEntry] = {}
        status_parts: list[str] = []
        for index, pkg in enumerate(lock.packages):
            data_tar = staging / f"{index:03d}-{pkg.package}.tar"
            dpkg.fsys_tarfile(debs[pkg.package], data_tar)
            tf = stack.enter_context(tarfile.open(data_tar, "r:"))
            merge_package_tar(tf, entries, arch=arch, exclude=base.exclude)
            status_parts.append(dpkg_status_stanza(dpkg.control(debs[pkg.package])))
        status = "\n".join(status_parts).encode()
        for entry in skeleton_entries(arch, lock.suite, users, entries):
            entries[entry.path] = entry
        entries["var/lib/dpkg/status"] = layer.TarEntry(
            "var/lib/dpkg/status", "file", 0o644, size=len(status), data=status
        )
        # The status file keeps every package: scanners still see what the files came from.
        kept, _ = base_policy(base).split(entries.values())
        blob = store_layer(
            cache,
            "debian-layer",
            key,
            layer.with_parents(kept),
            mtime=epoch,
            label=f"base ({arch})",
            compression=compression,
        )
    return BaseLayer(blob, lock, False, description)
