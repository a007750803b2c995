"""Registry references are allow-listed whole (issue 13): push destinations name a registry
host and a tag; a --base from a registry is pinned by digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from packager.backends.linux.backend import parse_base
from packager.errors import NetworkError, UsageError, VerifyError
from packager.image.cache import ContentCache, canonical_json
from packager.image.oci import MEDIA_CONFIG, MEDIA_MANIFEST
from packager.image.registry import cached_layout, parse_destination, parse_pinned, pull_base
from packager.image.spec import RegistryBase

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "destination",
    [
        "docker://127.0.0.1:18920/mnist:1.0.0",
        "docker://registry.example.com/fleet/mnist:1.0.0-rc_1",
        "docker://localhost:5000/a__b/c-d.e:latest",
        "docker://[::1]:5000/mnist:1",
    ],
)
def test_destinations_accepted(destination: str) -> None:
    assert parse_destination(destination) == destination


@pytest.mark.parametrize(
    "destination",
    [
        "docker://mnist:1.0.0",  # no registry host: would go to Docker Hub
        "docker://library/mnist:1.0.0",  # "library" is a Docker Hub namespace, not a host
        "docker://127.0.0.1:18920/mnist",  # no tag
        "docker://127.0.0.1:18920/Mnist:1",  # upper case repository
        "docker://127.0.0.1:18920/mnist:1\n",  # `$` would have let the newline through
        "docker://127.0.0.1:18920/mnist:1 --dest-creds=a:b",
        "docker://127.0.0.1:18920/../mnist:1",
        f"docker://127.0.0.1:18920/mnist@{DIGEST}",  # a digest is not a tag to push to
        "oci-archive:/tmp/x.tar",
        "docker://127.0.0.1:18920/mnist:-x",
    ],
)
def test_destinations_refused_with_one_line(destination: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_destination(destination)
    assert "docker://REGISTRY/REPO:TAG" in caught.value.one_line()
    assert "\n" not in caught.value.one_line()


def test_pinned_base_needs_a_digest() -> None:
    good = f"docker://127.0.0.1:18920/base/debian@{DIGEST}"
    pinned = parse_pinned(good, "--base")
    assert (pinned.reference, pinned.digest) == (good, DIGEST)
    for bad in (
        "docker://127.0.0.1:18920/base:latest",
        f"docker://127.0.0.1:18920/base:latest@{DIGEST}",
        f"docker://debian@{DIGEST}",
        f"docker://127.0.0.1:18920/base@{DIGEST[:-1]}",
        f"docker://127.0.0.1:18920/base@{DIGEST}\n",
    ):
        with pytest.raises(UsageError, match="--base"):
            parse_pinned(bad, "--base")


def test_base_option_takes_a_pinned_registry_reference() -> None:
    reference = f"docker://registry.example.com:5000/base@{DIGEST}"
    assert parse_base(reference) == RegistryBase(reference=reference, digest=DIGEST)
    with pytest.raises(UsageError, match=r"--base .*REPO@sha256"):
        parse_base("docker://registry.example.com:5000/base:latest")


def _layout(cache: ContentCache, base: RegistryBase, *, marker: str | None = None) -> Path:
    """A pulled base as pull_base leaves it: an OCI layout of one manifest and its config."""
    layout = cached_layout(cache, base, "arm64", "v8")
    (layout / "blobs" / "sha256").mkdir(parents=True)
    config = canonical_json({"architecture": "arm64", "os": "linux", "rootfs": {"diff_ids": []}})
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "layers": [],
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config)},
    })  # fmt: skip
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    for blob, data in ((config_digest, config), (digest, manifest)):
        (layout / "blobs" / "sha256" / blob.removeprefix("sha256:")).write_bytes(data)
    entry = {"mediaType": MEDIA_MANIFEST, "digest": digest, "size": len(manifest)}
    (layout / "index.json").write_bytes(canonical_json({"schemaVersion": 2, "manifests": [entry]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if marker is not None:
        (layout / "pinned-index").write_text(marker + "\n")
    return layout


def test_a_pulled_base_is_served_from_the_cache_offline(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    probe = RegistryBase(reference="x", digest=DIGEST)
    layout = _layout(cache, probe, marker=DIGEST)  # pinned by an index: marker names it
    got = pull_base(probe, "arm64", "v8", cache, offline=True)
    assert (got.path, got.kind) == (layout, "oci-layout")
    # Another pin (not cached) offline: one line, exit 9.
    other = RegistryBase(
        reference="docker://r.example/b@sha256:" + "cd" * 32, digest="sha256:" + "cd" * 32
    )
    with pytest.raises(NetworkError, match="not in the cache"):
        pull_base(other, "arm64", "v8", cache, offline=True)


def test_a_tampered_or_mismatched_cached_base_is_refused(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    probe = RegistryBase(reference="x", digest=DIGEST)
    layout = _layout(cache, probe)  # no marker: the manifest must be the pinned digest itself
    with pytest.raises(VerifyError, match="the cache holds sha256:"):
        pull_base(probe, "arm64", "v8", cache, offline=True)
    (layout / "pinned-index").write_text(DIGEST + "\n")
    config = next(p for p in (layout / "blobs" / "sha256").iterdir() if b"rootfs" in p.read_bytes())
    config.write_bytes(config.read_bytes().replace(b"arm64", b"amd64"))
    with pytest.raises(VerifyError, match="does not match its digest"):
        pull_base(probe, "arm64", "v8", cache, offline=True)
