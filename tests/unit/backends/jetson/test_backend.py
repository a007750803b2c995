"""The Jetson backend's plan, without building anything: which base, which CPython and wheels,
the engine section of runtime.json, the units, and the explicit fallback of the generations
whose CPython cannot run edgepack's runtime. Target copies here are test files (named so)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from packager.agent import confinement
from packager.backends import get_backend
from packager.backends.base import BuildRequest
from packager.backends.jetson.backend import UNIT_GPU_ARGS, JetsonBackend, JetsonPayload
from packager.backends.jetson.container import RUNTIME_MIN_PYTHON, WHEEL_PINS
from packager.errors import TargetError, UsageError
from packager.image.spec import DebianBase, RegistryBase
from packager.models import inspect_model
from packager.models.info import ModelInfo
from packager.models.runtime_compat import support_for
from packager.render import render
from packager.runtime import jetson_preflight
from packager.targets import JetsonRuntime, LoadedTarget, load_target_file, resolve_target
from tests import jetson_standin

MNIST = Path("/work/shared/testdata/onnx/mnist.onnx")
DIGEST = "ab" * 32


def target_copy(tmp_path: Path, name: str, **runtime: Any) -> LoadedTarget:
    """A test-only copy of a shipped Jetson target (its own CPython) with ``runtime`` keys
    replaced."""
    return load_target_file(jetson_standin.target_copy(name, tmp_path, runs_here=False, **runtime))


@pytest.fixture(scope="module")
def mnist() -> ModelInfo:
    return inspect_model(MNIST)


def _plan(target: LoadedTarget, model: ModelInfo, **request: Any) -> Any:
    backend = JetsonBackend()
    req = BuildRequest(model=MNIST, target=target.source, **request)
    return backend.plan(req, model, target, backend.fit(req, model, target))


def _runtime_json(payload: JetsonPayload) -> dict[str, Any]:
    layer = next(layer for layer in payload.image.layers if layer.name == "model")
    entry = next(f for f in layer.files if f.dest.endswith("/runtime.json"))
    assert isinstance(entry.source, bytes)
    doc: dict[str, Any] = json.loads(entry.source)
    return doc


def test_the_registry_names_the_jetson_backend() -> None:
    assert isinstance(get_backend("jetson"), JetsonBackend)


def test_an_unpinned_base_is_refused_naming_the_field(mnist: ModelInfo) -> None:
    target = resolve_target("jetson-orin-nano")
    with pytest.raises(TargetError) as err:
        _plan(target, mnist)
    line = err.value.one_line()
    assert "runtime.base" in line and "not pinned by digest" in line


def _pinned(tmp_path: Path, name: str, tag: str) -> LoadedTarget:
    """A test-only copy of ``name`` whose base is l4t-jetpack:``tag`` pinned by digest."""
    return target_copy(tmp_path, name, base=f"nvcr.io/nvidia/l4t-jetpack:{tag}@sha256:{DIGEST}")


@pytest.mark.parametrize(
    ("name", "tag", "python", "glibc", "requirements"),
    [
        ("jetson-orin-nano", "r36.3.0", "3.10", (2, 35), ("onnxruntime==1.23.2", "numpy==2.2.6")),
        ("jetson-xavier-nx", "r35.4.1", "3.8", (2, 31), ("onnxruntime==1.19.2", "numpy==1.24.4")),
    ],
)
def test_a_pinned_gpu_plan_is_the_jetpack_base_by_digest_with_its_own_cpythons_wheels(
    tmp_path: Path, mnist: ModelInfo, name: str, tag: str, python: str,
    glibc: tuple[int, int], requirements: tuple[str, ...],
) -> None:  # fmt: skip
    """JetPack 6's CPython 3.10 and JetPack 5's 3.8 run the runtime (tests/unit/runtime/
    test_min_python.py), so the image is the l4t-jetpack base with that CPython's pinned
    wheels, and the device builds the engine."""
    plan = _plan(_pinned(tmp_path, name, tag), mnist)
    payload = plan.payload
    assert isinstance(payload, JetsonPayload)
    image = payload.image
    assert image.base == RegistryBase(
        reference=f"docker://nvcr.io/nvidia/l4t-jetpack@sha256:{DIGEST}", digest=f"sha256:{DIGEST}"
    )
    assert image.arch == "arm64"
    assert payload.choice.serving == "tensorrt" and payload.choice.fallback_reason is None
    assert image.wheels is not None
    assert image.wheels.python_version == python and image.wheels.glibc == glibc
    assert image.wheels.requirements == requirements
    assert image.config.entrypoint[0] == f"/usr/bin/python{python}"
    assert image.config.healthcheck is not None
    assert image.config.healthcheck.test[1] == f"/usr/bin/python{python}"
    assert ("NVIDIA_VISIBLE_DEVICES", "all") in image.config.env
    assert "edgepack-mnist-engine.service" in {f.path for f in plan.rendered}
    assert JetsonBackend().device_section(plan)["serving"] == "tensorrt"


def test_orin_plan_carries_the_engine_key_the_units_and_the_l4t_range(
    tmp_path: Path, mnist: ModelInfo
) -> None:
    plan = _plan(_pinned(tmp_path, "jetson-orin-nano", "r36.3.0"), mnist)
    engine = _runtime_json(plan.payload)["engine"]
    assert engine == {
        "engines_dir": "/var/lib/edgepack/engines",
        "fallback": "onnxruntime-cpu",
        "key": {
            "model_sha256": mnist.digest.removeprefix("sha256:"),
            "tensorrt": "8.6.2",
            "sm": 87,
            "precision": "fp16",
            "dla_core": None,
            "workspace_mib": 2048,
        },
    }
    paths = {f.path: f.template for f in plan.rendered}
    assert paths["edgepack-mnist-engine.service"] == "jetson/engine-build.service.jinja"
    assert paths["edgepack-mnist.service"] == "jetson/service.jinja"
    assert paths["install-container.sh"] == "linux/install.sh.jinja"
    device = JetsonBackend().device_section(plan)
    assert device["l4t"] == {"release": "r36.3.0", "min": "r36.0.0", "below": "r36.4.0"}
    assert device["plan"] == (
        f"/var/lib/edgepack/engines/{mnist.digest.removeprefix('sha256:')}/8.6.2-sm87-fp16.plan"
    )


def test_base_flag_replaces_the_target_base_and_needs_no_pin(
    tmp_path: Path, mnist: ModelInfo
) -> None:
    ref = f"docker://127.0.0.1:19400/stand-in/l4t@sha256:{DIGEST}"
    plan = _plan(resolve_target("jetson-orin-nano"), mnist, base=ref)
    assert plan.payload.image.base == RegistryBase(reference=ref, digest=f"sha256:{DIGEST}")
    # The build's own description names the base the image is built on, not the target's.
    (base_line,) = [line for line in plan.payload.lines if " base " in line]
    assert base_line.endswith(f"base {ref} (--base; CPython 3.10 expected)"), base_line


def test_xavier_plan_carries_the_jetpack_5_engine_key_and_says_so(
    tmp_path: Path, mnist: ModelInfo
) -> None:
    target = _pinned(tmp_path, "jetson-xavier-nx", "r35.4.1")
    key = _runtime_json(_plan(target, mnist).payload)["engine"]["key"]
    assert (key["tensorrt"], key["sm"], key["precision"]) == ("8.5.2", 72, "fp16")
    (note,) = JetsonBackend().target_notes(target)
    assert note.value["serving"] == "tensorrt"
    assert "serving: TensorRT engine built on the device" in note.line


def test_every_cpython_a_target_may_name_on_the_gpu_path_has_pinned_wheels() -> None:
    """A target's runtime.python at or above RUNTIME_MIN_PYTHON gets the TensorRT path, so it
    needs wheels for it (3.11: requirements.txt's)."""
    allowed = typing.get_args(JetsonRuntime.model_fields["python"].annotation)
    served = [v for v in allowed if tuple(map(int, v.split("."))) >= RUNTIME_MIN_PYTHON]
    assert set(served) == {"3.8", "3.10", "3.11"}
    assert set(WHEEL_PINS) == set(served) - {"3.11"}
    for pins in WHEEL_PINS.values():
        assert sorted(pin.split("==")[0] for pin in pins) == ["numpy", "onnxruntime"]
        # The build's runtime-compatibility step needs the limits of the onnxruntime it ships.
        (ort,) = [pin.partition("==")[2] for pin in pins if pin.startswith("onnxruntime==")]
        assert support_for(ort).version == ort


def test_the_shipped_xavier_target_now_needs_its_base_pinned(mnist: ModelInfo) -> None:
    """On the GPU path the JetPack 5 base is pulled, so its unpinned tag is refused (exit 4)."""
    with pytest.raises(TargetError) as err:
        _plan(resolve_target("jetson-xavier-nx"), mnist)
    assert "runtime.base" in err.value.one_line()


@pytest.mark.parametrize(("name", "python"), [("jetson-nano", "3.6")])
def test_generations_whose_python_cannot_run_the_runtime_fall_back_explicitly(
    name: str, python: str, mnist: ModelInfo
) -> None:
    target = resolve_target(name)
    plan = _plan(target, mnist)
    payload = plan.payload
    assert isinstance(payload.image.base, DebianBase)
    assert payload.image.wheels is not None and payload.image.wheels.python_version == "3.11"
    assert payload.choice.serving == "onnxruntime-cpu"
    assert f"CPython {python}" in (payload.choice.fallback_reason or "")
    assert not any(f.path.endswith("-engine.service") for f in plan.rendered)
    # runtime.json still carries the key: the runtime reports "engine: absent, fallback: ...".
    assert _runtime_json(payload)["engine"]["fallback"] == "onnxruntime-cpu"
    (note,) = JetsonBackend().target_notes(target)
    assert note.value["serving"] == "onnxruntime-cpu"
    assert "serving: onnxruntime-cpu fallback" in note.line
    assert "base edgepack's Debian base (CPython 3.11), not " in note.line


def test_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    request = BuildRequest(model=MNIST, target="jetson-orin-nano", options=(("workspace", "1"),))
    with pytest.raises(UsageError, match="--opt workspace"):
        JetsonBackend().check_request(request)


def test_no_emulate_is_accepted_and_a_bad_emulate_value_is_not() -> None:
    """``build --no-emulate`` adds ``--opt emulate=off`` for every device class (commands/
    build.py); Jetson refused it as an unknown option, so the flag failed every Jetson build."""
    request = BuildRequest(model=MNIST, target="jetson-orin-nano", options=(("emulate", "off"),))
    JetsonBackend().check_request(request)
    request = BuildRequest(model=MNIST, target="jetson-orin-nano", options=(("emulate", "of"),))
    with pytest.raises(UsageError, match=r"--opt emulate=of: give emulate=on\|off"):
        JetsonBackend().check_request(request)


def test_timing_cache_is_copied_into_the_bundle(tmp_path: Path, mnist: ModelInfo) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache")
    ref = f"docker://127.0.0.1:19400/stand-in/l4t@sha256:{DIGEST}"
    plan = _plan(resolve_target("jetson-orin-nano"), mnist, base=ref,
                 options=(("timing-cache", str(cache)),))
    copied = {c.path: c.source for c in plan.copied}
    assert copied["engine/timing.cache"] == cache
    assert copied["jetson_preflight.py"].name == "jetson_preflight.py"


def test_a_dla_core_the_module_lacks_is_a_target_error(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"runtime: dla_core 0 but the module has 0 DLA"):
        target_copy(tmp_path, "jetson-orin-nano", dla_core=0)


def test_fp16_is_left_to_tensorrt_and_int8_goes_through_the_optimizer() -> None:
    from packager.backends.base import (
        FoldConstantsStep,
        OptimizeStep,
        RuntimeCompatStep,
        SourceModel,
    )

    target = resolve_target("jetson-orin-nano")
    source = SourceModel(path=MNIST, format="onnx")
    backend = JetsonBackend()
    fp16 = backend.source_steps(BuildRequest(model=MNIST, target="x", base="oci:/x"), source,
                                target)
    compat = RuntimeCompatStep(engine="onnxruntime", version="1.23.2")
    # Constants folded in every precision, before the last runtime check (issue 12).
    assert fp16 == (compat, FoldConstantsStep(), compat)
    int8 = backend.source_steps(
        BuildRequest(model=MNIST, target="x", base="oci:/x", quantize="int8-static"), source,
        target,
    )
    assert [type(s) for s in int8] == [
        RuntimeCompatStep, OptimizeStep, FoldConstantsStep, RuntimeCompatStep
    ]


@pytest.mark.parametrize(
    ("tensorrt", "problem"),
    [
        # A leading zero (the device's EngineKey takes none) is refused by the target's own
        # form at load: tests/unit/test_targets.py.
        # No trtexec command line known on the device (packager/runtime/trtexec.py).
        ("8.0.1", "has no known trtexec command line"),
        ("9.9.9", "has no known trtexec command line"),
    ],
)
def test_a_tensorrt_the_device_cannot_build_is_refused_at_plan_time(
    tmp_path: Path, mnist: ModelInfo, tensorrt: str, problem: str
) -> None:
    """Before: the bundle built and verified, and every device failed at first boot (exit 2, or
    a traceback from trtexec.form in engine_build)."""
    target = target_copy(
        tmp_path, "jetson-orin-nano", tensorrt=tensorrt,
        base=f"nvcr.io/nvidia/l4t-jetpack:r36.3.0@sha256:{DIGEST}",
    )
    with pytest.raises(TargetError) as err:
        _plan(target, mnist)
    line = err.value.one_line()
    assert "jetson-orin-nano.toml: runtime.tensorrt:" in line and problem in line


# --- the GPU access of the first-boot engine unit: one table (packager.agent.confinement.GPU) --


def test_the_engine_unit_and_the_preflight_give_the_gpu_as_the_confinement_table() -> None:
    """The serving container, the agent's prepare step, the engine unit and the preflight's
    own test container (packager/runtime/jetson_preflight.py, an island that cannot import the
    agent, so it keeps its own copy) give each engine the GPU the same way: a changed table, or
    a changed preflight, fails here instead of drifting apart."""
    assert [engine for engine, _ in UNIT_GPU_ARGS] == list(confinement.ENGINES)
    for engine, words in UNIT_GPU_ARGS:
        assert "=".join(words) == confinement.GPU[engine]
        assert confinement.GPU[engine] in confinement.NVIDIA_JETSON[engine]
        assert jetson_preflight.gpu_run_args(f"/usr/bin/{engine}") == list(words)
        # Written unquoted into the unit: plain tokens only (no space, quote, % or $).
        assert all(re.fullmatch(r"--?[a-z][a-z-]*|[A-Za-z0-9][A-Za-z0-9./=_-]*", w)
                   for w in words), words


def test_the_engine_unit_renders_its_gpu_words_from_the_context(
    tmp_path: Path, mnist: ModelInfo
) -> None:
    """Before: the unit spelled its own docker/podman table and ignored the backend's."""
    plan = _plan(_pinned(tmp_path, "jetson-orin-nano", "r36.3.0"), mnist)
    backend = JetsonBackend()
    engine = backend.engine_context(plan)
    assert engine["gpu_args"] == UNIT_GPU_ARGS
    changed = {**engine, "gpu_args": (("docker", ("--runtime", "stand-in-runtime")),
                                      ("podman", ("--device", "stand-in.example/gpu=0")))}
    context = {"name": "mnist", "version": "1.0.0", "target": "jetson-orin-nano",
               "image_ref": "localhost/edgepack-mnist:1.0.0"}
    unit = render("jetson/engine-build.service.jinja", {**context, "engine": changed})
    starts = [line for line in unit.splitlines() if "-only ExecStart=" in line]
    assert len(starts) == 2
    assert starts[0].startswith("#docker-only ")
    assert " --runtime stand-in-runtime --network none " in starts[0]
    assert starts[1].startswith("#podman-only ")
    assert " --device stand-in.example/gpu=0 --network none " in starts[1]
    shipped = render("jetson/engine-build.service.jinja", {**context, "engine": engine})
    assert " --runtime nvidia --network none " in shipped
    assert " --device nvidia.com/gpu=all --network none " in shipped
