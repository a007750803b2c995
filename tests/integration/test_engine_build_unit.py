"""The first-boot engine unit (templates/jetson/engine-build.service.jinja), rendered with hostile
values, accepted by the real `systemd-analyze verify` in both install forms (docker, podman), and
its command lines RUN in order against stand-ins: a STAND-IN container engine (runs the
container's command on this host, mapping its volumes; no Jetson, no NVIDIA runtime here) and
a STAND-IN trtexec (tests/data/jetson/fake_trtexec.py). The preflight reads the fixture
tests/data/jetson/r36.3.0 tree."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from packager.backends.jetson.backend import UNIT_GPU_ARGS
from packager.render import render
from packager.runtime.engine_key import EngineKey, check_plan

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "jetson" / "r36.3.0"
NAME = "mnist"
# The worst values bundle names and versions may hold (as in test_templates_parse.py).
WORST_NAME = "0" + ".z_9__z---0" * 5 + ".z_9_z"
WORST_VERSION = "_" + "._-" * 15 + "Z"

STAND_IN_ENGINE = r'''
"""STAND-IN for docker/podman: no daemon and no Jetson here. `info` reports the nvidia runtime;
`rm` succeeds; `run` runs the container's command on this host with the unit's --volume
mappings applied to its arguments and the stand-in image's library dir added (--lib-dir)."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["STAND_IN_CALLS"], "a") as handle:
    handle.write(json.dumps(args) + "\n")
if args[0] == "info":
    print('{"nvidia":{"path":"nvidia-container-runtime"},"runc":{"path":"runc"}}')
    sys.exit(0)
if args[0] != "run":
    sys.exit(0)
mapping, env, entrypoint, i = {}, dict(os.environ), None, 1
takes_value = {"--name", "--runtime", "--device", "--network", "--volume", "--env",
               "--entrypoint"}
while args[i].startswith("--"):
    flag = args[i]
    if flag in takes_value:
        value = args[i + 1]
        if flag == "--volume":
            source, target = value.split(":")[:2]
            mapping[target] = source
        elif flag == "--env":
            k, _, v = value.partition("=")
            env[k] = v
        elif flag == "--entrypoint":
            entrypoint = value
        i += 2
    else:
        i += 1
command = [entrypoint] + args[i + 1:]  # args[i] is the image
if entrypoint == "/bin/sh":  # the preflight's look at the image's libraries
    print("\n".join(sorted(os.listdir(os.environ["STAND_IN_IMAGE_LIBS"]))))
    sys.exit(0)
def remap(arg):
    for target, source in mapping.items():
        arg = arg.replace(target, source)
    return arg
command = [remap(a) for a in command] + ["--lib-dir", os.environ["STAND_IN_IMAGE_LIBS"]]
os.execve(command[0], command, env)
'''


def _context(tmp: Path, name: str, workspace: int = 1024, version: str = "1.0") -> dict[str, Any]:
    model = tmp / "image" / "model.onnx"
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    key = {"model_sha256": sha, "tensorrt": "8.6.2", "sm": 87, "precision": "fp16",
           "dla_core": None, "workspace_mib": workspace}
    # The image's runtime.json (engine_build --from-config reads the key and model from it).
    config = tmp / "image" / f"runtime-{workspace}.json"
    config.write_text(json.dumps({"model_name": "mnist", "model_path": str(model),
                                  "engine": {"key": key}}))
    return {
        "name": name, "version": version, "target": "jetson-orin-nano", "image_ref":
        "localhost/edgepack-mnist:1.0",
        "engine": {
            "config_path": str(config),
            "model_path": str(model),
            "model_sha256": sha,
            "tensorrt": "8.6.2", "sm": 87, "precision": "fp16", "dla_core": None,
            "workspace_mib": workspace, "l4t_min": "r36.0.0", "l4t_below": "r36.4.0",
            "min_free_mib": 16, "build_timeout_s": 3600, "progress_s": 1,
            "python": sys.executable, "runtime_root": str(tmp / "image" / "runtime"),
            "trtexec": str(tmp / "image" / "trtexec"), "timing_cache_seed": True,
            "gpu_args": UNIT_GPU_ARGS,  # what the backend's engine_context passes
        },
    }


def _install_form(unit: str, engine: str, engine_path: Path) -> str:
    """What install.sh writes: the engine's own '#<engine>-only ' lines kept, the others gone."""
    other = "podman" if engine == "docker" else "docker"
    text = re.sub(rf"(?m)^#{other}-only .*\n", "", unit)
    text = re.sub(rf"(?m)^#{engine}-only ", "", text)
    return text.replace("@ENGINE@", str(engine_path))


@pytest.fixture
def device(tmp_path: Path) -> dict[str, Path]:
    image = tmp_path / "image"
    (image / "runtime").mkdir(parents=True)
    (image / "runtime" / "edgepack_runtime").symlink_to(REPO / "packager" / "runtime")
    (image / "model.onnx").write_bytes(b"stand-in onnx model")
    (image / "lib").mkdir()
    (image / "lib" / "libnvinfer.so.8.6.2").write_bytes(b"stand-in")
    trtexec = image / "trtexec"
    trtexec.write_text(f"#!{sys.executable}\n" + (REPO / "tests/data/jetson/fake_trtexec.py")
                       .read_text())
    trtexec.chmod(0o755)
    bundle = tmp_path / "bundle"
    (bundle / "engine").mkdir(parents=True)
    shutil.copy(REPO / "packager" / "runtime" / "jetson_preflight.py", bundle)
    (bundle / "engine" / "timing.cache").write_text("seed\n")
    engines = tmp_path / "engines"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for engine in ("docker", "podman"):
        path = bindir / engine
        path.write_text(f"#!{sys.executable}\n" + STAND_IN_ENGINE)
        path.chmod(0o755)
    return {"tmp": tmp_path, "bundle": bundle, "engines": engines, "bin": bindir,
            "image": image}


def test_systemd_accepts_the_unit_in_both_install_forms(device: dict[str, Path]) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    for name, version in ((NAME, "1.0"), (WORST_NAME, WORST_VERSION)):
        unit = render("jetson/engine-build.service.jinja",
                      _context(device["tmp"], name, version=version))
        for engine in ("docker", "podman"):
            text = _install_form(unit, engine, device["bin"] / engine)
            assert len(re.findall(r"(?m)^ExecStart=", text)) == 1
            folder = device["tmp"] / f"units-{engine}"
            folder.mkdir(exist_ok=True)
            path = folder / "edgepack-x-engine.service"
            path.write_text(text)
            proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0 and proc.stderr.strip() == "", (engine, proc.stderr)
            gpu = "--runtime nvidia" if engine == "docker" else "--device nvidia.com/gpu=all"
            assert gpu in text
    assert "TimeoutStartSec=4500" in unit and "Type=oneshot" in unit
    assert "RemainAfterExit=yes" in unit


def _commands(unit: str, device: dict[str, Path]) -> list[tuple[bool, list[str]]]:
    """(failure ignored, argv) of ExecStartPre= then ExecStart=, with the device's fixed paths
    moved under tmp (the engines dir and /opt/edgepack/<name>)."""
    found = []
    for line in unit.splitlines():
        key, _, value = line.partition("=")
        if key not in ("ExecStartPre", "ExecStart"):
            continue
        ignore = value.startswith("-")
        argv = shlex.split(value.lstrip("-").replace("$$", "$").replace("%%", "%"))
        argv = [a.replace("/var/lib/edgepack/engines", str(device["engines"]))
                 .replace(f"/opt/edgepack/{NAME}", str(device["bundle"])) for a in argv]
        if "jetson_preflight.py" in " ".join(argv):
            argv += ["--root", str(FIXTURE)]  # the stand-in Jetson
        found.append((ignore, argv))
    return found


def _run_unit(unit: str, device: dict[str, Path]) -> str:
    env = {**os.environ, "STAND_IN_CALLS": str(device["tmp"] / "engine-calls"),
           "STAND_IN_IMAGE_LIBS": str(device["image"] / "lib"),
           "FAKE_TRTEXEC_RECORD": str(device["tmp"] / "trtexec-calls")}
    journal = []
    for ignore, argv in _commands(unit, device):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        journal.append(proc.stdout + proc.stderr)
        assert ignore or proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return "".join(journal)


def _trtexec_runs(device: dict[str, Path]) -> int:
    path = device["tmp"] / "trtexec-calls"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _key(ctx: dict[str, Any]) -> EngineKey:
    fields = ("model_sha256", "tensorrt", "sm", "precision", "dla_core", "workspace_mib")
    return EngineKey(**{name: ctx["engine"][name] for name in fields})


def test_the_unit_builds_skips_rebuilds_and_survives_a_kill(device: dict[str, Path]) -> None:
    ctx = _context(device["tmp"], NAME)
    for engine in ("docker", "podman"):
        shutil.rmtree(device["engines"], ignore_errors=True)
        unit = _install_form(render("jetson/engine-build.service.jinja", ctx), engine,
                             device["bin"] / engine)
        runs = _trtexec_runs(device)
        journal = _run_unit(unit, device)
        assert "preflight: ok" in journal and "timing cache seeded from" in journal
        key = _key(ctx)
        assert check_plan(key, device["engines"]).ready
        assert key.plan_path(device["engines"]).read_bytes().startswith(b"FAKE-PLAN")
        assert _trtexec_runs(device) == runs + 1
        assert "plan up to date" in _run_unit(unit, device)
        assert _trtexec_runs(device) == runs + 1
        calls = [json.loads(c) for c in (device["tmp"] / "engine-calls").read_text().splitlines()]
        assert calls[-1][:3] == ["run", "--rm", "--name"]

    changed = _context(device["tmp"], NAME, workspace=2048)
    unit = _install_form(render("jetson/engine-build.service.jinja", changed), "docker",
                         device["bin"] / "docker")
    journal = _run_unit(unit, device)
    assert "key differs: workspace_mib: expected 2048, found 1024" in journal
    assert check_plan(_key(changed), device["engines"]).ready

    # SIGKILL of the unit's main process (the stand-in engine exec()s the builder) mid-build.
    killed = _context(device["tmp"], NAME, workspace=4096)
    unit = _install_form(render("jetson/engine-build.service.jinja", killed), "docker",
                         device["bin"] / "docker")
    *_pre, (_, start) = _commands(unit, device)
    started = device["tmp"] / "started"
    env = {**os.environ, "STAND_IN_CALLS": str(device["tmp"] / "engine-calls"),
           "STAND_IN_IMAGE_LIBS": str(device["image"] / "lib"),
           "FAKE_TRTEXEC_SLEEP": "60", "FAKE_TRTEXEC_STARTED": str(started)}
    proc = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # The same stem: the builder removed the old key file before building, so what is left is
    # the old plan without a key - never loaded under either key - and no half-written plan.
    status = check_plan(_key(killed), device["engines"])
    assert (status.state, status.reason) == (
        "invalid", "8.6.2-sm87-fp16.plan without its key file (an interrupted build)")
    assert not check_plan(_key(changed), device["engines"]).ready
    old_plan = status.plan.read_bytes()  # the whole earlier plan, not a part of the killed one
    assert b"first half" in old_plan and b"workspace:2048" in old_plan
    journal = _run_unit(unit, device)  # the next boot
    assert "without its key file (an interrupted build); rebuilding" in journal
    assert check_plan(_key(killed), device["engines"]).ready
