"""One confinement for every way the runtime container starts: the unit's supervisor
(supervise.py), install.sh --no-systemd and the OTA agent (confinement.json) carry the same flags,
computed once from the target (packager.agent.confinement.from_target)."""

from __future__ import annotations

import ast
import json
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

    # The agent's file.
    write_confinement(spec, tmp_path)
    document = json.loads((tmp_path / confinement.FILE).read_text())
    assert document["run_args"] == list(expected)
    agent_flags = confinement.detached_args(tmp_path)
    assert agent_flags == (*expected, "--restart=unless-stopped")

    # The unit's supervisor: RUN_ARGS, a Python literal in supervise.py.
    supervise = render("linux/supervise.py.jinja", context)
    # Run its top-level assignments (constants only) to read the list as Python sees it.
    assignments = [n for n in ast.parse(supervise).body if isinstance(n, ast.Assign)]
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=assignments, type_ignores=[]), "supervise.py", "exec"), namespace)
    supervised = namespace["RUN_ARGS"]
    assert isinstance(supervised, list)
    assert [a for a in supervised if a in expected] == list(expected)

    # install.sh --no-systemd: the `run -d` command line, split as sh would.
    install = render("linux/install.sh.jinja", context)
    lines = install.splitlines()
    start = next(i for i, line in enumerate(lines) if '"$ENGINE" run -d' in line)
    command = " ".join(line.rstrip("\\") for line in lines[start : start + 6])
    words = shlex.split(command.split("||")[0])
    assert [w for w in words if w in expected] == list(expected)
    assert "--restart=unless-stopped" in words


# --- device access: the Jetson GPU flags, exact strings only -----------------------------------

NOT_ALLOWED = (
    "--runtime=runc",
    "--runtime=nvidia-experimental",
    "--runtime=nvidia\n",
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
    "--device=/dev/nvhost-ctrl",
    "--gpus=all",
)


def test_the_nvidia_flags_are_accepted_after_the_floor(tmp_path: Path) -> None:
    args = confinement.from_target(512, 150, device=confinement.NVIDIA_JETSON)
    assert args[-3:] == (
        "--runtime=nvidia",
        "--group-add=video",
        "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:ro",
    )
    (tmp_path / confinement.FILE).write_bytes(confinement.to_bytes(args))
    assert confinement.detached_args(tmp_path) == (*args, "--restart=unless-stopped")


@pytest.mark.parametrize("flag", NOT_ALLOWED)
def test_any_other_device_flag_is_refused(tmp_path: Path, flag: str) -> None:
    with pytest.raises(confinement.ConfinementError, match="not an allowed confinement flag"):
        confinement.from_target(None, None, device=(flag,))
    document = confinement.document(confinement.from_target(None, None))
    document["run_args"].append(flag)
    (tmp_path / confinement.FILE).write_text(json.dumps(document))
    with pytest.raises(confinement.ConfinementError, match="not an allowed confinement flag"):
        confinement.detached_args(tmp_path)
    # The GPU flags do not stand in for the floor.
    with pytest.raises(confinement.ConfinementError, match="lack"):
        confinement.check_args(confinement.NVIDIA_JETSON)


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
    args = confinement.from_target(512, 150, device=confinement.NVIDIA_JETSON)
    step = confinement.engine_build_step("/usr/bin/python3.10", 4500)
    assert step.to_json() == STEP_JSON
    (tmp_path / confinement.FILE).write_bytes(confinement.to_bytes(args, prepare=step))
    read = confinement.read(tmp_path)
    assert read == confinement.Confinement((*args, "--restart=unless-stopped"), step)
    assert confinement.detached_args(tmp_path) == read.run_args
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


def test_the_prepare_command_line_carries_the_floor_and_only_the_bundles_gpu_flags() -> None:
    step = confinement.engine_build_step("/usr/bin/python3.8", 600)
    jetson = confinement.from_target(512, 150, device=confinement.NVIDIA_JETSON)
    argv = confinement.prepare_argv("edgepack-x-prepare", "edgepack/x:1", jetson, step)
    assert argv == (
        "run", "--rm", "--name", "edgepack-x-prepare", "--user=0:0", *confinement.REQUIRED,
        "--runtime=nvidia", "--group-add=video", "--network=none",
        "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:rw",
        "--entrypoint=/usr/bin/python3.8", "edgepack/x:1", "-m", "edgepack_runtime.engine_build",
        "--from-config", "/opt/edgepack/model/runtime.json",
    )  # fmt: skip
    # No memory limit (trtexec needs more than the runtime), no read-only engines bind.
    assert not any(a.startswith("--memory") or a.endswith(":ro") for a in argv)
    plain = confinement.prepare_argv("n", "r", confinement.from_target(None, None), step)
    assert "--runtime=nvidia" not in plain and "--group-add=video" not in plain


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
