"""``edgepack engine build BUNDLE --on ssh://...`` against a real sshd on loopback.

Real: OpenSSH's sshd (started here as root on 127.0.0.1, ports 19600-19699, its own config, host
key and authorized key), ssh and scp, the on-device builder (packager/runtime/engine_build.py)
run by the "device's" python3, and a Jetson bundle built by the Jetson backend.

STAND-INS (what cannot exist here), named so below:
- the bundle's base image: a STAND-IN JetPack base (Debian arm64 + CPython 3.11 + a fake
  /etc/nv_tegra_release), given as ``--base oci-archive:`` to a TEST-ONLY copy of the
  jetson-orin-nano target whose python is 3.11 (both from tests/jetson_standin.py;
  tests/integration/test_jetson_build.py does the same through a registry);
- trtexec: a STAND-IN script on the "device" that records its argv, prints TensorRT's banner
  and writes a fake plan where ``--saveEngine`` says;
- the device's identity: a fixture tree (``--device-root``: /etc/nv_tegra_release of r36.3.0,
  /proc/device-tree/compatible of an Orin) and a stand-in ``libnvinfer.so.8.6.2`` (``--lib-dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from packager.bundle.manifest import BundleMeta, read_manifest, write_manifest
from packager.image.builder import build_image
from tests.integration.conftest import edgepack
from tests.jetson_standin import release_line, stand_in_spec, target_copy
from tests.ports import free_port_in
from tests.process_guard import terminate

pytestmark = [pytest.mark.integration]

MNIST = Path("/work/shared/testdata/onnx/mnist.onnx")
PORTS = range(19600, 19700)
L4T = "r36.3.0"
ORIN = b"nvidia,p3768-0000+p3767-0005\0nvidia,p3767-0005\0nvidia,tegra234\0"
XAVIER = b"nvidia,p3509-0000+p3668-0001\0nvidia,tegra194\0"

STAND_IN_TRTEXEC = """#!/usr/bin/python3
# STAND-IN trtexec (no TensorRT here): records its argv, prints TensorRT 8.6.2's banner, writes a
# fake plan where --saveEngine says. MODE_FILE says how to behave: ok | fail | sleep.
import hashlib, json, sys, time
mode = open({mode!r}).read().strip()
with open({record!r}, "w") as handle:
    json.dump(sys.argv, handle)
print("&&&& RUNNING TensorRT.trtexec [TensorRT v8602] # trtexec (STAND-IN)", flush=True)
if mode == "fail":
    print("[E] STAND-IN: Error[4]: network parse failed", flush=True)
    sys.exit(1)
if mode == "sleep":
    time.sleep(600)
plan = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--saveEngine="))
with open(plan, "wb") as handle:
    model = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--onnx="))
    handle.write(b"STAND-IN TensorRT plan for " + hashlib.sha256(open(model, "rb").read())
                 .hexdigest().encode())
print("&&&& PASSED TensorRT.trtexec (STAND-IN)", flush=True)
"""

# A device python that runs the real interpreter, then forges the key file the build wrote (a
# compromised or misconfigured reference device): the plan must not be added.
FORGING_PYTHON = """#!/bin/sh
/usr/bin/python3 "$@" || exit $?
for key in engines/*/*.key.json; do
  [ -f "$key" ] && sed -i 's/"sm":87/"sm":72/' "$key"
done
exit 0
"""


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory: pytest.TempPathFactory, edgepack_cache: Path) -> Path:
    """A Jetson (Orin Nano, JetPack 6.0, TensorRT 8.6.2) mnist bundle built by the backend on
    the STAND-IN base."""
    work = tmp_path_factory.mktemp("jetson-bundle")
    build_image(stand_in_spec(L4T), work / "base.tar", edgepack_cache)
    target = target_copy("jetson-orin-nano", work / "t", base="stand-in/l4t@sha256:" + "0" * 64)
    edgepack("build", str(MNIST), "--target", str(target), "--base",
             f"oci-archive:{work / 'base.tar'}", "--cache-dir", str(edgepack_cache),
             "--out", str(work / "bundle"))
    return work / "bundle"


@pytest.fixture(scope="module")
def signed_bundle(jetson_bundle: Path, edgepack_cache: Path) -> tuple[Path, Path]:
    """The same bundle built with ``--sign-key`` (manifest and provenance signed): (bundle,
    the directory with release.key/.pub and other.key/.pub)."""
    work = jetson_bundle.parent
    keys = work / "keys"
    edgepack("keys", "generate", "--out", str(keys), "--name", "release")
    edgepack("keys", "generate", "--out", str(keys), "--name", "other")
    edgepack("build", str(MNIST), "--target", str(work / "t" / "jetson-orin-nano.toml"),
             "--base", f"oci-archive:{work / 'base.tar'}", "--cache-dir", str(edgepack_cache),
             "--sign-key", str(keys / "release.key"), "--out", str(work / "signed"))
    return work / "signed", keys


@dataclass(frozen=True)
class Device:
    """The loopback "reference device": sshd plus the stand-ins it runs."""

    url: str
    known_hosts: Path
    identity: Path
    trtexec: Path
    record: Path
    mode: Path
    lib_dir: Path
    root: Path

    def args(self, *, root: Path | None = None) -> list[str]:
        return ["--on", self.url, "--known-hosts", str(self.known_hosts), "--identity",
                str(self.identity), "--trtexec", str(self.trtexec), "--lib-dir",
                str(self.lib_dir), "--device-root", str(root or self.root)]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    if os.geteuid() != 0 or not Path("/usr/sbin/sshd").is_file():
        pytest.fail("needs root and openssh-server (make setup)", pytrace=False)
    tmp = tmp_path_factory.mktemp("sshd")
    _keygen(tmp / "host_key")
    _keygen(tmp / "client_key")
    shutil.copyfile(tmp / "client_key.pub", tmp / "authorized_keys")
    port = free_port_in(PORTS)
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\n"
        f"PidFile {tmp / 'sshd.pid'}\nAuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    log = (tmp / "sshd.log").open("wb")
    server = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(tmp / "sshd_config")],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        host_key = (tmp / "host_key.pub").read_text().split()
        (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        root = tmp / "device"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "nv_tegra_release").write_bytes(release_line(L4T))
        (root / "proc" / "device-tree").mkdir(parents=True)
        (root / "proc" / "device-tree" / "compatible").write_bytes(ORIN)
        lib = tmp / "lib"
        lib.mkdir()
        (lib / "libnvinfer.so.8.6.2").write_bytes(b"STAND-IN")
        trtexec = tmp / "bin" / "trtexec"
        trtexec.parent.mkdir()
        trtexec.write_text(STAND_IN_TRTEXEC.format(mode=str(tmp / "mode"),
                                                   record=str(tmp / "argv.json")))
        trtexec.chmod(0o755)
        device = Device(url=f"ssh://root@127.0.0.1:{port}", known_hosts=tmp / "known_hosts",
                        identity=tmp / "client_key", trtexec=trtexec, record=tmp / "argv.json",
                        mode=tmp / "mode", lib_dir=lib, root=root)
        # sshd is up when ssh gets in (bounded: 50 tries).
        for _ in range(50):
            probe = subprocess.run(
                ["ssh", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}",
                 "-i", str(tmp / "client_key"), "-p", str(port), "root@127.0.0.1", "true"],
                capture_output=True, timeout=30)
            if probe.returncode == 0:
                break
            assert server.poll() is None, (tmp / "sshd.log").read_text()
            subprocess.run(["sleep", "0.2"], check=True)
        else:
            pytest.fail(f"sshd did not answer: {(tmp / 'sshd.log').read_text()}")
        yield device
    finally:
        terminate(server, grace_s=30)
        log.close()


@pytest.fixture()
def bundle(jetson_bundle: Path, tmp_path: Path, device: Device) -> Path:
    """A fresh copy of the bundle per test, and the stand-in trtexec reset."""
    copy = tmp_path / "bundle"
    shutil.copytree(jetson_bundle, copy)
    device.mode.write_text("ok")
    device.record.unlink(missing_ok=True)
    return copy


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _remote_dir(device: Device) -> Path:
    argv = json.loads(device.record.read_text())
    onnx = next(a for a in argv if a.startswith("--onnx="))
    return Path(onnx.removeprefix("--onnx=")).parent


def test_adds_the_plan_and_its_key_and_verify_checks_that_key(
    bundle: Path, device: Device, tmp_path: Path
) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    key = manifest["device"]["engine_key"]
    stem = f"{key['tensorrt']}-sm{key['sm']}-{key['precision']}"
    assert stem == "8.6.2-sm87-fp16"
    proc = edgepack("engine", "build", str(bundle), *device.args())
    assert "building 8.6.2-sm87-fp16" in proc.stderr
    assert "trtexec: &&&& PASSED" in proc.stderr  # the device's progress is relayed
    plan, key_file = bundle / "engine" / f"{stem}.plan", bundle / "engine" / f"{stem}.key.json"
    assert plan.read_bytes().startswith(b"STAND-IN TensorRT plan")
    assert json.loads(key_file.read_text()) == key
    assert key_file.read_text() == json.dumps(key, sort_keys=True, separators=(",", ":"))
    listed = {f["path"]: f for f in json.loads((bundle / "manifest.json").read_text())["files"]}
    assert {f"engine/{stem}.plan", f"engine/{stem}.key.json"} <= set(listed)
    # The golden trtexec line of TensorRT 8.6 (packager/runtime/trtexec.py), run on the device.
    remote = _remote_dir(device)
    argv = [a.replace(str(remote), "$DIR") for a in json.loads(device.record.read_text())]
    sha = key["model_sha256"]
    assert argv == [
        str(device.trtexec), "--onnx=$DIR/model.onnx",
        f"--saveEngine=$DIR/engines/{sha}/.8.6.2-sm87-fp16.plan.tmp",
        "--memPoolSize=workspace:2048",
        f"--timingCacheFile=$DIR/engines/.timing-8.6.2-sm87.cache.{sha[:16]}.tmp",
        "--fp16", "--skipInference",
    ]
    assert not remote.exists(), "the device's temporary directory is removed"
    assert edgepack("verify", str(bundle)).returncode == 0

    # A key file changed after the fact: its checksum no longer matches (exit 8, naming it).
    key_file.write_text(key_file.read_text().replace('"sm":87', '"sm":72'))
    bad = edgepack("verify", str(bundle), check=False)
    assert bad.returncode == 8 and f"engine/{stem}.key.json" in bad.stderr
    # ... and with SHA256SUMS and manifest.json regenerated over it (an unsigned bundle can be):
    # the key check itself names the file, the expected and the found value.
    loaded = read_manifest(bundle)
    write_manifest(bundle, BundleMeta.model_validate(
        {k: v for k, v in loaded.model_dump(exclude_none=True).items()
         if k not in ("schema_", "files")}))
    bad = edgepack("verify", str(bundle), check=False)
    assert bad.returncode == 8, bad.stderr
    assert f"engine/{stem}.key.json" in bad.stderr and "sm: expected 87, found 72" in bad.stderr


def test_the_same_plan_gives_the_same_bundle(
    bundle: Path, device: Device, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    edgepack("engine", "build", str(bundle), *device.args())
    edgepack("engine", "build", str(other), *device.args())
    assert _tree(bundle) == _tree(other)


@pytest.mark.parametrize("on", [
    "ssh://-oProxyCommand=touch${IFS}/tmp/pwned",
    "ssh://root@-oProxyCommand=x",
    "ssh://host;rm -rf /",
    "ssh://host$(touch x)",
    "ssh://hôst.example",
    "ssh://host\n",
    "ssh://ro ot@host",
    "ssh://host:0",
    "ssh://host:65536",
    "ssh://host:22;x",
    "http://host",
])  # fmt: skip
def test_hostile_addresses_are_refused_before_any_ssh_runs(
    on: str, bundle: Path, tmp_path: Path
) -> None:
    spy = tmp_path / "spy"
    spy.mkdir()
    for tool in ("ssh", "scp"):
        (spy / tool).write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 1\n")
        (spy / tool).chmod(0o755)
    before = _tree(bundle)
    proc = edgepack("engine", "build", str(bundle), "--on", on, check=False,
                    env={"PATH": f"{spy}:{os.environ['PATH']}"})
    assert proc.returncode == 2, proc.stderr
    assert "--on" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists(), "no ssh or scp ran"
    assert _tree(bundle) == before


@pytest.mark.parametrize("mode", ["fail", "sleep"])
def test_a_failed_or_timed_out_build_leaves_the_bundle_unchanged(
    mode: str, bundle: Path, device: Device
) -> None:
    device.mode.write_text(mode)
    before = _tree(bundle)
    extra = ["--timeout", "3"] if mode == "sleep" else []
    proc = edgepack("engine", "build", str(bundle), *device.args(), *extra, check=False)
    assert proc.returncode == 7, proc.stderr
    assert ("trtexec failed" if mode == "fail" else "ran past --timeout") in proc.stderr
    assert _tree(bundle) == before
    assert not any(p.name.startswith(f".{bundle.name}.") for p in bundle.parent.iterdir())
    assert not _remote_dir(device).exists(), "the device's temporary directory is removed"


def test_a_device_of_another_model_is_refused_before_building(
    bundle: Path, device: Device, tmp_path: Path
) -> None:
    xavier = tmp_path / "xavier"
    shutil.copytree(device.root, xavier)
    (xavier / "proc" / "device-tree" / "compatible").write_bytes(XAVIER)
    before = _tree(bundle)
    proc = edgepack("engine", "build", str(bundle), *device.args(root=xavier), check=False)
    assert proc.returncode == 4, proc.stderr
    assert "SM: expected sm87, found sm72 (tegra194)" in proc.stderr
    assert not device.record.exists(), "trtexec never ran"
    assert _tree(bundle) == before


def test_a_key_that_does_not_match_is_never_added(
    bundle: Path, device: Device, tmp_path: Path
) -> None:
    forging = tmp_path / "python3"
    forging.write_text(FORGING_PYTHON)
    forging.chmod(0o755)
    before = _tree(bundle)
    proc = edgepack("engine", "build", str(bundle), *device.args(), "--python", str(forging),
                    check=False)
    assert proc.returncode == 8, proc.stderr
    assert "expected key" in proc.stderr and '"sm":87' in proc.stderr
    assert '"sm":72' in proc.stderr and "not added" in proc.stderr
    assert _tree(bundle) == before


def test_an_unknown_host_key_is_refused(bundle: Path, device: Device, tmp_path: Path) -> None:
    _keygen(tmp_path / "other")
    line = device.known_hosts.read_text().split()
    other = (tmp_path / "other.pub").read_text().split()
    (tmp_path / "known").write_text(f"{line[0]} {other[0]} {other[1]}\n")
    args = device.args()
    args[args.index("--known-hosts") + 1] = str(tmp_path / "known")
    before = _tree(bundle)
    proc = edgepack("engine", "build", str(bundle), *args, check=False)
    assert proc.returncode == 7, proc.stderr
    assert "host key" in proc.stderr
    assert _tree(bundle) == before


def test_a_signed_bundle_needs_its_signing_key(
    signed_bundle: tuple[Path, Path], device: Device, tmp_path: Path
) -> None:
    bundle, keys = tmp_path / "signed", signed_bundle[1]
    shutil.copytree(signed_bundle[0], bundle)
    device.mode.write_text("ok")
    device.record.unlink(missing_ok=True)
    before = _tree(bundle)
    unsigned = edgepack("engine", "build", str(bundle), *device.args(), check=False)
    assert unsigned.returncode == 2 and "--sign-key" in unsigned.stderr
    wrong = edgepack("engine", "build", str(bundle), *device.args(), "--sign-key",
                     str(keys / "other.key"), check=False)
    assert wrong.returncode == 8, wrong.stderr
    assert _tree(bundle) == before
    assert not device.record.exists(), "nothing ran on the device"
    edgepack("engine", "build", str(bundle), *device.args(), "--sign-key",
             str(keys / "release.key"))
    assert edgepack("verify", str(bundle), "--key", str(keys / "release.pub"),
                    "--require-signature").returncode == 0
    assert (bundle / "engine" / "8.6.2-sm87-fp16.plan").is_file()
