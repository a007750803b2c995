"""A Jetson bundle's install.sh installs its root-run engine unit only after the checks the
Linux installer makes first (install-container.sh --verify-only: the signature a provisioned
device requires, then every file against SHA256SUMS). Found by review: the engine unit used to
be installed (and systemd reloaded) before the signature was checked.

The bundle is real (tests/unit/ota/jetson_bundle.py: a STAND-IN base, a test-only target copy);
``systemctl`` is a stand-in script on PATH that records its calls (no systemd runs here)."""

from __future__ import annotations

import os
import subprocess
import sys
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


# --- the GPU flag is the engine's own: docker's NVIDIA runtime, podman's CDI device -------------
# STAND-INS (no docker, podman daemon or GPU used here): `docker`, `podman` and `nerdctl` are
# shell scripts on PATH that record their argv and answer what install-container.sh asks
# (`docker info` as $DOCKER_INFO says, `image inspect` with the bundle's image id); `curl` is a
# stand-in that answers the readiness probe. The scripts under test are the bundle's own.

STANDIN_ENGINE = """#!/bin/sh
echo "${0##*/} $*" >> "$ENGINE_LOG"
case "$1" in
    info) exit "${DOCKER_INFO:-0}" ;;
    image) echo "$FAKE_IMAGE_ID" ;;
esac
exit 0
"""
ENGINES_RO = "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:ro"
# Written out by hand (not computed by the code under test).
GPU = {"docker": "--runtime=nvidia", "podman": "--device=nvidia.com/gpu=all"}


def _standin_tools(tmp_path: Path, *engines: str) -> Path:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for name in (*engines, "curl"):
        (tools / name).write_text(STANDIN_ENGINE if name != "curl" else "#!/bin/sh\nexit 0\n")
        (tools / name).chmod(0o755)
    return tools


def _image_id(bundle: Path) -> str:
    script = bundle / "install-container.sh"
    line = next(ln for ln in script.read_text().splitlines() if ln.startswith("IMAGE_ID="))
    return subprocess.run(["sh", "-c", f'{line}\nprintf %s "$IMAGE_ID"'], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def _engine_calls(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _run_with_standins(
    argv: list[str], tmp_path: Path, *engines: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], Path, list[list[str]]]:
    """``argv`` run with stand-in ``engines`` (and curl) first on PATH, each recording its argv in
    ENGINE_LOG: (the process, the stand-ins' directory, the recorded engine calls)."""
    tools = _standin_tools(tmp_path, *engines)
    log = tmp_path / "engine.log"
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120,
        env={"PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
             "ENGINE_LOG": str(log), **env},
    )  # fmt: skip
    return proc, tools, _engine_calls(log)


@pytest.mark.parametrize(
    ("args", "docker_info", "engine"),
    [
        ((), 0, "docker"),  # docker's daemon answers: docker
        ((), 1, "podman"),  # it does not: podman
        (("--engine", "podman"), 0, "podman"),
        (("--engine", "docker"), 0, "docker"),
    ],
)
def test_install_without_systemd_starts_the_runtime_with_its_engines_gpu_flag(
    bundle: Path, tmp_path: Path, args: tuple[str, ...], docker_info: int, engine: str
) -> None:
    checked = subprocess.run(["sh", "-n", str(bundle / "install-container.sh")],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    proc, tools, calls = _run_with_standins(
        ["sh", str(bundle / "install.sh"), "--no-systemd", *args], tmp_path, "docker", "podman",
        EDGEPACK_ROOT=str(tmp_path / "device"), DOCKER_INFO=str(docker_info),
        FAKE_IMAGE_ID=_image_id(bundle),
    )
    assert proc.returncode == 0, proc.stderr
    assert f"using {tools}/{engine}" in proc.stdout
    (run,) = [call for call in calls if call[1:3] == ["run", "-d"]]
    assert run[0] == engine
    assert run[run.index(GPU[engine]) + 1 : run.index(GPU[engine]) + 3] == [
        "--group-add=video", ENGINES_RO]
    other = GPU["docker" if engine == "podman" else "podman"]
    assert other not in run
    assert run.count(GPU[engine]) == 1 and "--restart=unless-stopped" in run
    assert run.index("--pids-limit=256") < run.index(GPU[engine])  # after the floor


def test_install_refuses_an_engine_not_named_docker_or_podman_before_loading(
    bundle: Path, tmp_path: Path
) -> None:
    proc, _, calls = _run_with_standins(
        ["sh", str(bundle / "install-container.sh"), "--no-systemd", "--engine", "nerdctl"],
        tmp_path, "nerdctl", EDGEPACK_ROOT=str(tmp_path / "device"),
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "install.sh: error: nerdctl: this bundle's GPU access is set for docker or podman (the "
        "engine's file name)"]
    assert calls == []  # nothing loaded, nothing started


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_the_supervisor_runs_the_container_with_its_engines_gpu_flag(
    bundle: Path, tmp_path: Path, engine: str
) -> None:
    """The serving unit's supervise.py, run as the unit runs it (``--engine`` the engine's path);
    the stand-in container exits at once, so the supervisor ends saying so."""
    proc, _, calls = _run_with_standins(
        [sys.executable, str(bundle / "supervise.py"), "--engine", str(tmp_path / "bin" / engine)],
        tmp_path, engine, WATCHDOG_USEC="30000",
    )
    assert "exited with status 0" in proc.stderr, proc.stderr
    (run,) = [call for call in calls if call[1] == "run"]
    assert run[0] == engine and run[-1].startswith("edgepack/mnist:")
    gpu = run.index(GPU[engine])
    assert run[gpu : gpu + 3] == [GPU[engine], "--group-add=video", ENGINES_RO]
    assert GPU["docker" if engine == "podman" else "podman"] not in run


def test_the_supervisor_refuses_an_engine_not_named_docker_or_podman(
    bundle: Path, tmp_path: Path
) -> None:
    proc, tools, calls = _run_with_standins(
        [sys.executable, str(bundle / "supervise.py"), "--engine", str(tmp_path / "bin/nerdctl")],
        tmp_path, "nerdctl",
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{tools}/nerdctl: this runtime's GPU access is set for docker or podman (the engine's "
        "file name), not 'nerdctl'"]
    assert calls == []
