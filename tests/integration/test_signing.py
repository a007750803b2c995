"""Signed, attested bundles end to end (issue 15): a real signed build; the tampering attack
(one byte of install.sh changed, SHA256SUMS and manifest.json regenerated) against
`edgepack verify --key` and against the bundle's own install.sh run with a stand-in engine
(a script that records its calls: no engine may be touched before the signature holds); the
signature checked by this host's OpenSSL (Debian 12's 3.0, what bookworm and Raspberry Pi OS
bookworm ship); the SBOM against the image's own dpkg status and .dist-info directories read
back by umoci; byte-identical signed rebuilds."""

from __future__ import annotations

import email.parser
import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from packager.bundle.manifest import read_manifest, write_manifest
from packager.bundle.sbom import SBOM_FILE, validate
from packager.bundle.signing import decode_payload, generate_keypair, load_signer, sign_manifest
from tests.bundles import writable_copy
from tests.integration.conftest import edgepack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = Path("/work/shared/testdata/onnx/mnist.onnx")
EPOCH = "1700000000"
FAKE_ENGINE = """#!/bin/sh
# A stand-in for docker/podman: records every call; 'load' fails (nothing may be loaded).
echo "$*" >> "$FAKE_ENGINE_LOG"
case "$1" in load) exit 1 ;; esac
exit 0
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    good = generate_keypair(folder, "bundle")
    other = generate_keypair(folder, "attacker")
    return {"key": good.private, "pub": good.public, "other": other.private,
            "other_pub": other.public}


def _build(out: Path, cache: Path, *extra: str) -> dict[str, Any]:
    proc = edgepack(
        "build", str(MODEL), "--target", "industrial-pc", "--quantize", "fp32", "--out", str(out),
        "--cache-dir", str(cache), *extra, "--json", env={"SOURCE_DATE_EPOCH": EPOCH},
    )
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, edgepack_cache: Path, keys: dict[str, Path]
) -> Path:
    out = tmp_path_factory.mktemp("signed") / "bundle"
    _build(out, edgepack_cache, "--sign-key", str(keys["key"]))
    return out


def _tamper_install_sh(bundle: Path) -> None:
    """The attack: one byte of install.sh changed, SHA256SUMS and manifest.json regenerated
    with the project's own writer (so every checksum holds)."""
    script = bundle / "install.sh"
    data = bytearray(script.read_bytes())
    at = data.index(b"# Install the edgepack bundle")
    data[at + 2] = ord("i")  # "# install ..." : one byte
    script.write_bytes(bytes(data))
    write_manifest(bundle, read_manifest(bundle).meta())


def _install(bundle: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str],
                                                                 list[str]]:
    engine = tmp_path / "fake-engine"
    engine.write_text(FAKE_ENGINE)
    engine.chmod(0o755)
    log = tmp_path / "engine.log"
    log.unlink(missing_ok=True)
    proc = subprocess.run(
        ["sh", str(bundle / "install.sh"), "--engine", str(engine), "--no-systemd",
         "--timeout", "1"],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
             "FAKE_ENGINE_LOG": str(log), **env},
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def test_signed_bundle_verifies_and_reports_all_three(
    signed: Path, keys: dict[str, Path]
) -> None:
    proc = edgepack("verify", str(signed), "--key", str(keys["pub"]), "--json")
    document = json.loads(proc.stdout)
    attest = document["attestations"]
    assert attest["signature"]["verified"] is True
    assert attest["sbom"]["valid"] is True and attest["sbom"]["debian_packages"] > 10
    assert attest["sbom"]["wheels"] >= 2
    assert attest["provenance"]["status"] == "verified"
    assert any(i.startswith("model:mnist.onnx sha256:") for i in attest["provenance"]["inputs"])
    text = edgepack("verify", str(signed), "--key", str(keys["pub"])).stdout
    assert "signature:  verified" in text and "Debian packages" in text


def test_tampered_install_sh_is_refused_by_verify_key(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = writable_copy(signed, tmp_path)
    _tamper_install_sh(bundle)
    # Without a key the attack passes every checksum: what the signature is for.
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=bundle).returncode == 0
    assert edgepack("verify", str(bundle), check=False).returncode == 0
    proc = edgepack("verify", str(bundle), "--key", str(keys["pub"]), check=False)
    assert proc.returncode == 8, proc.stderr
    assert "signature" in proc.stderr and "manifest.json" in proc.stderr


def test_install_sh_refuses_a_tampered_bundle_before_loading(
    signed: Path, tmp_path: Path
) -> None:
    bundle = writable_copy(signed, tmp_path)
    # Control: the intact bundle passes the signature and reaches the engine's load.
    proc, calls = _install(bundle, tmp_path)
    assert "signature verified" in proc.stdout, proc.stderr
    assert any(c.startswith("load ") for c in calls), calls
    _tamper_install_sh(bundle)
    proc, calls = _install(bundle, tmp_path)
    assert proc.returncode == 1
    assert "signature: manifest.json or SHA256SUMS differ from the signed ones" in proc.stderr
    assert calls == [], f"the engine was called before the signature held: {calls}"


def test_install_sh_refuses_a_bundle_re_signed_by_another_key(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = writable_copy(signed, tmp_path)
    _tamper_install_sh(bundle)
    sign_manifest(bundle, load_signer(keys["other"]), {"name": "mnist"})
    proc, calls = _install(bundle, tmp_path)
    assert proc.returncode == 1 and calls == []
    assert "signature: manifest.dsse.json does not verify" in proc.stderr
    proc2 = edgepack("verify", str(bundle), "--key", str(keys["pub"]), check=False)
    assert proc2.returncode == 8 and "does not verify with the trusted key" in proc2.stderr


def test_stripped_signature_and_provisioned_key(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    bundle = writable_copy(signed, tmp_path)
    (bundle / "manifest.dsse.json").unlink()
    proc, calls = _install(bundle, tmp_path)
    assert proc.returncode == 1 and calls == [] and "not signed" in proc.stderr
    for args in (("--require-signature",), ("--key", str(keys["pub"]))):
        refused = edgepack("verify", str(bundle), *args, check=False)
        assert refused.returncode == 8 and "signature" in refused.stderr, args
    # A device provisioned with another key refuses even an intact bundle signed by this one.
    device = tmp_path / "device"
    (device / "etc/edgepack").mkdir(parents=True)
    shutil.copy(keys["other_pub"], device / "etc/edgepack/bundle-key.pem")
    bundle = writable_copy(signed, tmp_path / "2")
    proc, calls = _install(bundle, tmp_path, EDGEPACK_ROOT=str(device))
    assert proc.returncode == 1 and calls == [] and "does not verify" in proc.stderr


def test_debian_12_openssl_checks_the_dsse_signature(signed: Path, keys: dict[str, Path],
                                                     tmp_path: Path) -> None:
    """The device-side tool, run by hand: OpenSSL 3.0 (Debian 12) verifies the envelope's
    Ed25519 signature over DSSE's pre-authentication encoding; one flipped bit fails."""
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    assert version.startswith("OpenSSL 3.0."), version
    envelope = json.loads((signed / "manifest.dsse.json").read_text())
    payload = decode_payload((signed / "manifest.dsse.json").read_bytes())
    import base64

    (tmp_path / "sig").write_bytes(base64.b64decode(envelope["signatures"][0]["sig"]))
    kind = envelope["payloadType"].encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)
    for data, expected in ((pae, 0), (pae[:-1] + bytes([pae[-1] ^ 1]), 1)):
        (tmp_path / "pae").write_bytes(data)
        proc = subprocess.run(
            ["openssl", "pkeyutl", "-verify", "-rawin", "-pubin", "-inkey", str(keys["pub"]),
             "-sigfile", str(tmp_path / "sig"), "-in", str(tmp_path / "pae")],
            capture_output=True,
        )
        assert proc.returncode == expected


def _dpkg_status(rootfs: Path) -> set[tuple[str, str, str]]:
    found = set()
    for stanza in (rootfs / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(re.findall(r"(?m)^([A-Za-z-]+): (.*)$", stanza))
        if "Package" in fields:
            found.add((fields["Package"], fields["Version"], fields["Architecture"]))
    return found


def _dist_infos(rootfs: Path) -> set[tuple[str, str]]:
    found = set()
    for meta in (rootfs / "opt/edgepack/site-packages").glob("*.dist-info/METADATA"):
        headers = email.parser.Parser().parsestr(meta.read_text(), headersonly=True)
        found.add((re.sub(r"[-_.]+", "-", headers["Name"]).lower(), headers["Version"]))
    return found


def test_sbom_lists_exactly_what_the_image_holds(signed: Path, tmp_path: Path) -> None:
    text = (signed / SBOM_FILE).read_text()
    assert validate(text) is None  # cyclonedx-python-lib's strict CycloneDX 1.6 validator
    sbom = json.loads(text)
    assert sbom["specVersion"] == "1.6"
    layout = tmp_path / "layout"
    with tarfile.open(signed / "image.tar") as tar:
        tar.extractall(layout, filter="data")
    index = json.loads((layout / "index.json").read_text())
    tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(tmp_path / "rt")],
                   capture_output=True, check=True)
    rootfs = tmp_path / "rt" / "rootfs"
    kinds: dict[str, set[tuple[str, ...]]] = {"debian-package": set(), "wheel": set()}
    for component in sbom["components"]:
        props = {p["name"]: p["value"] for p in component.get("properties", [])}
        kind = props["edgepack:kind"]
        if kind == "debian-package":
            arch = re.search(r"arch=([a-z0-9]+)", component["purl"])
            assert arch and component["hashes"][0]["alg"] == "SHA-256"
            assert "edgepack:debian:source" in props
            kinds[kind].add((component["name"], component["version"], arch.group(1)))
        elif kind == "wheel":
            assert component["purl"] == f"pkg:pypi/{component['name']}@{component['version']}"
            kinds[kind].add((component["name"], component["version"]))
        elif kind == "model":
            model = (rootfs / props["edgepack:source-path"].lstrip("/")).read_bytes()
            import hashlib

            assert component["hashes"][0]["content"] == hashlib.sha256(model).hexdigest()
    assert kinds["debian-package"] == _dpkg_status(rootfs)
    assert kinds["wheel"] == _dist_infos(rootfs)


def test_signed_rebuild_is_byte_identical(
    signed: Path, keys: dict[str, Path], edgepack_cache: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    _build(again, edgepack_cache, "--sign-key", str(keys["key"]))
    names = sorted(p.name for p in signed.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"manifest.dsse.json", "sbom.cdx.json", "provenance.intoto.json"} <= set(names)
    for name in names:
        if (signed / name).is_file():
            assert (signed / name).read_bytes() == (again / name).read_bytes(), name


def test_signed_ota_bundle_pins_the_key_and_the_agent_checks_it(
    keys: dict[str, Path], edgepack_cache: Path, tmp_path: Path
) -> None:
    """The real path: a signed --ota-repo bundle, published, installed by its own install.sh
    (podman): install.sh pins the key it checked into the agent's configuration, and the agent
    (from the bundle's wheels) verifies the release's signature before committing it."""
    from packager.bundle.signing import load_public_key
    from tests.integration.conftest import run_install_sh
    from tests.unit.agent.helpers import Server

    repo = tmp_path / "repo"
    edgepack("ota", "init", str(repo))
    device = tmp_path / "device"
    container = "edgepack-otasigned"
    subprocess.run(["podman", "rm", "-f", "-t", "1", container], capture_output=True)
    with Server(repo / "repository").running() as server:
        bundle = tmp_path / "bundle"
        _build(bundle, edgepack_cache, "--name", "otasigned", "--version", "1.0.0",
               "--ota-repo", server.url,
               "--ota-root", str(repo / "repository/metadata/1.root.json"),
               "--sign-key", str(keys["key"]))
        edgepack("ota", "publish", str(bundle), "--repo", str(repo))
        try:
            proc = run_install_sh(bundle, extra_env={"EDGEPACK_ROOT": str(device)})
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "signature verified" in proc.stdout
            assert "bundle signature verified" in proc.stdout + proc.stderr
            config = json.loads((device / "etc/edgepack/ota-agent.json").read_text())
            pinned = Path(config["bundle_key"])
            assert pinned == device / "opt/edgepack/ota-agent/bundle-key.pem"
            assert load_public_key(pinned).keyid == load_public_key(keys["pub"]).keyid
            release = device / "var/lib/edgepack-ota/releases/1"
            assert (release / "manifest.dsse.json").is_file()
        finally:
            subprocess.run(["podman", "rm", "-f", "-t", "1", container], capture_output=True)
