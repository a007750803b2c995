"""The runtime's configuration: one JSON object, validated strictly before anything starts.

The build writes this file from the target and the build options; a typo in a key must stop the
runtime with one line rather than be silently ignored on a device nobody is watching.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .engine_key import ENGINES_DIR, EngineKey, EngineKeyError

CONFIG_ENV = "EDGEPACK_RUNTIME_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")
ARENA_EXTEND_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")
# What serves when the engine cannot: onnxruntime on the CPU, or nothing (the runtime exits 3).
ENGINE_FALLBACKS = ("onnxruntime-cpu", "none")


class ConfigError(Exception):
    """The configuration file is missing, malformed or has a bad value (one-line message)."""


@dataclass(frozen=True)
class EngineConfig:
    """runtime.json's "engine" section: serve a TensorRT plan built for this device.

    The plan is ``engines_dir/<model_sha256>/<tensorrt>-sm<NN>-<precision>[-dla<N>].plan`` with
    its key next to it; when it is absent or invalid, ``fallback`` serves (or nothing: exit 3).
    """

    key: EngineKey
    # Where the first-boot unit writes plans (engine_key: one definition of the layout).
    engines_dir: Path = Path(ENGINES_DIR)
    fallback: str = "onnxruntime-cpu"


@dataclass(frozen=True)
class RuntimeConfig:
    """runtime.json, validated (:func:`parse_config`): what the runtime serves and its limits.

    A relative ``model_path`` in the file is taken from the config's directory; ``*_s`` fields
    are seconds, ``max_queue_delay_us`` microseconds, ``*_bytes`` bytes.
    """

    model_name: str
    model_path: Path
    model_version: str = "1"
    host: str = "0.0.0.0"
    # 0 asks the kernel for a free port (tests); the chosen port is logged in the "listening" event.
    port: int = 8080
    # 0 leaves the choice to onnxruntime (one intra-op thread per core).
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    # onnxruntime memory: the CPU arena keeps freed buffers for reuse (faster, but the process
    # keeps its peak); mem_pattern pre-plans buffers for fixed shapes; kSameAsRequested grows the
    # arena by exactly what is asked instead of doubling (less RAM held on small devices).
    cpu_mem_arena: bool = True
    mem_pattern: bool = True
    arena_extend_strategy: str = "kNextPowerOfTwo"
    log_level: str = "info"
    # The target's cap on a request body. The runtime's own limit is the model's largest valid
    # request (see protocol.largest_request_bytes) when that is smaller; larger bodies are
    # refused with 413 before they are read, so one client cannot exhaust RAM.
    max_request_bytes: int = 64 * 1024 * 1024
    # An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: float = 30.0
    # The whole request head (line + headers) must arrive within this long of its first byte;
    # a body gets this long plus its size at 64 KiB/s (nginx's client_header_timeout and
    # client_body_timeout bound the same slow clients).
    header_timeout_s: float = 10.0
    # Open connections at most (further lowered to fit the process's descriptor limit); over it
    # an idle or stalled connection is closed for the newcomer, else the newcomer gets 503.
    max_connections: int = 256
    # On SIGTERM, in-flight requests get this long to finish before the process exits anyway.
    drain_timeout_s: float = 20.0
    # Dynamic batching: off unless max_batch_size > 1 and every input and output has a dynamic
    # first dimension. Requests wait at most max_queue_delay_us for others to join their batch.
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    # Requests are concatenated along the first axis only when it is a batch axis: named so in
    # the model (model.BATCH_DIM_NAMES) or declared here (0, the only axis the batcher merges
    # along; the build writes it for `--batch-axis 0`). Otherwise max_batch_size > 1 is refused
    # (logged once) and requests run one by one: a time-major model's first axis is time.
    batch_axis: int | None = None
    # Requests waiting for the model beyond this are refused with 503 + Retry-After.
    max_queue_size: int = 256
    # LRU cache of responses, bounded in bytes; 0 turns it off.
    cache_bytes: int = 0
    # A TensorRT engine to serve instead of the ONNX model on onnxruntime (Jetson bundles).
    engine: EngineConfig | None = None


def _nonempty_str(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _model_name(value: Any) -> str | None:
    problem = _nonempty_str(value)
    if problem is None and any(c in value for c in "/?#% "):
        return "must not contain '/', '?', '#', '%' or spaces (it is part of the URL)"
    return problem


def _int_range(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        # bool is an int subclass; `"port": true` is a mistake, not port 1.
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
        if value < low or (high is not None and value > high):
            return f"must be between {low} and {high}" if high is not None else f"must be >= {low}"
        return None

    return check


def _positive_number(value: Any) -> str | None:
    # A tuple, not int | float: the runtime runs on CPython 3.8 (JetPack 5).
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return "must be a positive number"
    return None


def _bool(value: Any) -> str | None:
    if not isinstance(value, bool):
        return "must be true or false"
    return None


def _arena_extend_strategy(value: Any) -> str | None:
    if value not in ARENA_EXTEND_STRATEGIES:
        return f"must be one of {', '.join(ARENA_EXTEND_STRATEGIES)}"
    return None


def _batch_axis(value: Any) -> str | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value != 0):
        return "must be 0 or null (requests are only ever merged along the first axis)"
    return None


def _log_level(value: Any) -> str | None:
    if value not in LOG_LEVELS:
        return f"must be one of {', '.join(LOG_LEVELS)}"
    return None


def _fallback(value: Any) -> str | None:
    if value not in ENGINE_FALLBACKS:
        return f"must be one of {', '.join(ENGINE_FALLBACKS)}"
    return None


def _absolute_dir(value: Any) -> str | None:
    # The plans' directory is the device's, never the bundle's: absolute, no ".." component.
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        return "must be an absolute path"
    if ".." in PurePosixPath(value).parts:
        return "must not contain '..'"
    return None


_ENGINE_CHECKS: Mapping[str, Callable[[Any], str | None]] = {
    "engines_dir": _absolute_dir,
    "key": lambda value: None,  # checked by engine_key.EngineKey in _engine
    "fallback": _fallback,
}


def _check_keys(
    document: dict[str, Any],
    source: str,
    section: str,
    checks: Mapping[str, Callable[[Any], str | None]],
    required: tuple[str, ...],
) -> None:
    """Check a JSON object's keys and values against ``checks``: the top level (``section``
    empty: ``SOURCE: key ...``) or one section (``SOURCE: section: ...``, values named
    ``SOURCE: section.key``). Raises :class:`ConfigError` naming the first problem."""
    where = f"{source}: {section}" if section else source
    dotted = f"{section}." if section else ""
    unknown = sorted(set(document) - set(checks))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(checks))}"
        )
    for key in required:
        if key not in document:
            raise ConfigError(f"{where}: missing required key {key!r}")
    for key, value in document.items():
        problem = checks[key](value)
        if problem is not None:
            raise ConfigError(f"{source}: {dotted}{key} {problem} (got {json.dumps(value)[:120]})")


def _engine(document: Any, source: str) -> EngineConfig:
    if not isinstance(document, dict):
        raise ConfigError(
            f"{source}: engine must be a JSON object (got {json.dumps(document)[:80]})"
        )
    _check_keys(document, source, "engine", _ENGINE_CHECKS, ("key",))
    try:
        key = EngineKey.from_dict(document["key"])
    except EngineKeyError as exc:
        raise ConfigError(f"{source}: engine.key: {exc}") from None
    return EngineConfig(
        key=key,
        engines_dir=Path(document.get("engines_dir", ENGINES_DIR)),
        fallback=document.get("fallback", "onnxruntime-cpu"),
    )


_CHECKS: Mapping[str, Callable[[Any], str | None]] = {
    "model_name": _model_name,
    "model_path": _nonempty_str,
    "model_version": _model_name,
    "host": _nonempty_str,
    "port": _int_range(0, 65535),
    "intra_op_threads": _int_range(0),
    "inter_op_threads": _int_range(0),
    "cpu_mem_arena": _bool,
    "mem_pattern": _bool,
    "arena_extend_strategy": _arena_extend_strategy,
    "log_level": _log_level,
    "max_request_bytes": _int_range(1),
    "keepalive_timeout_s": _positive_number,
    "header_timeout_s": _positive_number,
    "max_connections": _int_range(1),
    "drain_timeout_s": _positive_number,
    "max_batch_size": _int_range(0),
    "max_queue_delay_us": _int_range(0, 10_000_000),
    "batch_axis": _batch_axis,
    "max_queue_size": _int_range(1),
    "cache_bytes": _int_range(0),
    "engine": lambda value: None,  # a section: checked by _engine
}
_REQUIRED = ("model_name", "model_path")


def parse_config(document: Any, source: str, base_dir: Path) -> RuntimeConfig:
    """Validate a decoded JSON document; relative model paths are relative to ``base_dir``."""
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: must hold a JSON object, not {type(document).__name__}")
    _check_keys(document, source, "", _CHECKS, _REQUIRED)
    values = dict(document)
    values["model_path"] = base_dir / Path(document["model_path"])
    if "engine" in document:
        values["engine"] = _engine(document["engine"], source)
    return RuntimeConfig(**values)


def load_config(path: str | os.PathLike[str] | None) -> RuntimeConfig:
    """Read the config from ``path``, or from the file named by $EDGEPACK_RUNTIME_CONFIG."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no configuration: pass --config PATH or set {CONFIG_ENV}")
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: the config file is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{file}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return parse_config(document, str(file), file.parent)
