"""Registry references (``docker://...``) and base images pulled from a registry (issue 13).

A reference edgepack accepts is allow-listed whole against the distribution reference grammar
(github.com/distribution/reference, regexp.go), in the two forms it uses:

- ``docker://REGISTRY[:PORT]/REPO[/...]:TAG``: where ``edgepack push`` puts images;
- ``docker://REGISTRY[:PORT]/REPO[/...]@sha256:HEX``: a ``--base`` image, pinned by digest so that
  the same build gives the same bytes. skopeo checks the registry's answer against the digest.

The registry host is always explicit (a dot, a port or ``localhost``): nothing goes to or comes
from Docker Hub by accident. A pulled base is kept in the content cache as an OCI layout per
(digest, platform): a later build, ``--offline`` included, uses it without the network.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from packager.errors import (
    InputError,
    NetworkError,
    ToolFailedError,
    UsageError,
    VerifyError,
)
from packager.image.cache import ContentCache
from packager.image.layer import hash_file
from packager.image.oci import blob_name, open_source, select_manifest
from packager.image.spec import ArchiveBase, RegistryBase
from packager.tools.skopeo import RegistryOptions, pull_to_layout

_HOST_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*|\[[0-9A-Fa-f:]+\])(?::[0-9]{{1,5}})?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = rf"{_PATH_PART}(?:/{_PATH_PART})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
TAGGED = re.compile(rf"docker://(?P<host>{_HOST})/(?P<repo>{_REPO}):(?P<tag>{_TAG})")
PINNED = re.compile(rf"docker://(?P<host>{_HOST})/(?P<repo>{_REPO})@sha256:(?P<hex>[0-9a-f]{{64}})")


def _explicit_host(host: str) -> bool:
    # Docker's rule (reference.splitDockerDomain): a first component with a dot or a port, or
    # "localhost", names a registry; anything else is a Docker Hub namespace.
    return host.startswith("[") or "." in host or ":" in host or host == "localhost"


def parse_destination(reference: str) -> str:
    """``docker://REGISTRY/REPO:TAG`` (whole-string match) or UsageError."""
    match = TAGGED.fullmatch(reference)
    if match is None or not _explicit_host(match["host"]):
        raise UsageError(
            f"push destination {reference!r}: expected docker://REGISTRY/REPO:TAG",
            hint="name the registry host (e.g. docker://registry.example.com:5000/mnist:1.0.0); "
            "lower-case repository path, a tag of letters, digits, '_', '.', '-'",
        )
    return reference


def parse_pinned(reference: str, label: str = "--base") -> RegistryBase:
    """``docker://REGISTRY/REPO@sha256:HEX`` (whole-string match) or UsageError."""
    match = PINNED.fullmatch(reference)
    if match is None or not _explicit_host(match["host"]):
        raise UsageError(
            f"{label} {reference!r}: expected docker://REGISTRY/REPO@sha256:<64 hex digits>",
            hint="pin the base by digest (skopeo inspect docker://REGISTRY/REPO:TAG shows it)",
        )
    return RegistryBase(reference=reference, digest=f"sha256:{match['hex']}")


def cached_layout(cache: ContentCache, base: RegistryBase, arch: str, variant: str | None) -> Path:
    """Where the pull of ``base`` for ``linux/ARCH[/VARIANT]`` is kept in ``cache``."""
    hexdigest = base.digest.removeprefix("sha256:")
    return cache.root / "registry" / f"{hexdigest}-{arch}{'-' + variant if variant else ''}"


def _check_layout(layout: Path, base: RegistryBase, arch: str) -> None:
    """The layout's manifest and config hash to their names (its layers are checked as they
    are copied into the blob store), and a manifest digest that was pinned is the one there."""
    label = f"--base {base.reference}"
    with open_source(layout, label) as source:
        desc, manifest = select_manifest(source, arch)
        config = manifest.get("config") or {}
        for digest in (desc.digest, str(config.get("digest"))):
            path = layout / blob_name(digest)
            if not path.is_file() or hash_file(path)[0] != digest:
                raise VerifyError(f"{label}: cached {path} does not match its digest",
                                  hint=f"delete {layout} and build again")
    marker = layout / "pinned-index"
    pinned_index = marker.is_file() and marker.read_text().strip() == base.digest
    if desc.digest != base.digest and not pinned_index:
        raise VerifyError(f"{label}: the cache holds {desc.digest} for it",
                          hint=f"delete {layout} and build again")


def pull_base(
    base: RegistryBase,
    arch: str,
    variant: str | None,
    cache: ContentCache,
    *,
    offline: bool = False,
    options: RegistryOptions | None = None,
) -> ArchiveBase:
    """The pinned image's ``linux/ARCH`` manifest, config and layers as an OCI layout in the
    cache (pulled by skopeo unless already there); NetworkError when ``offline`` and absent."""
    layout = cached_layout(cache, base, arch, variant)
    if not (layout / "index.json").is_file():
        if offline:
            raise NetworkError(f"--base {base.reference}: not in the cache and --offline given",
                               hint="build once without --offline to pull it")
        with cache.staging_dir("pull-") as staged:
            pulled = staged / "layout"
            try:
                pull_to_layout(base.reference, pulled, arch=arch, variant=variant,
                               options=options or RegistryOptions())
            except ToolFailedError as exc:
                raise ToolFailedError(
                    f"--base {base.reference}: {exc.message}",
                    hint="check the registry, the digest (skopeo inspect docker://REGISTRY/REPO"
                    ":TAG) and, for plain HTTP, registries.conf (CONTAINERS_REGISTRIES_CONF)",
                ) from exc
            with open_source(pulled) as source:
                desc, _ = select_manifest(source, arch)
            if desc.digest != base.digest:
                # The pin named an index; skopeo checked it and took this platform's manifest.
                (pulled / "pinned-index").write_text(base.digest + "\n")
            layout.parent.mkdir(parents=True, exist_ok=True)
            if layout.exists() and not (layout / "index.json").is_file():
                shutil.rmtree(layout)  # not a pull of ours (those arrive whole, by rename)
            try:
                os.replace(pulled, layout)
            except OSError as exc:
                if not (layout / "index.json").is_file():  # else: a concurrent build's copy
                    raise InputError(f"cache directory {cache.root}: cannot store the pulled "
                                     f"base ({exc.strerror})",
                                     hint="pass a writable --cache-dir") from exc
    _check_layout(layout, base, arch)
    return ArchiveBase(reference=base.reference, path=layout, kind="oci-layout")
