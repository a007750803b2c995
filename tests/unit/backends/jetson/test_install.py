"""A Jetson bundle's install.sh installs its root-run engine unit only after the checks the
Linux installer makes first (install-container.sh --verify-only: the signature a provisioned
device requires, then every file against SHA256SUMS). Found by review: the engine unit used to
be installed (and systemd reloaded) before the signature was checked.

The bundle is real (tests/unit/ota/jetson_bundle.py: a STAND-IN base, a test-only target copy);
``systemctl`` is a stand-in script on PATH that records its calls (no systemd runs here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from packager.bundle.signing import generate_keypair
from tests.bundles import writable_copy
from tests.unit.ota.jetson_bundle import build_jetson_bundle

STANDIN_SYSTEMCTL = '#!/bin/sh\necho "systemctl $*" >> "$SYSTEMCTL_LOG"\n'


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_jetson_bundle(tmp_path_factory.mktemp("jetson-install"))


def _install(bundle: Path, device: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str],
                                                                   list[str]]:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    (tools / "systemctl").write_text(STANDIN_SYSTEMCTL)
    (tools / "systemctl").chmod(0o755)
    log = tmp_path / "systemctl.log"
    proc = subprocess.run(
        ["sh", str(bundle / "install.sh"), "--engine", "podman", "--timeout", "1"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
             "EDGEPACK_ROOT": str(device), "SYSTEMCTL_LOG": str(log)},
    )  # fmt: skip
    return proc, (log.read_text().splitlines() if log.exists() else [])


def _installed(device: Path) -> list[str]:
    return sorted(str(p.relative_to(device)) for p in device.rglob("*") if p.is_file())


def test_a_device_that_requires_a_signature_installs_nothing_of_an_unsigned_bundle(
    bundle: Path, tmp_path: Path
) -> None:
    device = tmp_path / "device"
    pair = generate_keypair(tmp_path / "keys")
    (device / "etc/edgepack").mkdir(parents=True)
    (device / "etc/systemd/system").mkdir(parents=True)
    os.link(pair.public, device / "etc/edgepack/bundle-key.pem")
    proc, calls = _install(writable_copy(bundle, tmp_path), device, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "manifest.dsse.json missing: the bundle is not signed" in proc.stderr
    assert calls == [] and _installed(device) == ["etc/edgepack/bundle-key.pem"]


def test_a_changed_file_installs_nothing(bundle: Path, tmp_path: Path) -> None:
    copy = writable_copy(bundle, tmp_path)
    (unit,) = copy.glob("edgepack-*-engine.service")
    unit.write_text(unit.read_text() + "ExecStartPost=/bin/sh -c 'id > /tmp/owned'\n")
    device = tmp_path / "device"
    (device / "etc/systemd/system").mkdir(parents=True)
    proc, calls = _install(copy, device, tmp_path)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr, proc.stderr
    assert calls == [] and _installed(device) == []


def test_verify_only_changes_nothing_and_passes_an_intact_bundle(
    bundle: Path, tmp_path: Path
) -> None:
    device = tmp_path / "device"
    device.mkdir()
    proc = subprocess.run(
        ["sh", str(bundle / "install-container.sh"), "--verify-only"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "EDGEPACK_ROOT": str(device)},
    )  # fmt: skip
    assert proc.returncode == 0 and "verified" in proc.stdout, proc.stderr
    assert _installed(device) == []
