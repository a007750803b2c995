from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.runtime.config import (
    CONFIG_ENV,
    ConfigError,
    RuntimeConfig,
    load_config,
    parse_config,
)

BASE = {"model_name": "mnist", "model_path": "model.onnx"}


def test_defaults_and_relative_model_path(tmp_path: Path) -> None:
    config = parse_config(BASE, "runtime.json", tmp_path)
    assert config == RuntimeConfig(model_name="mnist", model_path=tmp_path / "model.onnx")
    assert (config.host, config.port, config.model_version) == ("0.0.0.0", 8080, "1")
    assert (config.intra_op_threads, config.inter_op_threads) == (0, 0)
    assert (config.max_batch_size, config.cache_bytes) == (0, 0)  # batching and cache off


def test_absolute_model_path_is_kept(tmp_path: Path) -> None:
    config = parse_config({**BASE, "model_path": "/opt/model.onnx"}, "c", tmp_path)
    assert config.model_path == Path("/opt/model.onnx")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prot": 80}, "c.json: unknown key 'prot'; known keys: cache_bytes, "),
        ({"port": True}, "c.json: port must be an integer (got true)"),
        ({"port": 70000}, "c.json: port must be between 0 and 65535 (got 70000)"),
        ({"intra_op_threads": -1}, "intra_op_threads must be >= 0 (got -1)"),
        ({"model_name": "a/b"}, "model_name must not contain '/'"),
        ({"model_name": ""}, "model_name must be a non-empty string"),
        ({"log_level": "loud"}, "log_level must be one of debug, info, warning, error"),
        ({"drain_timeout_s": 0}, "drain_timeout_s must be a positive number"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, **change}, "c.json", Path("."))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"c\.json: missing required key 'model_path'"):
        parse_config({"model_name": "m"}, "c.json", Path("."))


def test_not_an_object() -> None:
    with pytest.raises(ConfigError, match="must hold a JSON object, not list"):
        parse_config([], "c.json", Path("."))


def test_load_from_env_and_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps({**BASE, "port": 9000}))
    assert load_config(path).port == 9000
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert load_config(None).model_path == tmp_path / "model.onnx"
    monkeypatch.delenv(CONFIG_ENV)
    with pytest.raises(ConfigError, match=f"pass --config PATH or set {CONFIG_ENV}"):
        load_config(None)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read the config file"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "model_name": "m",\n}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON at line 3 column 1"):
        load_config(bad)
