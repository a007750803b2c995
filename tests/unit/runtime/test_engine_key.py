"""The engine key: its validation, canonical JSON, plan layout and plan check (jetson.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from packager.runtime.engine_key import (
    EngineKey,
    EngineKeyError,
    check_plan,
    read_key,
    sha256_file,
    sm_from_compute_capability,
    tensorrt_release,
)

SHA = "ab" * 32


def key(**changes: object) -> EngineKey:
    base = EngineKey(
        model_sha256=SHA,
        tensorrt="8.6.2",
        sm=87,
        precision="fp16",
        dla_core=None,
        workspace_mib=1024,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_canonical_json_is_sorted_compact_and_round_trips() -> None:
    text = key().to_json()
    assert text == (
        '{"dla_core":null,"model_sha256":"' + SHA + '","precision":"fp16","sm":87,'
        '"tensorrt":"8.6.2","workspace_mib":1024}'
    )
    assert EngineKey.from_json(text) == key()
    assert EngineKey.from_json(json.dumps(json.loads(text), indent=2)) == key()


def test_plan_key_and_timing_cache_paths_follow_the_shared_layout() -> None:
    assert key().plan_path() == Path(f"/var/lib/edgepack/engines/{SHA}/8.6.2-sm87-fp16.plan")
    assert key().key_path("/e") == Path(f"/e/{SHA}/8.6.2-sm87-fp16.key.json")
    assert key(precision="int8", dla_core=1).stem == "8.6.2-sm87-int8-dla1"
    assert key().timing_cache_path("/e") == Path("/e/timing-8.6.2-sm87.cache")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model_sha256": "AB" * 32}, "model_sha256"),
        ({"model_sha256": "ab" * 32 + "\n"}, "model_sha256"),
        ({"tensorrt": "8.6"}, "tensorrt"),
        ({"tensorrt": "8.6.2\n"}, "tensorrt"),
        ({"tensorrt": "../8.6.2"}, "tensorrt"),
        ({"sm": "87"}, "sm"),
        ({"sm": True}, "sm"),
        ({"sm": 5}, "sm"),
        ({"precision": "bf16"}, "precision"),
        ({"dla_core": -1}, "dla_core"),
        ({"dla_core": 0, "precision": "fp32"}, "dla_core"),
        ({"workspace_mib": 0}, "workspace_mib"),
        ({"workspace_mib": 1.5}, "workspace_mib"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(EngineKeyError, match=f"^{field}: "):
        key(**changes)


def test_from_dict_refuses_unknown_and_missing_fields() -> None:
    data = key().as_dict()
    with pytest.raises(EngineKeyError, match="unknown extra"):
        EngineKey.from_dict({**data, "extra": 1})
    del data["sm"]
    with pytest.raises(EngineKeyError, match="missing sm"):
        EngineKey.from_dict(data)
    with pytest.raises(EngineKeyError, match="not JSON"):
        EngineKey.from_json("{")


def test_compute_capability_and_tensorrt_release_forms() -> None:
    assert sm_from_compute_capability("8.7") == 87
    assert sm_from_compute_capability("5.3") == 53
    with pytest.raises(EngineKeyError):
        sm_from_compute_capability("87")
    assert tensorrt_release("8.6.2.3") == "8.6.2"
    assert tensorrt_release("10.3") == "10.3.0"
    with pytest.raises(EngineKeyError):
        tensorrt_release("8.6.x")


def test_differences_name_each_field() -> None:
    assert key().differences(key(workspace_mib=2048, sm=72)) == [
        "sm: expected 87, found 72",
        "workspace_mib: expected 1024, found 2048",
    ]


def _write(root: Path, expected: EngineKey, *, plan: bytes | None, key_text: str | None) -> None:
    expected.plan_path(root).parent.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        expected.plan_path(root).write_bytes(plan)
    if key_text is not None:
        expected.key_path(root).write_text(key_text)


def test_check_plan_states(tmp_path: Path) -> None:
    expected = key()
    assert check_plan(expected, tmp_path).state == "absent"
    _write(tmp_path, expected, plan=b"PLAN", key_text=None)
    status = check_plan(expected, tmp_path)
    assert (status.state, status.reason) == (
        "invalid",
        "8.6.2-sm87-fp16.plan without its key file (an interrupted build)",
    )
    _write(tmp_path, expected, plan=None, key_text=key(workspace_mib=2048).to_json())
    status = check_plan(expected, tmp_path)
    assert status.state == "invalid"
    assert status.reason == "key differs: workspace_mib: expected 1024, found 2048"
    _write(tmp_path, expected, plan=None, key_text="x" * 5000)
    assert "larger than 4096 bytes" in check_plan(expected, tmp_path).reason
    _write(tmp_path, expected, plan=None, key_text=expected.to_json())
    assert check_plan(expected, tmp_path).ready
    expected.plan_path(tmp_path).unlink()
    assert check_plan(expected, tmp_path).reason == "8.6.2-sm87-fp16.key.json without its plan"


def test_a_symlinked_plan_is_never_ready(tmp_path: Path) -> None:
    expected = key()
    _write(tmp_path, expected, plan=None, key_text=expected.to_json())
    (tmp_path / "elsewhere.plan").write_bytes(b"PLAN")
    expected.plan_path(tmp_path).symlink_to(tmp_path / "elsewhere.plan")
    assert not check_plan(expected, tmp_path).ready


def test_a_plan_under_a_symlinked_model_directory_is_never_ready(tmp_path: Path) -> None:
    """Before: a real plan and key file reached through a linked <model_sha256> directory
    were "ready" (the builder now refuses to write through one, so it is not a plan it made)."""
    expected = key()
    outside = tmp_path / "outside"
    _write(outside, expected, plan=b"PLAN", key_text=expected.to_json())
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / SHA).symlink_to(outside / SHA)
    assert check_plan(expected, outside).ready
    status = check_plan(expected, engines)
    assert status.state == "invalid"
    assert status.reason == f"{SHA} is a symlink, not the builder's directory"


def test_read_key_and_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text(key().to_json())
    assert read_key(path) == key()
    with pytest.raises(EngineKeyError, match=r"missing\.json: No such file"):
        read_key(tmp_path / "missing.json")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"abc")
    assert sha256_file(model) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
