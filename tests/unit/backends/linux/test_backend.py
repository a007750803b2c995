"""The Linux container backend's plan is pure: check it without building anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packager.backends.base import BuildRequest
from packager.backends.linux.backend import LinuxContainerBackend, parse_base, runtime_requirements
from packager.backends.linux.fit import linux_fit
from packager.errors import InputError, UsageError
from packager.image.spec import ArchiveBase, DebianBase, ImageSpec
from packager.models import inspect_model
from packager.targets import resolve_target


def _plan(model: Path, target: str, **kwargs: object) -> ImageSpec:
    request = BuildRequest(model=model, target=target, **kwargs)  # type: ignore[arg-type]
    info = inspect_model(model)
    loaded = resolve_target(target)
    plan = LinuxContainerBackend().plan(request, info, loaded, linux_fit(info, loaded))
    assert isinstance(plan.payload, ImageSpec)
    return plan.payload


def test_rpi4_plan_is_arm64_debian_with_runtime_and_model_layers(onnx_dir: Path) -> None:
    spec = _plan(onnx_dir / "mnist.onnx", "rpi4", version="1.2.3")
    assert (spec.arch, spec.variant) == ("arm64", "v8")
    assert isinstance(spec.base, DebianBase) and spec.base.suite == "bookworm"
    assert "python3.11-minimal" in spec.base.packages
    assert [layer.name for layer in spec.layers] == ["runtime", "model"]
    assert spec.ref_name == "edgepack/mnist:1.2.3"
    assert spec.wheels is not None and spec.wheels.requirements == runtime_requirements()
    assert any(r.startswith("onnxruntime==") for r in spec.wheels.requirements)
    # Non-root user, runtime entrypoint, healthcheck, port from the target.
    assert spec.config.user == "10001:10001"
    assert spec.config.entrypoint[1:] == ("-m", "edgepack_runtime.server")
    assert spec.config.exposed_ports == ("8080/tcp",)
    assert spec.config.healthcheck is not None
    labels = dict(spec.config.labels)
    assert labels["io.edgepack.target"] == "rpi4"
    assert labels["io.edgepack.model.digest"] == inspect_model(onnx_dir / "mnist.onnx").digest


def test_model_layer_holds_model_and_runtime_config(onnx_dir: Path) -> None:
    spec = _plan(onnx_dir / "mnist.onnx", "rpi4", name="digits", version="2.0.0")
    model_layer = spec.layers[-1]
    dests = [f.dest for f in model_layer.files]
    assert dests == sorted(dests)
    assert "/opt/edgepack/model/mnist.onnx" in dests
    config_entry = next(f for f in model_layer.files if f.dest.endswith("runtime.json"))
    assert isinstance(config_entry.source, bytes)
    config = json.loads(config_entry.source)
    assert config["model_name"] == "digits"
    assert config["model_version"] == "2.0.0"
    assert config["model_path"] == "/opt/edgepack/model/mnist.onnx"
    assert config["port"] == 8080
    # The runtime in the image accepts exactly what the build writes (unknown keys are fatal).
    from packager.runtime.config import parse_config

    parsed = parse_config(config, "runtime.json", Path("/"))
    assert parsed.model_name == "digits" and parsed.cpu_mem_arena is True


def test_runtime_settings_come_from_target_then_build_flags(onnx_dir: Path) -> None:
    zero = _plan(onnx_dir / "Network.onnx", "rpi-zero-2w")
    config = json.loads(next(f.source for f in zero.layers[-1].files
                             if f.dest.endswith("runtime.json")))  # type: ignore[arg-type]
    assert config["arena_extend_strategy"] == "kSameAsRequested"
    assert config["intra_op_threads"] == 2 and config["max_batch_size"] == 0
    tuned = _plan(onnx_dir / "Network.onnx", "rpi-zero-2w", max_batch_size=16, cache_mb=4)
    config = json.loads(next(f.source for f in tuned.layers[-1].files
                             if f.dest.endswith("runtime.json")))  # type: ignore[arg-type]
    assert config["max_batch_size"] == 16 and config["cache_bytes"] == 4 * 1024 * 1024


def test_runtime_layer_carries_runtime_sources_only(onnx_dir: Path) -> None:
    spec = _plan(onnx_dir / "mnist.onnx", "rpi4")
    dests = [f.dest for f in spec.layers[0].files]
    assert "/opt/edgepack/runtime/edgepack_runtime/server.py" in dests
    assert all("__pycache__" not in d for d in dests)


def test_industrial_pc_is_amd64(onnx_dir: Path) -> None:
    spec = _plan(onnx_dir / "mnist.onnx", "industrial-pc")
    assert spec.arch == "amd64"
    assert spec.variant is None


def test_same_inputs_same_plan(onnx_dir: Path) -> None:
    assert _plan(onnx_dir / "mnist.onnx", "rpi4") == _plan(onnx_dir / "mnist.onnx", "rpi4")


def test_model_change_touches_only_the_model_layer(onnx_dir: Path) -> None:
    a = _plan(onnx_dir / "mnist.onnx", "rpi4", name="m")
    b = _plan(onnx_dir / "Network.onnx", "rpi4", name="m")
    assert a.base == b.base and a.wheels == b.wheels and a.layers[0] == b.layers[0]
    assert a.layers[1] != b.layers[1]


def test_base_archive_reference(tmp_path: Path) -> None:
    archive = tmp_path / "base.tar"
    archive.write_bytes(b"")
    parsed = parse_base(f"oci-archive:{archive}")
    assert parsed == ArchiveBase(f"oci-archive:{archive}", archive, "oci-archive")
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text("{}")
    assert parse_base(str(layout)).kind == "oci-layout"
    with pytest.raises(InputError, match="no such OCI archive"):
        parse_base(f"oci-archive:{tmp_path / 'missing.tar'}")
    with pytest.raises(InputError, match="not an OCI archive or layout"):
        parse_base(str(tmp_path))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("workspace", "1"), "--opt workspace: not an option of linux-container targets "
         "(linux-container options: emulate=on|off)"),
        (("emulat", "off"), "--opt emulat: not an option of linux-container targets "
         "(did you mean 'emulate'?); linux-container options: emulate=on|off"),
        (("emulate", "0"), "--opt emulate=0: give emulate=on|off "
         "(linux-container options: emulate=on|off)"),
    ],
)
def test_an_unknown_option_is_a_usage_error(option: tuple[str, str], message: str) -> None:
    """Refused as MCU and Jetson refuse theirs, not silently ignored."""
    request = BuildRequest(model=Path("m.onnx"), target="rpi4", options=(option,))
    with pytest.raises(UsageError) as refused:
        LinuxContainerBackend().check_request(request)
    assert refused.value.one_line() == message


def test_no_emulate_is_accepted() -> None:
    """`build --no-emulate` adds emulate=off for every class ("where the backend has one")."""
    request = BuildRequest(model=Path("m.onnx"), target="rpi4", options=(("emulate", "off"),))
    LinuxContainerBackend().check_request(request)
