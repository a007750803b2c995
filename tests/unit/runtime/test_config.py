from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.runtime.config import (
    CONFIG_ENV,
    ConfigError,
    RuntimeConfig,
    load_config,
    parse_config,
)
from packager.runtime.model import ModelError, load_model
from tests.integration.runtime_helpers import TESTDATA

BASE = {"model_name": "mnist", "model_path": "model.onnx"}
MNIST = TESTDATA / "onnx" / "mnist.onnx"


def test_defaults_and_relative_model_path(tmp_path: Path) -> None:
    config = parse_config(BASE, "runtime.json", tmp_path)
    assert config == RuntimeConfig(model_name="mnist", model_path=tmp_path / "model.onnx")
    assert (config.host, config.port, config.model_version) == ("0.0.0.0", 8080, "1")
    assert (config.intra_op_threads, config.inter_op_threads) == (0, 0)
    assert (config.max_batch_size, config.cache_bytes) == (0, 0)  # batching and cache off
    # onnxruntime's own defaults
    assert (config.cpu_mem_arena, config.mem_pattern) == (True, True)
    assert config.arena_extend_strategy == "kNextPowerOfTwo"


def test_memory_settings_are_read(tmp_path: Path) -> None:
    memory = {
        "cpu_mem_arena": False,
        "mem_pattern": False,
        "arena_extend_strategy": "kSameAsRequested",
    }
    config = parse_config({**BASE, **memory}, "c.json", tmp_path)
    assert (config.cpu_mem_arena, config.mem_pattern) == (False, False)
    assert config.arena_extend_strategy == "kSameAsRequested"


def _config_entry(options: Any, key: str) -> str | None:
    try:
        return str(options.get_session_config_entry(key))
    except RuntimeError:  # onnxruntime raises for a key that was never set
        return None


# The session's memory settings: the config fields load_model takes under the same names.
MEMORY_SETTINGS = ("cpu_mem_arena", "mem_pattern", "arena_extend_strategy")


@pytest.mark.parametrize(
    "memory",
    [
        {},
        {"cpu_mem_arena": False},
        {"mem_pattern": False},
        {"arena_extend_strategy": "kSameAsRequested"},
        {"cpu_mem_arena": False, "mem_pattern": False, "arena_extend_strategy": "kSameAsRequested"},
    ],
)
def test_a_session_starts_with_each_memory_setting(memory: dict[str, Any]) -> None:
    config = parse_config({**BASE, "model_path": str(MNIST), **memory}, "c.json", Path("."))
    settings = {key: getattr(config, key) for key in MEMORY_SETTINGS}
    model = load_model(config.model_path, config.model_name, config.model_version, **settings)
    options = model.session.get_session_options()
    assert options.enable_cpu_mem_arena is config.cpu_mem_arena
    assert options.enable_mem_pattern is config.mem_pattern
    env_arena = config.cpu_mem_arena and config.arena_extend_strategy == "kSameAsRequested"
    assert _config_entry(options, "session.use_env_allocators") == ("1" if env_arena else None)
    model.warm_up()
    (scores,) = model.run({"Input3": np.ones((1, 1, 28, 28), np.float32)}, ["Plus214_Output_0"])
    assert scores.shape == (1, 10)


def test_load_model_refuses_an_unknown_arena_strategy() -> None:
    with pytest.raises(ModelError, match="arena_extend_strategy must be one of kNextPowerOfTwo"):
        load_model(MNIST, "m", "1", arena_extend_strategy="kDouble")


def test_absolute_model_path_is_kept(tmp_path: Path) -> None:
    config = parse_config({**BASE, "model_path": "/opt/model.onnx"}, "c", tmp_path)
    assert config.model_path == Path("/opt/model.onnx")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"prot": 80},
            "c.json: unknown key 'prot'; known keys: arena_extend_strategy, batch_axis, "
            "cache_bytes, ",
        ),
        ({"port": True}, "c.json: port must be an integer (got true)"),
        ({"port": 70000}, "c.json: port must be between 0 and 65535 (got 70000)"),
        ({"intra_op_threads": -1}, "intra_op_threads must be >= 0 (got -1)"),
        ({"model_name": "a/b"}, "model_name must not contain '/'"),
        ({"model_name": ""}, "model_name must be a non-empty string"),
        ({"log_level": "loud"}, "log_level must be one of debug, info, warning, error"),
        ({"drain_timeout_s": 0}, "drain_timeout_s must be a positive number"),
        ({"cpu_mem_arena": 1}, "cpu_mem_arena must be true or false (got 1)"),
        ({"mem_pattern": "false"}, 'mem_pattern must be true or false (got "false")'),
        (
            {"arena_extend_strategy": "SameAsRequested"},
            "arena_extend_strategy must be one of kNextPowerOfTwo, kSameAsRequested",
        ),
        ({"arena_extend_strategy": None}, "arena_extend_strategy must be one of"),
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
