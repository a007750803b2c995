"""The Jetson ``device`` section of manifest.json, read back strictly (packager.backends.jetson.
manifest) by verify, ``engine build`` and OTA publish: a hand-edited section is one VerifyError
(exit 8) naming ``device.FIELD``, never a KeyError or a silently accepted value. The manifests
here are written over a tree made by the test (no build)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from packager.backends.jetson.backend import (
    JetsonBackend,
    check_engine_key,
    release_requires,
    section,
)
from packager.bundle.manifest import ImageSection, Manifest, read_manifest, write_manifest
from packager.errors import VerifyError
from tests.unit.bundle.meta import sample_meta

SHA = "ab" * 32
KEY = {"model_sha256": SHA, "tensorrt": "8.6.2", "sm": 87, "precision": "fp16",
       "dla_core": None, "workspace_mib": 2048}
DEVICE: dict[str, Any] = {
    "serving": "tensorrt",
    "fallback_reason": None,
    "engine_key": KEY,
    "plan": f"/var/lib/edgepack/engines/{SHA}/8.6.2-sm87-fp16.plan",
    "timing_cache": None,
    "l4t": {"release": "r36.3.0", "min": "r36.0.0", "below": "r36.4.0"},
    "jetpack": "6.0",
    "tensorrt": "8.6.2",
    "cuda": "12.2",
    "sm": 87,
    "generation": "r36",
}


def _bundle(root: Path, device: object) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.onnx").write_bytes(b"stand-in model bytes")
    meta = sample_meta(
        target={"name": "jetson-orin-nano", "device_class": "jetson"},
        model={"source": "model.onnx", "format": "onnx", "digest": f"sha256:{SHA}",
               "size_bytes": 1, "inputs": [], "outputs": []},
        device=device,
    )
    write_manifest(root, meta)
    return read_manifest(root)


def test_the_section_the_backend_writes_is_read_back(tmp_path: Path) -> None:
    manifest = _bundle(tmp_path / "b", DEVICE)
    assert section(tmp_path / "b", manifest).engine_key is not None
    assert check_engine_key(tmp_path / "b", manifest) == []
    assert release_requires(tmp_path / "b", manifest) == {
        "l4t_min": "r36.0.0", "l4t_below": "r36.4.0", "sm": "87"}


def test_the_fallback_section_has_no_key_and_a_reason(tmp_path: Path) -> None:
    device = {**DEVICE, "serving": "onnxruntime-cpu", "fallback_reason": "CPython 3.6",
              "engine_key": None, "plan": None, "tensorrt": "8.2.1", "sm": 53,
              "l4t": {"release": "r32.7.1", "min": "r32.7.0", "below": "r33.0.0"},
              "generation": "r32"}
    manifest = _bundle(tmp_path / "b", device)
    assert check_engine_key(tmp_path / "b", manifest) == []


def _set(path: tuple[str, ...], value: object) -> dict[str, Any]:
    device = copy.deepcopy(DEVICE)
    where = device
    for part in path[:-1]:
        where = where[part]
    if value is _DELETE:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return device


_DELETE = object()


@pytest.mark.parametrize(
    ("device", "field"),
    [
        (None, "device"),
        ({}, "device.serving"),
        ({**DEVICE, "zzz": 1}, "device.zzz"),
        (_set(("engine_key",), {}), "device.engine_key.model_sha256"),
        (_set(("engine_key", "sm"), _DELETE), "device.engine_key.sm"),
        (_set(("engine_key", "zzz"), 1), "device.engine_key.zzz"),
        (_set(("engine_key", "tensorrt"), "../../../etc/passwd"), "device.engine_key.tensorrt"),
        (_set(("engine_key", "model_sha256"), "../../etc"), "device.engine_key.model_sha256"),
        (_set(("engine_key", "sm"), True), "device.engine_key.sm"),
        (_set(("engine_key", "sm"), 10**30), "device.engine_key.sm"),
        (_set(("engine_key", "workspace_mib"), 1.5), "device.engine_key.workspace_mib"),
        (_set(("engine_key", "precision"), "fp16\n"), "device.engine_key.precision"),
        (_set(("engine_key", "dla_core"), 0) | {"engine_key": {**KEY, "dla_core": 0,
                                                               "precision": "fp32"}},
         "device.engine_key"),
        (_set(("l4t", "min"), "r36.0.0\n$(id)"), "device.l4t.min"),
        (_set(("l4t",), _DELETE), "device.l4t"),
        (_set(("l4t", "below"), "r36.3.0"), "device.l4t"),
        (_set(("sm",), "87; rm -rf /"), "device.sm"),
        (_set(("sm",), 72), "device"),  # the key's sm is 87
        (_set(("serving",), 12), "device.serving"),
        (_set(("plan",), "/etc/passwd"), "device"),
        (_set(("plan",), None), "device"),
        (_set(("fallback_reason",), "because"), "device"),
        (_set(("generation",), "r35"), "device"),
        (_set(("timing_cache",), "../../x"), "device.timing_cache"),
    ],
)
def test_a_hand_edited_section_is_one_verify_error_naming_the_field(
    tmp_path: Path, device: object, field: str
) -> None:
    root = tmp_path / "b"
    manifest = _bundle(root, device)
    for read in (section, check_engine_key, release_requires):
        with pytest.raises(VerifyError) as err:
            read(root, manifest)
        line = err.value.one_line()
        assert f"manifest.json: {field}:" in line, line
        assert "\n" not in line


def test_a_prebuilt_key_file_that_differs_is_named(tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "8.6.2-sm87-fp16.key.json").write_text(
        json.dumps({**KEY, "workspace_mib": 1}))
    (root / "engine" / "8.6.2-sm87-fp16.plan").write_bytes(b"plan")
    manifest = _bundle(root, DEVICE)
    # One line, in the one checker's words (before: check_engine_key and prebuilt_problems each
    # compared the key file, and verify printed the difference twice).
    assert check_engine_key(root, manifest) == [
        "engine/8.6.2-sm87-fp16.key.json: key differs from manifest.json's device.engine_key: "
        "workspace_mib: expected 2048, found 1"]


def test_an_oversized_prebuilt_key_file_is_a_verify_problem_naming_it(tmp_path: Path) -> None:
    """Read bounded, as the device reads it; one line among verify's problems (exit 8), with
    the plan it lacks."""
    root = tmp_path / "b"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "8.6.2-sm87-fp16.key.json").write_text("[" * 100000 + "]" * 100000)
    manifest = _bundle(root, DEVICE)
    problems = check_engine_key(root, manifest)
    assert [p.partition(": ")[0] for p in problems] == ["engine/8.6.2-sm87-fp16.key.json"] * 2
    assert "without engine/8.6.2-sm87-fp16.plan" in problems[0]
    assert "larger than 4096 bytes" in problems[1]


def test_every_prebuilt_plan_rule_is_checked_through_check_engine_key(tmp_path: Path) -> None:
    """check_engine_key calls the one prebuilt-plan checker (engine_remote.prebuilt_problems):
    before, it had its own narrower copy that missed a foreign plan, a sha256 that is not the
    listed one, and a stray plan in a bundle that builds no engine."""
    root = tmp_path / "b"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "8.6.2-sm87-fp16.key.json").write_text(json.dumps(KEY))
    (root / "engine" / "8.6.2-sm87-fp16.plan").write_bytes(b"plan")
    (root / "engine" / "8.5.2-sm87-fp16.plan").write_bytes(b"another plan")
    manifest = _bundle(root, DEVICE)
    (root / "engine" / "8.6.2-sm87-fp16.plan").write_bytes(b"plan, changed after listing")
    problems = check_engine_key(root, manifest)
    assert problems[0].startswith("engine/8.5.2-sm87-fp16.plan: not this bundle's plan")
    assert problems[1].startswith("engine/8.6.2-sm87-fp16.plan: sha256 ")
    assert len(problems) == 2
    fallback = {**DEVICE, "serving": "onnxruntime-cpu", "fallback_reason": "CPython 3.6",
                "engine_key": None, "plan": None, "tensorrt": "8.2.1", "sm": 53,
                "l4t": {"release": "r32.7.1", "min": "r32.7.0", "below": "r33.0.0"},
                "generation": "r32"}
    manifest = _bundle(root, fallback)
    assert check_engine_key(root, manifest) == [
        f"{root / 'manifest.json'}: device.engine_key: none (this bundle builds no TensorRT "
        "engine), but engine/8.5.2-sm87-fp16.plan is there"]


def test_a_jetson_bundle_without_an_image_does_not_verify(tmp_path: Path) -> None:
    """Before: the Linux image check passes a manifest with no image section, so a Jetson
    bundle stripped of image.tar (and its manifest entries) verified OK."""
    root = tmp_path / "b"
    manifest = _bundle(root, DEVICE)
    assert manifest.image is None
    with pytest.raises(VerifyError) as err:
        JetsonBackend().verify_bundle(root, manifest)
    assert err.value.one_line().startswith(f"{root / 'manifest.json'}: image: is required")


def test_a_jetson_bundle_relabelled_as_a_container_bundle_does_not_verify(tmp_path: Path) -> None:
    """Review finding: with target.device_class changed to linux-container, verify used to pass
    it (the Linux checks ignore the device section) and OTA would publish it without the L4T/SM
    requirements. The Linux backend refuses a device section it does not own."""
    from packager.backends.linux.backend import LinuxContainerBackend

    root = tmp_path / "b"
    manifest = _bundle(root, DEVICE)
    image = ImageSection.model_validate({
        "archive": "image.tar", "digest": f"sha256:{SHA}", "config_digest": f"sha256:{SHA}",
        "ref": "localhost/model:1.0.0", "platform": "linux/arm64/v8", "size_bytes": 1,
        "port": 8080, "layers": [],
    })
    target = manifest.target.model_copy(update={"device_class": "linux-container"})
    relabelled = manifest.model_copy(update={"image": image, "target": target})
    with pytest.raises(VerifyError) as err:
        LinuxContainerBackend().verify_bundle(root, relabelled)
    assert "manifest.json: device: a linux-container bundle has no device section" in (
        err.value.one_line())
