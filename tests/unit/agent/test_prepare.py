"""The agent runs a release's prepare step (confinement.json ``prepare``: a Jetson bundle's TensorRT
engine build, ``edgepack_runtime.engine_build --from-config``) in the new image after staging it
and before starting its serving container; a failed or timed-out step still starts the release
(it serves on its explicit fallback) and the report says so; a prepare step outside the
allow-list is refused by the publisher's verify and by the agent before anything runs.

The releases are synthetic Jetson-like bundles (tests/unit/ota/synth.py: a real OCI image.tar,
real manifest) whose confinement.json carries the Jetson GPU flags and the prepare step, published
into a real TUF repository served over HTTP on loopback (ports 19900-19924; the runtime's port
from 19925-19949). The container engine is the agent tests' STAND-IN (tests/unit/agent/
fake_engine.py: no docker/podman, no Jetson, no TensorRT here); its foreground "container" for
the prepare step prints a builder's lines and exits 0, exits 4, or hangs until removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from packager.agent import confinement
from packager.agent.agent import CRASH_ENV, MAX_PREPARE_ATTEMPTS, Agent, init_device
from packager.agent.protocol import FILE_PREFIX
from packager.bundle.verify import verify_bundle
from packager.errors import VerifyError
from packager.ota.bundle import ObjectSource, plan_release
from packager.ota.repo import Repository
from tests.ports import free_port_in
from tests.unit.agent.helpers import Device, reports, static_mirror

ENGINES = "/var/lib/edgepack/engines"
RUN_ARGS = confinement.from_target(512, 150)
STEP = confinement.engine_build_step("/usr/bin/python3.10", 4500)
JETSON_CONFINEMENT = confinement.to_bytes(RUN_ARGS, prepare=STEP, device=confinement.NVIDIA_JETSON)
# Each engine's GPU flag (written out by hand, not computed by the code under test): podman has
# no "nvidia" OCI runtime, it gives the GPU through CDI.
GPU = {"podman": "--device=nvidia.com/gpu=all", "docker": "--runtime=nvidia"}


def prepare_argv(version: str, engine: str = "podman") -> list[str]:
    """Written out by hand (not computed by the code under test)."""
    return [
        "run", "--rm", "--name", "edgepack-demo-prepare", "--user=0:0",
        "--read-only", "--tmpfs=/tmp:rw,size=64m,mode=1777", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", GPU[engine], "--group-add=video",
        "--network=none", f"--volume={ENGINES}:{ENGINES}:rw",
        "--entrypoint=/usr/bin/python3.10", f"edgepack/demo:{version}",
        "-m", "edgepack_runtime.engine_build",
        "--from-config", "/opt/edgepack/model/runtime.json",
    ]  # fmt: skip


def serving_flags(engine: str) -> list[str]:
    """The serving container's confinement with ``engine`` (by hand, as prepare_argv)."""
    return [
        "--read-only", "--tmpfs=/tmp:rw,size=64m,mode=1777", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", "--memory=512m", "--memory-swap=512m", "--cpus=1.50",
        "--pids-limit=256", GPU[engine], "--group-add=video", f"--volume={ENGINES}:{ENGINES}:ro",
        "--restart=unless-stopped",
    ]  # fmt: skip


@pytest.fixture
def mirror(repo: Repository) -> Iterator[str]:
    """The repository's files over HTTP on loopback (a mirror: static files only)."""
    with static_mirror(repo.path / "repository", range(19900, 19925)) as url:
        yield url


@pytest.fixture
def jetson(tmp_path: Path, repo: Repository, engine: Path) -> Device:
    """A device trusting ``repo``, its bundles Jetson-like (GPU flags and the prepare step)."""
    root = tmp_path / "device"
    init_device(root, repo.trusted_root)
    # SO_REUSEADDR, as the runtime binds: a port an earlier test left in TIME_WAIT is free.
    port = free_port_in(range(19925, 19950), reuse=True)
    return Device(tmp_path, repo, engine, root, port, JETSON_CONFINEMENT)


def _calls(engine: Path) -> list[list[str]]:
    log = engine.parent / "calls.log"
    return [line.split(" ") for line in log.read_text().splitlines()] if log.exists() else []


def _runs(engine: Path) -> list[list[str]]:
    return [call for call in _calls(engine) if call[0] == "run"]


def _mode(engine: Path, mode: str) -> None:
    (engine.parent / "prepare-mode").write_text(mode)


def test_prepare_runs_in_the_new_image_before_its_serving_start(
    jetson: Device, mirror: str
) -> None:
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    result = jetson.run_once(mirror)
    assert (result.outcome, result.reason) == ("committed", ""), result
    jetson.assert_on(1)
    runs = _runs(jetson.engine)
    assert runs[0] == prepare_argv("1.0.0")
    assert runs[1][:2] == ["run", "-d"] and runs[1][-1] == "edgepack/demo:1.0.0"
    assert len(runs) == 2
    # The stand-in engine is named podman: CDI, never docker's NVIDIA runtime.
    assert runs[1][runs[1].index("-p") + 2 : runs[1].index("--")] == serving_flags("podman")
    # A container left by an interrupted earlier run is removed by name first.
    calls = _calls(jetson.engine)
    assert calls[calls.index(runs[0]) - 1] == ["rm", "-f", "edgepack-demo-prepare"]
    (report,) = reports(jetson.root)
    assert (report["outcome"], report["reason"], report["prepare"]) == ("committed", "", "ok")

    # An update: v2's step runs while v1 still serves (no stop before it), then v2 starts.
    jetson.repo.publish(jetson.bundle("2.0.0", seed=2))
    assert jetson.run_once(mirror).outcome == "committed"
    jetson.assert_on(2)
    calls = _calls(jetson.engine)
    at = calls.index(prepare_argv("2.0.0"))
    assert not any(call[0] == "stop" for call in calls[calls.index(runs[1]) : at])
    after = [call for call in calls[at + 1 :] if call[0] in ("run", "stop")]
    assert after[0] == ["stop", "-t", "2", "edgepack-demo"]
    assert after[1][:2] == ["run", "-d"] and after[1][-1] == "edgepack/demo:2.0.0"


def _named(engine: Path, name: str) -> Path:
    """The agent tests' STAND-IN engine under another file name (same state, same behaviour):
    the agent tells docker from podman by the engine's file name only."""
    folder = engine.parent / f"as-{name}"
    folder.mkdir(exist_ok=True)
    named = folder / name
    named.write_text(f'#!/bin/sh\nexec "{engine}" "$@"\n')
    named.chmod(0o755)
    return named


@pytest.mark.parametrize("engine_name", ["podman", "docker"])
def test_the_prepare_step_and_the_runtime_get_the_gpu_as_their_engine_gives_it(
    jetson: Device, engine_name: str
) -> None:
    engine = _named(jetson.engine, engine_name)
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    result = Agent(dataclasses.replace(jetson.config(), engine=str(engine))).run_once()
    assert (result.outcome, result.reason) == ("committed", ""), result
    jetson.assert_on(1)
    prepare, serve = _runs(jetson.engine)
    other = GPU["docker" if engine_name == "podman" else "podman"]
    assert prepare == prepare_argv("1.0.0", engine_name)
    assert GPU[engine_name] in prepare and other not in prepare
    publish = serve.index("-p")
    assert serve[:publish] == ["run", "-d", "--name", "edgepack-demo"]
    assert serve[publish + 2 : serve.index("--")] == serving_flags(engine_name)
    assert other not in serve


def test_an_engine_not_named_docker_or_podman_runs_nothing_of_a_gpu_release(
    jetson: Device,
) -> None:
    engine = _named(jetson.engine, "nerdctl")
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    result = Agent(dataclasses.replace(jetson.config(), engine=str(engine))).run_once()
    assert result.outcome == "rolled-back", result
    assert result.reason == (
        f"runtime not started: container engine {str(engine)!r}: this bundle's device access "
        "is set for docker or podman (the engine's file name), not 'nerdctl'"
    )
    assert _runs(jetson.engine) == []


def test_a_bundle_without_a_prepare_step_runs_none(tmp_path: Path, jetson: Device) -> None:
    plain = dataclasses.replace(jetson, confinement=confinement.to_bytes(RUN_ARGS))
    plain.repo.publish(plain.bundle("1.0.0", seed=1))
    result = plain.run_once()
    assert (result.outcome, result.reason) == ("committed", "")
    assert [run[:2] for run in _runs(plain.engine)] == [["run", "-d"]]
    assert "prepare" not in reports(plain.root)[0]


def test_a_failed_prepare_still_starts_the_release_and_reports_it(
    jetson: Device, mirror: str
) -> None:
    _mode(jetson.engine, "fail")
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    result = jetson.run_once(mirror)
    line = "exit 4: engine build: TensorRT: expected 8.6.2, found 8.5.2 (stand-in)"
    assert (result.outcome, result.reason) == ("committed", f"prepare: failed ({line})")
    jetson.assert_on(1)  # serving (on its fallback, as its health report says)
    (report,) = reports(jetson.root)
    assert report["outcome"] == "committed"
    assert report["reason"] == f"prepare: failed ({line})"
    assert report["prepare"] == f"failed ({line})"


def test_a_prepare_past_its_timeout_is_removed_and_the_release_starts(jetson: Device) -> None:
    _mode(jetson.engine, "hang")
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    result = jetson.run_once(prepare_max_s=1.0)  # the device's own cap on the bundle's 4500 s
    assert result.outcome == "committed"
    assert result.reason == "prepare: failed (timed out after 1 s and was removed)"
    jetson.assert_on(1)
    calls = _calls(jetson.engine)
    at = calls.index(prepare_argv("1.0.0"))
    assert calls[at + 1] == ["rm", "-f", "edgepack-demo-prepare"]  # removed by name
    # The hung container is gone (the engine fixture also checks no process survived).
    assert not (jetson.engine.parent / "containers" / "edgepack-demo-prepare.json").exists()


def test_a_crash_mid_prepare_reruns_it_and_gives_up_after_the_limit(jetson: Device) -> None:
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    for attempt in range(1, MAX_PREPARE_ATTEMPTS + 1):
        proc = jetson.run_cli(jetson.cli_argv("--repo", jetson.usb_uri),
                              env={CRASH_ENV: "prepare-start"})  # fmt: skip
        assert proc.returncode == -9, proc.stderr
        state = json.loads((jetson.root / "state.json").read_text())
        assert state["pending"]["phase"] == "prepare"
        assert state["pending"]["prepare_attempts"] == attempt
    result = jetson.run_once()
    assert result.outcome == "committed"
    assert result.reason == f"prepare: failed (interrupted {MAX_PREPARE_ATTEMPTS} times)"
    assert not any(run[:2] == ["run", "--rm"] for run in _runs(jetson.engine))
    jetson.assert_on(1)


def test_a_crash_after_prepare_ran_reruns_it_then_commits(jetson: Device) -> None:
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    proc = jetson.run_cli(jetson.cli_argv("--repo", jetson.usb_uri),
                          env={CRASH_ENV: "prepare-ran"})  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    assert json.loads((jetson.root / "state.json").read_text())["pending"]["phase"] == "prepare"
    result = jetson.run_once()
    assert (result.outcome, result.reason) == ("committed", "")
    # Idempotent: run again (the build skips a plan whose key exists), then serving.
    runs = _runs(jetson.engine)
    assert runs == [prepare_argv("1.0.0"), prepare_argv("1.0.0"), runs[2]]
    assert runs[2][:2] == ["run", "-d"]
    jetson.assert_on(1)


HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "other module": ({"module": "os"}, "prepare.module 'os' is not one of"),
    "another runtime module": (
        {"module": "edgepack_runtime.server"}, "prepare.module 'edgepack_runtime.server'"),
    "extra arg": (
        {"args": ["--from-config", "/opt/edgepack/model/runtime.json", "--trtexec", "/bin/sh"]},
        "prepare.args"),
    "other config": ({"args": ["--from-config", "/etc/shadow"]}, "prepare.args"),
    "bind of /": ({"binds": ["/:/host:rw"]}, "prepare.binds"),
    "rw bind elsewhere": ({"binds": ["/etc:/var/lib/edgepack/engines:rw"]}, "prepare.binds"),
    "second bind": (
        {"binds": [f"{ENGINES}:{ENGINES}:rw", "/root:/root:rw"]}, "prepare.binds"),
    "huge timeout": ({"timeout_s": 10**9}, "prepare.timeout_s 1000000000"),
    "boolean timeout": ({"timeout_s": True}, "prepare.timeout_s True"),
    "another interpreter": ({"python": "/bin/sh"}, "prepare.python '/bin/sh'"),
    "interpreter with a newline": (
        {"python": "/usr/bin/python3.10\n"}, "prepare.python '/usr/bin/python3.10\\n'"),
    "unknown key": ({"env": {"LD_PRELOAD": "/x.so"}}, "prepare: unknown key 'env'"),
}


def _hostile_bytes(changes: dict[str, Any]) -> bytes:
    document = confinement.document(RUN_ARGS, prepare=STEP)
    document["prepare"] = {**document["prepare"], **changes}
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_prepare_is_refused_by_verify_and_by_the_agent(
    tmp_path: Path, jetson: Device, case: str
) -> None:
    changes, message = HOSTILE[case]
    hostile = _hostile_bytes(changes)
    with pytest.raises(confinement.ConfinementError, match=re.escape(message)):
        confinement.check_prepare(json.loads(hostile)["prepare"])
    # `edgepack verify` and the publisher refuse the bundle...
    bad = dataclasses.replace(jetson, tmp=tmp_path / "bad", confinement=hostile)
    bad.tmp.mkdir()
    bundle = bad.bundle("2.0.0", seed=2)
    problems = verify_bundle(bundle).problems
    assert any(message in problem for problem in problems), problems
    with pytest.raises(VerifyError, match="prepare"):
        jetson.repo.publish(bundle)

    # ... and a release signed anyway (the online targets key) never runs anything of it.
    jetson.repo.publish(jetson.bundle("1.0.0", seed=1))
    assert jetson.run_once().outcome == "committed"
    plan = plan_release(jetson.bundle("2.0.0", seed=2), sequence=2, channel="stable",
                        percent=100)  # fmt: skip
    swapped_file = tmp_path / "hostile.json"
    swapped_file.write_bytes(hostile)
    digest = hashlib.sha256(hostile).hexdigest()
    doc = json.loads(plan.document)
    for entry in doc["files"]:
        if entry["path"] == confinement.FILE:
            entry["target"] = FILE_PREFIX + digest
    swapped = ObjectSource(FILE_PREFIX + digest, digest, len(hostile), swapped_file)
    jetson.repo.apply(dataclasses.replace(
        plan, objects=(*plan.objects, swapped),
        document=(json.dumps(doc, sort_keys=True) + "\n").encode(),
    ))  # fmt: skip
    before = len(_runs(jetson.engine))
    result = jetson.run_once()
    assert result.outcome == "rolled-back" and message in result.reason, result
    assert result.reason.startswith("runtime not started: ")
    new_runs = _runs(jetson.engine)[before:]
    # Nothing of v2 ran: only v1's serving container was started again by the rollback.
    assert all(run[-1] == "edgepack/demo:1.0.0" and run[:2] == ["run", "-d"] for run in new_runs)
    jetson.assert_on(1)
    assert [r["outcome"] for r in reports(jetson.root)] == ["committed", "rolled-back"]


# --- a real Jetson bundle (edgepack build on a STAND-IN base: tests/unit/ota/jetson_bundle.py) --


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.ota.jetson_bundle import build_jetson_bundle

    return build_jetson_bundle(tmp_path_factory.mktemp("jetson"))


def test_a_built_jetson_bundle_declares_the_engine_build_and_verify_guards_it(
    jetson_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from packager.errors import ExitCode
    from tests.cli_runner import run_cli

    step = confinement.read(jetson_bundle).prepare
    # The test-only target's CPython is 3.11 (its stand-in base's): the image's own interpreter.
    assert step == confinement.engine_build_step("/usr/bin/python3.11", 4500)
    # The image's runtime.json is where the step's --from-config points.
    assert step.args == ("--from-config", "/opt/edgepack/model/runtime.json")
    for case in ("extra arg", "bind of /", "huge timeout"):
        bundle = Path(shutil.copytree(jetson_bundle, tmp_path / case.replace(" ", "-")))
        document = json.loads((bundle / confinement.FILE).read_text())
        document["prepare"].update(HOSTILE[case][0])
        (bundle / confinement.FILE).write_text(json.dumps(document))
        code, out, err = run_cli(["verify", str(bundle), "--json"], capsys)
        assert code == ExitCode.VERIFY, (out, err)
        assert HOSTILE[case][1] in out + err
