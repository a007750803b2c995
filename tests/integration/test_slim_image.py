"""The slim image (issue 16): the layer policy removes only what the runtime provably never touches.

The proof: the FULL rpi4 image (``--no-slim``: every file the packages and wheels ship) runs the
whole runtime workload under qemu while a Python audit hook and ``LD_DEBUG=files`` record every
file opened, listed or mapped (tests/integration/slim_trace.py); the test fails when that trace
meets any path packager/image/data/slim-policy.toml removes. A control run in the same container
(importing sqlite3, readline, unittest) shows the same recorders do see removed files. Then the
SLIM image runs the same workload, green, and no shared object left in it names a removed library.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from packager.image.layer import normalize_path
from packager.tools import skopeo
from tests.integration.conftest import REPO, build_json
from tests.integration.slim_trace import (
    SITE_PACKAGES,
    alltypes_model,
    image_files,
    policies,
    prepare_trace_dir,
    read_trace,
    removed_and_touched,
    running,
    trace_env,
    unresolved_needed,
    workload,
)
from tests.process_guard import suite_container

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Fixed loopback ports for this module (issue 16's range).
FULL_PORT = 19031
SLIM_PORT = 19032


def _build(
    model: Path, target: str, name: str, out: Path, cache: Path, *flags: str
) -> dict[str, Any]:
    return build_json(
        str(model),
        "--target",
        target,
        "--name",
        name,
        "--out",
        str(out),
        "--version",
        "1.0.0",
        "--max-batch-size",
        "4",
        "--batch-delay-us",
        "20000",
        "--cache-mb",
        "1",
        "--cache-dir",
        str(cache),
        *flags,
    )


# The policy applies to both architectures' images: arm64 (under qemu) and amd64 (native).
@pytest.fixture(scope="module", params=["rpi4", "industrial-pc"])
def bundles(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, edgepack_cache: Path
) -> dict[str, Any]:
    target = str(request.param)
    work = tmp_path_factory.mktemp(f"slim-{target}")
    model = alltypes_model(work / "alltypes.onnx")
    return {
        "target": target,
        "full": _build(model, target, "alltypesfull", work / "full", edgepack_cache, "--no-slim"),
        "slim": _build(model, target, "alltypes", work / "slim", edgepack_cache),
    }


@pytest.fixture(scope="module")
def agent_lib(tmp_path_factory: pytest.TempPathFactory, edgepack_cache: Path) -> Path:
    """The OTA agent as bundles ship it (edgepack_agent) for an import inside the image."""
    lib = tmp_path_factory.mktemp("agent-lib")
    shutil.copytree(
        REPO / "packager" / "agent",
        lib / "edgepack_agent",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    lib.chmod(0o755)
    return lib


def test_policy_entries_each_match_the_full_image_and_nothing_in_the_slim_one(
    bundles: dict[str, Any],
) -> None:
    full = image_files(Path(bundles["full"]["image"]["archive"]))
    slim = image_files(Path(bundles["slim"]["image"]["archive"]))
    base, wheels = policies()
    for policy in (base, wheels):
        for removal, glob, _ in policy.rules:
            matched = [p for p in full if policy.reason(p) is removal]
            assert matched, f"policy entry {glob!r} matches nothing in the full image: stale?"
        assert not [p for p in slim if policy.reason(p) is not None]
    # Nothing else went: the slim image is the full one less what the policy names.
    lost = {p for p in full if p not in slim and not any(x.reason(p) for x in (base, wheels))}
    assert lost == set(), sorted(lost)[:20]
    assert len(slim) < len(full)


def test_no_shared_object_left_needs_a_removed_library(
    bundles: dict[str, Any],
) -> None:
    full = image_files(Path(bundles["full"]["image"]["archive"]))
    slim = image_files(Path(bundles["slim"]["image"]["archive"]))
    # The check reads real ELF headers: the full image's runtime libraries have DT_NEEDED lists.
    pybind = [p for p in full if "onnxruntime_pybind11_state" in p and p.endswith(".so")]
    assert pybind and "libstdc++.so.6" in (full[pybind[0]] or [])
    # ...and would name a library that is gone: the check can fail.
    without = {p: v for p, v in slim.items() if "libstdc++" not in p}
    assert pybind[0] in unresolved_needed(without)
    assert unresolved_needed(full) == {}
    assert unresolved_needed(slim) == {}


def test_full_image_workload_touches_nothing_the_policy_removes(
    bundles: dict[str, Any],
    agent_lib: Path,
    arm64_emulation: None,
    tmp_path: Path,
) -> None:
    trace_dir = prepare_trace_dir(tmp_path / "trace")
    control_dir = prepare_trace_dir(tmp_path / "control")
    name = f"edgepack-slimtrace-full-{bundles['target']}"
    suite_container(name)
    env = trace_env()
    bundle = Path(bundles["full"]["bundle"])
    with running(
        bundle,
        name,
        FULL_PORT,
        extra_env=env,
        extra_volumes=(
            f"{trace_dir}:/trace",
            f"{control_dir}:/control",
            f"{agent_lib}:/agentlib:ro",
        ),
    ) as container:
        workload(container, "alltypesfull", env)
        # The OTA agent's modules import against the image's Python and standard library.
        agent_env = (*env[:1], ("PYTHONPATH", f"/trace:/agentlib:{SITE_PACKAGES}"), *env[2:])
        container.exec(
            "/usr/bin/python3.11",
            "-c",
            "import edgepack_agent.protocol, edgepack_agent.paths, edgepack_agent.store, "
            "edgepack_agent.engine, edgepack_agent.confinement",
            env=agent_env,
        )
        # Control: the same recorders, in the same container, do see removed files.
        control_env = (
            ("EDGEPACK_TRACE_DIR", "/control"),
            ("PYTHONPATH", "/control"),
            ("LD_DEBUG", "files"),
            ("LD_DEBUG_OUTPUT", "/control/ld"),
        )
        container.exec(
            "/usr/bin/python3.11", "-c", "import sqlite3, readline, unittest", env=control_env
        )
    trace = read_trace(trace_dir)
    control = read_trace(control_dir)

    # The recorders worked: the runtime, numpy and onnxruntime's binding are in the trace.
    assert trace.events > 500, trace.events
    site = normalize_path(SITE_PACKAGES)
    expected = {
        "usr/lib/python3.11/json/__init__.py",
        "opt/edgepack/runtime/edgepack_runtime/server.py",
        f"{site}/numpy/__pycache__/__init__.cpython-311.pyc",  # unchecked-hash bytecode
    }
    assert expected <= trace.paths, sorted(expected - trace.paths)
    assert any("onnxruntime_pybind11_state" in p for p in trace.paths)
    assert any("_multiarray_umath" in p for p in trace.paths)
    assert "opt/edgepack/runtime/edgepack_runtime/healthcheck.py" in trace.paths
    assert "edgepack_agent.engine" in trace.modules
    hits = removed_and_touched(control)
    assert any("sqlite3" in p for p in hits), sorted(control.paths)[:50]
    assert any("libreadline" in p for p in hits), sorted(hits)
    # The proof: nothing the policy removes was opened, listed or mapped by the workload.
    touched = removed_and_touched(trace)
    assert touched == {}, "\n".join(f"{p}  (removed by {g})" for p, g in sorted(touched.items()))


def test_slim_image_passes_the_same_workload(
    bundles: dict[str, Any], arm64_emulation: None, tmp_path: Path
) -> None:
    name = f"edgepack-slimtrace-slim-{bundles['target']}"
    suite_container(name)
    bundle = Path(bundles["slim"]["bundle"])
    with running(bundle, name, SLIM_PORT) as container:
        workload(container, "alltypes")
        # And what the policy removed is really gone from the running image.
        probe = container.exec(
            "/usr/bin/python3.11",
            "-c",
            "import importlib.util as u; print([m for m in ('sqlite3', 'unittest', 'readline') "
            "if u.find_spec(m)])",
        )
        assert probe.strip() == "[]", probe


def test_zstd_image_loads_and_answers_in_podman(
    onnx_dir: Path, edgepack_cache: Path, arm64_emulation: None, tmp_path: Path
) -> None:
    """--compression zstd: every layer edgepack writes is zstd, and a real engine runs it."""
    import json
    import subprocess
    import sys

    doc = build_json(
        str(onnx_dir / "mnist.onnx"),
        "--target",
        "rpi4",
        "--name",
        "mnistzstd",
        "--out",
        str(tmp_path / "zstd"),
        "--cache-dir",
        str(edgepack_cache),
        "--compression",
        "zstd",
    )
    raw = skopeo.inspect_oci_archive(doc["image"]["archive"], raw=True)
    kinds = {layer["mediaType"] for layer in raw["layers"]}
    assert kinds == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    port = 19033
    suite_container(f"edgepack-run-mnistzstd-{port}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "packager",
            "run",
            doc["bundle"],
            "--smoke-test",
            "--json",
            "--engine",
            "podman",
            "--port",
            str(port),
            "--timeout",
            "600",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    smoke = json.loads(proc.stdout)["smoke_test"]
    assert smoke["outputs"][0]["shape"] == [1, 10]
