"""skopeo: inspects and copies container images between transports without a daemon."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import ToolFailedError
from packager.tools.base import Tool

SKOPEO = Tool("skopeo", "skopeo", "skopeo")


def inspect_oci_archive(archive: Path, *, raw: bool = False) -> dict[str, Any]:
    """``skopeo inspect oci-archive:PATH``: digest, architecture, layers (or the raw manifest)."""
    args = ["inspect", *(["--raw"] if raw else []), f"oci-archive:{archive}"]
    proc = SKOPEO.run(args, timeout=300)
    try:
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        raise ToolFailedError(f"skopeo inspect {archive}: output is not JSON") from exc
    if not isinstance(doc, dict):
        raise ToolFailedError(f"skopeo inspect {archive}: expected a JSON object")
    return doc


def copy(source: str, dest: str) -> None:
    """``skopeo copy SOURCE DEST`` with transports spelled out (``oci-archive:...``)."""
    SKOPEO.run(["copy", "--quiet", source, dest], timeout=900)


@dataclass(frozen=True)
class RegistryOptions:
    """How skopeo talks to a registry: ``tls_verify`` as skopeo's ``--tls-verify`` (False: plain
    HTTP or an unverified certificate; None: skopeo's default, HTTPS unless registries.conf
    (``$CONTAINERS_REGISTRIES_CONF``) marks the registry insecure), ``authfile`` as its
    ``--authfile`` (None: the standard files, ``$REGISTRY_AUTH_FILE``,
    ``$XDG_RUNTIME_DIR/containers/auth.json``, then ``~/.docker/config.json``)."""

    tls_verify: bool | None = None
    authfile: Path | None = None

    def flags(self, side: str = "") -> list[str]:
        """``--[src-|dest-]tls-verify=...`` and ``--[src-|dest-]authfile PATH``."""
        prefix = f"--{side}-" if side else "--"
        flags = []
        if self.tls_verify is not None:
            flags.append(f"{prefix}tls-verify={'true' if self.tls_verify else 'false'}")
        if self.authfile is not None:
            flags += [f"{prefix}authfile", str(self.authfile)]
        return flags


def _registries_conf() -> list[str]:
    """``--registries-conf PATH`` when ``$CONTAINERS_REGISTRIES_CONF`` names a file: the standard
    way to mark a registry insecure or mirrored for one run (containers-registries.conf(5)),
    which bookworm's skopeo 1.9 does not read from the environment itself (measured)."""
    path = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    return ["--registries-conf", path] if path and Path(path).is_file() else []


def pull_to_layout(
    reference: str, layout: Path, *, arch: str, variant: str | None, options: RegistryOptions
) -> None:
    """``skopeo copy docker://REF oci:LAYOUT:base`` of the ``linux/ARCH[/VARIANT]`` image of REF
    (an image index is resolved to that platform's manifest), digests preserved: skopeo checks
    a ``@sha256:`` reference against what the registry sends."""
    args = [*_registries_conf(), "copy", "--quiet", "--preserve-digests", "--override-os", "linux",
            "--override-arch", arch, *options.flags("src")]
    if variant:
        args += ["--override-variant", variant]
    SKOPEO.run([*args, reference, f"oci:{layout}:base"], timeout=1800)


def push_layout(layout: Path, tag: str, destination: str, *, options: RegistryOptions) -> None:
    """``skopeo copy --all oci:LAYOUT:TAG DESTINATION``: every image an index names, with its
    manifests' and the index's digests preserved (skopeo refuses rather than rewrite them)."""
    SKOPEO.run([*_registries_conf(), "copy", "--quiet", "--all", "--preserve-digests",
                *options.flags("dest"),
                f"oci:{layout}:{tag}", destination], timeout=1800)


def inspect_raw(reference: str, *, options: RegistryOptions) -> bytes:
    """``skopeo inspect --raw REF``: the manifest or index bytes as the registry has them."""
    proc = SKOPEO.run([*_registries_conf(), "inspect", "--raw", *options.flags(), reference],
                      timeout=300)
    return proc.stdout
