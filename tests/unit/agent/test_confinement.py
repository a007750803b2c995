"""One confinement for every way the runtime container starts: the unit's supervisor
(supervise.py), install.sh --no-systemd and the OTA agent (confinement.json) carry the same flags,
computed once from the target (packager.agent.confinement.from_target)."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

from packager.agent import confinement
from packager.backends.base import BuildRequest, PackagePlan
from packager.backends.linux.backend import (
    LinuxContainerBackend,
    template_context,
    write_confinement,
)
from packager.backends.linux.fit import linux_fit
from packager.image.spec import ImageResult
from packager.models import inspect_model
from packager.render import render
from packager.targets import LinuxTarget, resolve_target


@pytest.mark.parametrize("target", ["rpi-zero-2w", "industrial-pc"])
def test_unit_install_sh_and_agent_share_one_confinement(
    onnx_dir: Path, tmp_path: Path, target: str
) -> None:
    model = onnx_dir / "mnist.onnx"
    request = BuildRequest(model=model, target=target, version="1.0.0")
    info = inspect_model(model)
    loaded = resolve_target(target)
    plan = LinuxContainerBackend().plan(request, info, loaded, linux_fit(info, loaded))
    image = ImageResult(
        archive=tmp_path / "image.tar",
        manifest_digest="sha256:" + "1" * 64,
        config_digest="sha256:" + "2" * 64,
        size_bytes=1,
        layers=(),
        ref_name="edgepack/mnist:1.0.0",
    )
    context = template_context(plan, image)
    spec = loaded.spec
    assert isinstance(spec, LinuxTarget)
    expected = confinement.from_target(spec.service.memory_max_mb, spec.service.cpu_quota_percent)
    assert f"--memory={spec.service.memory_max_mb}m" in expected
    assert "--pids-limit=256" in expected

    # The agent's file: the v1 document of before (no device access), the same flags with
    # either engine, or any other (a Linux bundle's flags do not depend on the engine).
    assert context["device_access"] == {}
    write_confinement(spec, tmp_path)
    document = json.loads((tmp_path / confinement.FILE).read_text())
    assert document == {"schema": "edgepack.confinement/v1", "run_args": list(expected),
                        "restart": "unless-stopped"}
    agent_flags = confinement.detached_args(tmp_path)
    assert agent_flags == (*expected, "--restart=unless-stopped")
    for engine in ("docker", "/usr/bin/podman", "/usr/local/bin/nerdctl"):
        assert confinement.detached_args(tmp_path, engine) == agent_flags
    device_flags = {f for flags in confinement.NVIDIA_JETSON.values() for f in flags}
    assert not device_flags & set(agent_flags)

    # The unit's supervisor: RUN_ARGS, a Python literal in supervise.py.
    supervise = render("linux/supervise.py.jinja", context)
    # Run its top-level assignments (constants only) to read the list as Python sees it.
    assignments = [n for n in ast.parse(supervise).body if isinstance(n, ast.Assign)]
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=assignments, type_ignores=[]), "supervise.py", "exec"), namespace)
    supervised = namespace["RUN_ARGS"]
    assert isinstance(supervised, list)
    assert [a for a in supervised if a in expected] == list(expected)
    assert "DEVICE_ARGS" not in supervise and not device_flags & set(supervised)

    # install.sh --no-systemd: the `run -d` command line, split as sh would.
    install = render("linux/install.sh.jinja", context)
    lines = install.splitlines()
    start = next(i for i, line in enumerate(lines) if '"$ENGINE" run -d' in line)
    command = " ".join(line.rstrip("\\") for line in lines[start : start + 6])
    words = shlex.split(command.split("||")[0])
    assert [w for w in words if w in expected] == list(expected)
    assert "--restart=unless-stopped" in words
    assert "DEVICE_ARGS" not in install and not device_flags & set(words)


# --- device access: the Jetson GPU flags, per engine, exact strings only ----------------------

NOT_ALLOWED = (
    "--runtime=runc",
    "--runtime=nvidia-experimental",
    "--runtime=nvidia\n",
    "--device=nvidia.com/gpu=all\n",
    "--device=nvidia.com/gpu=0",
    "--device=nvidia.com/gpu=all,/dev/mem",
    "--device=/dev/nvhost-ctrl",
    "--privileged",
    "--group-add=root",
    "--group-add=video,disk",
    "--volume=/:/host",
    "--volume=/:/host:ro",
    "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines",
    "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:rw",
    "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:ro,rshared",
    "--volume=/var/lib/edgepack/engines/../..:/var/lib/edgepack/engines:ro",
    "--volume=/var/lib/edgepack/engines:/etc:ro",
    "--gpus=all",
)
ENGINES_RO = "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:ro"


def _jetson_document(tmp_path: Path, **device: list[object]) -> Path:
    """A confinement.json with the Jetson device access, ``device`` replacing engines' lists."""
    doc = confinement.document(confinement.from_target(512, 150),
                               device=confinement.NVIDIA_JETSON)  # fmt: skip
    doc["device_args"].update(device)
    (tmp_path / confinement.FILE).write_text(json.dumps(doc))
    return tmp_path


def test_each_engine_gets_its_own_gpu_flag_after_the_floor(tmp_path: Path) -> None:
    args = confinement.from_target(512, 150)
    (tmp_path / confinement.FILE).write_bytes(
        confinement.to_bytes(args, device=confinement.NVIDIA_JETSON))
    document = json.loads((tmp_path / confinement.FILE).read_text())
    assert document["schema"] == "edgepack.confinement/v2"
    assert document["run_args"] == list(args)  # the flags every engine shares
    # Written out by hand (not computed by the code under test).
    docker = ("--runtime=nvidia", "--group-add=video", ENGINES_RO)
    podman = ("--device=nvidia.com/gpu=all", "--group-add=video", ENGINES_RO)
    assert document["device_args"] == {"docker": list(docker), "podman": list(podman)}
    for engine, device in (("docker", docker), ("/usr/bin/docker", docker),
                           ("podman", podman), ("/usr/bin/podman", podman)):
        assert confinement.detached_args(tmp_path, engine) == (
            *args, *device, "--restart=unless-stopped")
    # Without an engine (edgepack verify, the publisher): checked, the shared flags only.
    assert confinement.detached_args(tmp_path) == (*args, "--restart=unless-stopped")


@pytest.mark.parametrize("engine", ["nerdctl", "/usr/bin/docker-wrapper", "/opt/podman/bin/crun",
                                    "", "/usr/bin/"])
def test_an_engine_not_named_docker_or_podman_is_refused_when_the_flags_depend_on_it(
    tmp_path: Path, engine: str
) -> None:
    _jetson_document(tmp_path)
    with pytest.raises(confinement.ConfinementError, match="set for docker or podman") as raised:
        confinement.detached_args(tmp_path, engine)
    assert "\n" not in str(raised.value)
    with pytest.raises(confinement.ConfinementError, match="set for docker or podman"):
        confinement.engine_name(engine)


@pytest.mark.parametrize("flag", NOT_ALLOWED)
def test_any_other_device_flag_is_refused(tmp_path: Path, flag: str) -> None:
    # In the flags every engine shares...
    document = confinement.document(confinement.from_target(None, None))
    document["run_args"].append(flag)
    (tmp_path / confinement.FILE).write_text(json.dumps(document))
    with pytest.raises(confinement.ConfinementError, match="not an allowed confinement flag"):
        confinement.detached_args(tmp_path)
    # ... and in either engine's device access (when building and when reading).
    for engine in ("docker", "podman"):
        with pytest.raises(confinement.ConfinementError, match=f"device_args.{engine}: "):
            confinement.document(confinement.from_target(None, None),
                                 device={**confinement.NVIDIA_JETSON, engine: (flag,)})
        listed = [*confinement.NVIDIA_JETSON[engine], flag]
        _jetson_document(tmp_path, **{engine: listed})
        with pytest.raises(confinement.ConfinementError,
                           match=f"device_args.{engine}: .* not an allowed device flag"):
            confinement.detached_args(tmp_path, engine)
    # The GPU flags do not stand in for the floor.
    with pytest.raises(confinement.ConfinementError, match="lack"):
        confinement.check_args([])


@pytest.mark.parametrize(("engine", "other"), [("podman", "docker"), ("docker", "podman")])
def test_an_engine_given_the_other_engines_gpu_flag_is_refused(
    tmp_path: Path, engine: str, other: str
) -> None:
    """podman has no "nvidia" OCI runtime, docker before 25 no CDI: a document that gives one
    engine the other's GPU flag is refused when read (the agent, verify, the publisher)."""
    swapped = [confinement.GPU[other], "--group-add=video", ENGINES_RO]
    _jetson_document(tmp_path, **{engine: swapped})
    message = (f"device_args.{engine}: '{confinement.GPU[other]}' is {other}'s GPU flag; "
               f"{engine} takes '{confinement.GPU[engine]}'")
    for read_with in (None, engine, other):
        with pytest.raises(confinement.ConfinementError, match=re.escape(message)):
            confinement.detached_args(tmp_path, read_with)
    # Both GPU flags in one engine's list: refused the same way.
    _jetson_document(tmp_path, **{engine: [*confinement.NVIDIA_JETSON[engine],
                                           confinement.GPU[other]]})
    with pytest.raises(confinement.ConfinementError, match=re.escape(message)):
        confinement.read(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_args": ["--runtime=nvidia"]}, "device_args: expected an object with exactly"),
        ({"device_args": {"docker": ["--runtime=nvidia"]}}, "exactly the keys docker, podman"),
        ({"device_args": {**{e: list(f) for e, f in confinement.NVIDIA_JETSON.items()},
                          "nerdctl": []}}, "exactly the keys docker, podman"),
        ({"device_args": {"docker": "--runtime=nvidia", "podman": []}},
         "device_args.docker: expected a list"),
        ({"device_args": {"docker": ["--runtime=nvidia", "--runtime=nvidia"],
                          "podman": ["--device=nvidia.com/gpu=all"]}}, "a flag is repeated"),
        # The same access with both engines: only the GPU flag differs.
        ({"device_args": {"docker": ["--runtime=nvidia", "--group-add=video"],
                          "podman": ["--device=nvidia.com/gpu=all", ENGINES_RO]}},
         "differ beyond their GPU flag"),
        ({"device_args": {"docker": ["--runtime=nvidia"], "podman": []}},
         "differ beyond their GPU flag"),
        ({"schema": "edgepack.confinement/v1"}, "unknown key 'device_args'"),
        ({"schema": "edgepack.confinement/v3"}, "schema: expected 'edgepack.confinement/v1' or"),
    ],
)  # fmt: skip
def test_a_document_whose_device_access_is_malformed_is_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    doc = confinement.document(confinement.from_target(None, None),
                               device=confinement.NVIDIA_JETSON)  # fmt: skip
    (tmp_path / confinement.FILE).write_text(json.dumps({**doc, **change}))
    with pytest.raises(confinement.ConfinementError, match=re.escape(message)) as raised:
        confinement.read(tmp_path)
    assert str(raised.value).startswith(f"{tmp_path / confinement.FILE}: ")
    assert "\n" not in str(raised.value)
    # v2 without device_args: refused too (a v2 document is one with device access).
    del doc["device_args"]
    (tmp_path / confinement.FILE).write_text(json.dumps(doc))
    with pytest.raises(confinement.ConfinementError, match="missing key 'device_args'"):
        confinement.read(tmp_path)


@pytest.mark.parametrize("flag", [f for flags in confinement.NVIDIA_JETSON.values() for f in flags])
def test_a_v1_document_with_device_flags_is_refused_naming_the_fix(
    tmp_path: Path, flag: str
) -> None:
    """A Jetson bundle built before device access was per engine (one list, --runtime=nvidia for
    every engine, which podman cannot start): refused, for any engine, saying rebuild."""
    document = confinement.document(confinement.from_target(512, 150))
    document["run_args"].append(flag)
    (tmp_path / confinement.FILE).write_text(json.dumps(document))
    for engine in (None, "docker", "podman"):
        with pytest.raises(confinement.ConfinementError,
                           match=f"{re.escape(repr(flag))} is device access.*rebuild the bundle"):
            confinement.detached_args(tmp_path, engine)


# --- the prepare step: one allow-listed command before a release starts -----------------------

STEP_JSON = {
    "args": ["--from-config", "/opt/edgepack/model/runtime.json"],
    "binds": ["/var/lib/edgepack/engines:/var/lib/edgepack/engines:rw"],
    "module": "edgepack_runtime.engine_build",
    "python": "/usr/bin/python3.10",
    "timeout_s": 4500,
}


def test_a_prepare_step_round_trips_and_a_document_without_one_is_unchanged(
    tmp_path: Path,
) -> None:
    args = confinement.from_target(512, 150)
    step = confinement.engine_build_step("/usr/bin/python3.10", 4500)
    assert step.to_json() == STEP_JSON
    (tmp_path / confinement.FILE).write_bytes(
        confinement.to_bytes(args, prepare=step, device=confinement.NVIDIA_JETSON))
    read = confinement.read(tmp_path)
    assert read == confinement.Confinement(
        args, "unless-stopped", step, tuple(confinement.NVIDIA_JETSON.items()))
    for engine in ("docker", "podman"):
        assert confinement.detached_args(tmp_path, engine) == read.for_engine(engine) == (
            *args, *confinement.NVIDIA_JETSON[engine], "--restart=unless-stopped")
    # Without a step (every Linux/Pi bundle): exactly the document of before, byte for byte.
    plain = confinement.to_bytes(args)
    assert plain == (json.dumps({"restart": "unless-stopped", "run_args": list(args),
                                 "schema": confinement.SCHEMA}, indent=2) + "\n").encode()
    (tmp_path / confinement.FILE).write_bytes(plain)
    assert confinement.read(tmp_path).prepare is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"module": "edgepack_runtime.server"}, "prepare.module"),
        ({"module": ["edgepack_runtime.engine_build"]}, "prepare.module"),
        ({"args": ["--from-config", "/opt/edgepack/model/runtime.json", "--verbose"]},
         "prepare.args"),
        ({"args": ["--from-config=/opt/edgepack/model/runtime.json"]}, "prepare.args"),
        ({"args": "--from-config /opt/edgepack/model/runtime.json"}, "prepare.args"),
        ({"binds": []}, "prepare.binds"),
        ({"binds": ["/:/var/lib/edgepack/engines:rw"]}, "prepare.binds"),
        ({"binds": ["/var/lib/edgepack/engines:/var/lib/edgepack/engines"]}, "prepare.binds"),
        ({"binds": ["/var/lib/edgepack/engines/../..:/var/lib/edgepack/engines:rw"]},
         "prepare.binds"),
        ({"python": "/usr/bin/python3"}, "prepare.python"),
        ({"python": "/tmp/python3.10"}, "prepare.python"),
        ({"python": "/usr/bin/python3.10 -c"}, "prepare.python"),
        ({"timeout_s": 0}, "prepare.timeout_s"),
        ({"timeout_s": confinement.MAX_PREPARE_TIMEOUT_S + 1}, "prepare.timeout_s"),
        ({"timeout_s": 60.5}, "prepare.timeout_s"),
        ({"timeout_s": "60"}, "prepare.timeout_s"),
        ({"user": "0:0"}, "prepare: unknown key 'user'"),
    ],
)  # fmt: skip
def test_any_other_prepare_step_is_refused(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    step = {**STEP_JSON, **change}
    with pytest.raises(confinement.ConfinementError, match=message):
        confinement.check_prepare(step)
    document = confinement.document(confinement.from_target(None, None))
    document["prepare"] = step
    (tmp_path / confinement.FILE).write_text(json.dumps(document))
    with pytest.raises(confinement.ConfinementError, match=message):
        confinement.read(tmp_path)
    with pytest.raises(confinement.ConfinementError, match=message):
        confinement.detached_args(tmp_path)  # what `edgepack verify` and the publisher call


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"prepare": None}, "prepare: expected a JSON object"),
        ({"prepare": {k: v for k, v in STEP_JSON.items() if k != "binds"}},
         "prepare: missing key 'binds'"),
        ({"hooks": []}, "unknown key 'hooks'"),
    ],
)  # fmt: skip
def test_a_document_with_an_unknown_or_broken_part_is_refused(
    tmp_path: Path, document: dict[str, object], message: str
) -> None:
    doc = {**confinement.document(confinement.from_target(None, None)), **document}
    (tmp_path / confinement.FILE).write_text(json.dumps(doc))
    with pytest.raises(confinement.ConfinementError, match=message):
        confinement.read(tmp_path)


@pytest.mark.parametrize(("engine", "gpu", "not_gpu"),
                         [("docker", "--runtime=nvidia", "--device=nvidia.com/gpu=all"),
                          ("podman", "--device=nvidia.com/gpu=all", "--runtime=nvidia")])
def test_the_prepare_command_line_carries_the_floor_and_only_the_engines_gpu_flags(
    engine: str, gpu: str, not_gpu: str
) -> None:
    step = confinement.engine_build_step("/usr/bin/python3.8", 600)
    jetson = confinement.Confinement(confinement.from_target(512, 150), "unless-stopped", step,
                                     tuple(confinement.NVIDIA_JETSON.items()))  # fmt: skip
    argv = confinement.prepare_argv("edgepack-x-prepare", "edgepack/x:1",
                                    jetson.for_engine(engine), step)  # fmt: skip
    assert argv == (
        "run", "--rm", "--name", "edgepack-x-prepare", "--user=0:0", *confinement.REQUIRED,
        gpu, "--group-add=video", "--network=none",
        "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:rw",
        "--entrypoint=/usr/bin/python3.8", "edgepack/x:1", "-m", "edgepack_runtime.engine_build",
        "--from-config", "/opt/edgepack/model/runtime.json",
    )  # fmt: skip
    assert not_gpu not in argv
    # No memory limit (trtexec needs more than the runtime), no read-only engines bind.
    assert not any(a.startswith("--memory") or a.endswith(":ro") for a in argv)
    plain = confinement.prepare_argv("n", "r", confinement.from_target(None, None), step)
    assert not set(confinement.PREPARE_DEVICE_FLAGS) & set(plain)


def _jetson_plan(tmp_path: Path, target_name: str) -> PackagePlan:
    from packager.backends.jetson.backend import JetsonBackend

    model = Path("/work/shared/testdata/onnx/mnist.onnx")
    request = BuildRequest(model=model, target=target_name, version="1.0.0",
                           base="docker://127.0.0.1:19400/stand-in/l4t@sha256:" + "ab" * 32)
    info, loaded, backend = inspect_model(model), resolve_target(target_name), JetsonBackend()
    return backend.plan(request, info, loaded, backend.fit(request, info, loaded))


def test_jetson_bundles_declare_the_engine_build_and_others_none(tmp_path: Path) -> None:
    from packager.backends.linux.backend import prepare_step

    orin = _jetson_plan(tmp_path, "jetson-orin-nano")
    assert prepare_step(orin) == confinement.engine_build_step("/usr/bin/python3.10", 4500)
    # JetPack 4 serves on the CPU fallback (no engine built): nothing to prepare.
    assert prepare_step(_jetson_plan(tmp_path, "jetson-nano")) is None
    model = Path("/work/shared/testdata/onnx/mnist.onnx")
    info, loaded = inspect_model(model), resolve_target("rpi-zero-2w")
    request = BuildRequest(model=model, target="rpi-zero-2w", version="1.0.0")
    pi = LinuxContainerBackend().plan(request, info, loaded, linux_fit(info, loaded))
    assert prepare_step(pi) is None
    spec = loaded.spec
    assert isinstance(spec, LinuxTarget)
    write_confinement(spec, tmp_path, (), prepare_step(pi))
    assert (tmp_path / confinement.FILE).read_bytes() == confinement.to_bytes(
        confinement.from_target(spec.service.memory_max_mb, spec.service.cpu_quota_percent))
