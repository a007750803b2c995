"""packager.backends.jetson.engine_remote: the remote builder's argv and verify's plan check."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from packager.backends.engine_on import EngineBuildOn
from packager.backends.jetson import engine_remote
from packager.backends.jetson.engine_remote import (
    build_argv,
    engine_paths,
    expected_key,
    prebuilt_problems,
)
from packager.bundle.manifest import BundleMeta, Manifest, write_manifest
from packager.errors import ToolFailedError, UnsupportedError, VerifyError
from packager.runtime.engine_key import EngineKey
from packager.tools import ssh
from packager.tools.ssh import Finished, SshHost, SshOptions, remote_command

KEY = EngineKey(model_sha256="ab" * 32, tensorrt="8.6.2", sm=87, precision="fp16",
                dla_core=None, workspace_mib=2048)


def _bundle(root: Path, engine_key: object = KEY.as_dict()) -> Manifest:
    root.mkdir(exist_ok=True)
    meta = BundleMeta.model_validate({
        "name": "m", "version": "1.0.0",
        "target": {"name": "jetson-orin-nano", "device_class": "jetson"},
        "model": {"source": "m.onnx", "format": "onnx", "digest": "sha256:" + "ab" * 32,
                  "size_bytes": 1, "inputs": [], "outputs": []},
        "fit": {"target": "jetson-orin-nano", "fits": True, "resources": []},
        "device": {"engine_key": engine_key},
    })  # fmt: skip
    return write_manifest(root, meta)


def _with_plan(root: Path, key_text: str) -> Manifest:
    plan_rel, key_rel = engine_paths(KEY)
    (root / "engine").mkdir(parents=True)
    (root / plan_rel).write_bytes(b"plan")
    (root / key_rel).write_text(key_text)
    return _bundle(root)


def test_engine_files_follow_the_shared_layout() -> None:
    assert engine_paths(KEY) == ("engine/8.6.2-sm87-fp16.plan", "engine/8.6.2-sm87-fp16.key.json")


def test_a_bundle_without_an_engine_key_has_nothing_to_prebuild(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path / "b", engine_key=None)
    with pytest.raises(UnsupportedError, match="builds no TensorRT engine"):
        expected_key(tmp_path / "b", manifest)
    bad = _bundle(tmp_path / "c", engine_key={**KEY.as_dict(), "sm": "87"})
    with pytest.raises(VerifyError, match=r"device\.engine_key: sm"):
        expected_key(tmp_path / "c", bad)


def test_a_matching_prebuilt_plan_passes(tmp_path: Path) -> None:
    manifest = _with_plan(tmp_path / "b", KEY.to_json())
    assert prebuilt_problems(tmp_path / "b", manifest, KEY) == []


def test_a_key_file_of_another_key_is_named_with_expected_and_found(tmp_path: Path) -> None:
    other = EngineKey(**{**KEY.as_dict(), "sm": 72})
    manifest = _with_plan(tmp_path / "b", other.to_json())
    problems = prebuilt_problems(tmp_path / "b", manifest, KEY)
    assert problems == ["engine/8.6.2-sm87-fp16.key.json: key differs from manifest.json's "
                        "device.engine_key: sm: expected 87, found 72"]


def test_a_plan_without_key_an_unlisted_file_and_a_foreign_plan_are_refused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "b"
    manifest = _with_plan(root, "{not json")
    assert any("engine/8.6.2-sm87-fp16.key.json: engine key: not JSON" in p
               for p in prebuilt_problems(root, manifest, KEY))
    (root / engine_paths(KEY)[1]).unlink()
    (root / "engine" / "8.5.2-sm87-fp16.plan").write_bytes(b"x")
    problems = prebuilt_problems(root, manifest, KEY)
    assert "engine/8.5.2-sm87-fp16.plan: not this bundle's plan" in problems[0]
    assert any("without engine/8.6.2-sm87-fp16.key.json" in p for p in problems)


def test_the_remote_build_command_is_the_on_device_builder_with_the_bundle_key(
    tmp_path: Path,
) -> None:
    job = EngineBuildOn(host=SshHost("h"), ssh=SshOptions(), timeout_s=600, progress_s=30,
                        trtexec=None, lib_dirs=("/opt/lib",), python="python3",
                        device_root="/", work=tmp_path, on_line=print)
    argv = build_argv(job, KEY, "/tmp/edgepack-engine.abc", timing_cache=True)
    assert argv[5:9] == ["timeout", "-k", "10", "630"]
    assert argv[9:12] == ["python3", "-m", "edgepack_runtime.engine_build"]
    flags = dict(zip(argv[12::2], argv[13::2], strict=False))
    assert flags == {
        "--model": "/tmp/edgepack-engine.abc/model.onnx", "--model-sha256": KEY.model_sha256,
        "--tensorrt": "8.6.2", "--sm": "87", "--precision": "fp16", "--dla-core": "none",
        "--workspace-mib": "2048", "--engines-dir": "/tmp/edgepack-engine.abc/engines",
        "--trtexec": "/usr/src/tensorrt/bin/trtexec", "--timeout-s": "600",
        "--progress-s": "30", "--timing-cache-seed": "/tmp/edgepack-engine.abc/timing.cache",
        "--lib-dir": "/opt/lib",
    }  # fmt: skip
    assert shlex.split(remote_command(argv)) == argv


def _stat_answering(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: list[str]
) -> EngineBuildOn:
    """A STAND-IN device (no board here): ssh.run hands ``answer`` to ``on_line`` as the device's
    ``stat -c %s`` would, then exits 0."""

    def run(host: object, options: object, argv: list[str], **kwargs: Any) -> Finished:
        assert argv[:3] == ["stat", "-c", "%s"]
        for line in answer:
            kwargs["on_line"](line)
        return Finished(0, tuple(answer))

    monkeypatch.setattr(ssh, "run", run)
    return EngineBuildOn(host=SshHost("h"), ssh=SshOptions(), timeout_s=600, progress_s=30,
                         trtexec=None, lib_dirs=(), python="python3", device_root="/",
                         work=tmp_path, on_line=print)


def test_remote_sizes_are_read_from_ascii_digits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    job = _stat_answering(monkeypatch, tmp_path, ["1234\n", "56\n"])
    assert engine_remote._remote_sizes(job, ("a.plan", "a.key.json")) == (1234, 56)


@pytest.mark.parametrize("size", ["\u00b2", "\u0661\u0662", "+12", "1_2", "9" * 5000])
def test_a_size_not_in_ascii_digits_is_a_tool_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: str
) -> None:
    """'²' passes str.isdigit() and int() refused it (an internal error); '١٢' int() read as 12;
    int() refuses 5000 digits."""
    job = _stat_answering(monkeypatch, tmp_path, [size, "56"])
    with pytest.raises(ToolFailedError, match="left no plan and key file"):
        engine_remote._remote_sizes(job, ("a.plan", "a.key.json"))
