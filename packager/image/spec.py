"""The description of an OCI image to build: pure data, computed by a backend's plan.

``packager.image.builder.build_image(spec, out, cache)`` executes it. Nothing here touches the
disk or the network, so unit tests can compare specs directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Debian's architecture names are the OCI ones for the architectures edgepack supports.
OciArch = Literal["arm64", "amd64"]


@dataclass(frozen=True)
class DebianBase:
    """A minimal root filesystem made from Debian packages resolved by the real apt."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"
    keyring: str = "/usr/share/keyrings/debian-archive-keyring.gpg"
    # Paths dropped from the rootfs (docs, man pages, locales): they only cost flash.
    exclude: tuple[str, ...] = (
        "usr/share/doc/",
        "usr/share/man/",
        "usr/share/info/",
        "usr/share/locale/",
        "usr/share/lintian/",
    )
    # Leave out what packager/image/data/slim-policy.toml lists for the base (packager.image.slim).
    slim: bool = True


@dataclass(frozen=True)
class ArchiveBase:
    """A user-supplied base: ``oci-archive:PATH`` (a tar) or an OCI layout directory."""

    reference: str  # as given on the command line, e.g. "oci-archive:/srv/base.tar"
    path: Path
    kind: Literal["oci-archive", "oci-layout"]


@dataclass(frozen=True)
class RegistryBase:
    """A base image in a registry, pinned by digest: ``docker://REGISTRY/REPO@sha256:HEX``
    (packager.image.registry); pulled through skopeo into the content cache when built."""

    reference: str  # as given on the command line
    digest: str  # "sha256:<hex>": of an image manifest or of an index that names one per platform


BaseSpec = DebianBase | ArchiveBase | RegistryBase


@dataclass(frozen=True)
class FileEntry:
    """One file in a layer. ``source`` is a host file to copy, or the bytes themselves."""

    dest: str  # absolute path in the image, e.g. "/opt/edgepack/model/model.onnx"
    source: Path | bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class FileLayer:
    """A layer edgepack writes from files, directories and symlinks (the runtime, the model)."""

    name: str  # "runtime", "model": shown in progress and in manifests
    files: tuple[FileEntry, ...]
    # Directories to create even when no file lands in them (e.g. a writable /tmp).
    dirs: tuple[tuple[str, int, int, int], ...] = ()  # (path, mode, uid, gid)
    # Symlinks to create: (path, target).
    symlinks: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WheelSet:
    """Binary wheels for the target platform, installed into ``site_packages``."""

    requirements: tuple[str, ...]  # pinned: ("onnxruntime==1.20.1", "numpy==2.2.1")
    python_version: str = "3.11"
    site_packages: str = "/opt/edgepack/site-packages"
    interpreter: str = "/usr/bin/python3.11"  # shebang for console scripts
    # Resolve dependencies (pip's resolver) or take exactly the listed wheels.
    with_deps: bool = False
    # The image's glibc (major, minor): the manylinux tags pip may take (Debian 12: 2.36; a
    # user's base such as Ubuntu 22.04 under JetPack 6: 2.35).
    glibc: tuple[int, int] = (2, 36)
    # Leave out what packager/image/data/slim-policy.toml lists for wheels (packager.image.slim).
    slim: bool = True


@dataclass(frozen=True)
class HealthCheck:
    """Docker's HEALTHCHECK in the image config; times in seconds (the config holds nanoseconds)."""

    test: tuple[str, ...]  # docker's form, e.g. ("CMD", "python3", "-m", "x.healthcheck")
    interval_s: int = 30
    timeout_s: int = 5
    start_period_s: int = 60
    retries: int = 3


@dataclass(frozen=True)
class ImageConfig:
    """The run settings of the image config (Docker's ``config`` object).

    Laid over a user base image's own config by :func:`packager.image.oci.container_config`.
    """

    user: str  # "10001:10001"
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    exposed_ports: tuple[str, ...] = ()  # ("8080/tcp",)
    labels: tuple[tuple[str, str], ...] = ()
    healthcheck: HealthCheck | None = None
    stop_signal: str = "SIGTERM"


@dataclass(frozen=True)
class StorageBudget:
    """The device storage the image must fit, checked by the build against real sizes.

    The build stops inflating a base layer once the image would pass ``max_image_bytes`` (a
    4 MiB gzip layer can hold 4 GiB of zeros), and refuses an image whose ``copies`` installed
    copies plus its archive need more than ``available_bytes``. Raises FitError (exit 5).
    """

    target: str  # "industrial-pc"
    available_bytes: int  # the target's storage less its reserve
    note: str  # how available_bytes was computed: "131072 MB ssd - 0 MB reserved"
    # Installed copies: the running image and the previous one kept for rollback (packager.fit).
    copies: int = 2
    # False under --force: only the hard bound holds (one image larger than the whole storage).
    enforce: bool = True

    @property
    def max_image_bytes(self) -> int:
        """The largest uncompressed image that can fit at all; no layer is read past it."""
        return self.available_bytes // self.copies if self.enforce else self.available_bytes


@dataclass(frozen=True)
class ImageSpec:
    """One single-platform image to build: base, wheels and file layers in order, config, tag."""

    platform_os: Literal["linux"]
    arch: OciArch
    variant: str | None
    base: BaseSpec
    wheels: WheelSet | None
    # Layers on top of base and wheels, in order (runtime first, model last, so a model change
    # rebuilds one small layer).
    layers: tuple[FileLayer, ...]
    config: ImageConfig
    ref_name: str  # "edgepack/mnist:1.0.0": the tag docker/podman give the loaded image
    annotations: tuple[tuple[str, str], ...] = ()
    # Fixed timestamp for every file and the config's "created": same inputs, same bytes.
    created_epoch: int = 0
    users: tuple[tuple[str, int], ...] = field(default=(("edgepack", 10001),))
    # The target's storage, when the image is built for one (None: no size check, no bound).
    storage: StorageBudget | None = None
    # Layers written by edgepack: "gzip" (every engine) or "zstd" (docker >= 23, podman >= 4.1,
    # containerd >= 1.5). A user base image's layers are copied as they are.
    compression: Literal["gzip", "zstd"] = "gzip"


@dataclass(frozen=True)
class PackageRecord:
    """One package an image was built from (packager.bundle.sbom / provenance read these):
    a Debian package from the lock or a wheel, with the sha256 of the .deb / .whl file."""

    kind: Literal["deb", "wheel"]
    name: str  # Debian package name, or the wheel's distribution name as its file spells it
    version: str
    arch: str  # Debian architecture, or the wheel's platform tag
    filename: str
    sha256: str  # hex


@dataclass(frozen=True)
class LayerResult:
    """One layer of a built image: its two digests (manifest, config) and sizes in bytes."""

    name: str
    digest: str  # sha256 of the compressed blob, "sha256:<hex>"
    diff_id: str  # sha256 of the uncompressed tar
    size: int  # compressed bytes
    uncompressed_size: int
    cached: bool  # True when the layer came from the content cache unchanged


@dataclass(frozen=True)
class ImageResult:
    """A written image archive (OCI layout and docker's manifest.json in one tar) and its contents.

    Sizes in bytes; ``manifest_digest`` and ``config_digest`` are ``sha256:<hex>``.
    """

    archive: Path
    manifest_digest: str  # the image digest that registries and `skopeo inspect` report
    config_digest: str
    size_bytes: int  # of the archive
    layers: tuple[LayerResult, ...]
    ref_name: str
    # What the image was built from, in layer order: Debian packages, then wheels (empty for
    # what edgepack did not resolve itself, e.g. a user's --base); suite: the Debian release.
    packages: tuple[PackageRecord, ...] = ()
    debian_suite: str | None = None

    @property
    def uncompressed_bytes(self) -> int:
        """What the image takes unpacked in an engine's store: every layer's tar, summed."""
        return sum(layer.uncompressed_size for layer in self.layers)
