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
from packager.backends.base import BuildRequest
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
