"""The TensorRT engine runner and its explicit onnxruntime CPU fallback.

TensorRT and a GPU cannot exist here: the runner is driven against the STAND-IN ``tensorrt`` and
``cuda`` modules of tests/unit/runtime/standin_tensorrt.py (injected through sys.modules), which
check the call sequence of the API generation they claim (name-based 8.5+/10, bindings 8.2) and
compute real outputs by running the ONNX model through onnxruntime. The fallback is the real
thing: a real onnxruntime session behind the real HTTP server on loopback (ports 19300-19399).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.runtime.config import ConfigError, EngineConfig, RuntimeConfig, parse_config
from packager.runtime.engine_key import EngineKey
from packager.runtime.metrics import label_value
from packager.runtime.model import Model, ModelError, file_digest, load_model
from packager.runtime.server import App, RuntimeServer
from packager.runtime.tensorrt_runner import (
    Cuda,
    EngineError,
    EngineStatus,
    InvalidArgument,
    TensorRTModel,
    choose_engine,
    load_served_model,
)
from tests.integration.runtime_helpers import TESTDATA, start_runtime
from tests.ports import free_port_in
from tests.unit.runtime.standin_tensorrt import (
    StandInCudart,
    cuda_package,
    make_plan,
    tensorrt_module,
)

NETWORK = TESTDATA / "onnx" / "Network.onnx"  # input [batch_size, 4] -> output [batch_size, 3]
MNIST = TESTDATA / "onnx" / "mnist.onnx"  # Input3 [1,1,28,28] -> Plus214_Output_0 [1,10]
# (version the stand-in claims, API it must be driven through)
VERSIONS = [("10.3.0", "name"), ("8.6.2.3", "name"), ("8.5.2.2", "name"), ("8.2.1.8", "bindings")]
PORTS = range(19300, 19400)


class StandIns:
    def __init__(self, version: str, sm: int) -> None:
        self.cudart = StandInCudart(sm=sm)
        self.trt = tensorrt_module(version, self.cudart)
        self.version = version

    @property
    def calls(self) -> list[str]:
        return self.cudart.calls

    @property
    def violations(self) -> list[str]:
        return self.cudart.violations + self.trt.recorder.violations


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A factory installing the stand-in ``tensorrt`` and ``cuda`` modules in sys.modules."""

    def install(version: str = "10.3.0", sm: int = 87) -> StandIns:
        made = StandIns(version, sm)
        monkeypatch.setitem(sys.modules, "tensorrt", made.trt)
        monkeypatch.setitem(sys.modules, "cuda", cuda_package(made.cudart))
        monkeypatch.setitem(sys.modules, "cuda.cudart", made.cudart)
        return made

    yield install


def engine_model(made: StandIns, onnx: Path = NETWORK, max_rows: int = 8) -> TensorRTModel:
    return TensorRTModel(
        made.trt,
        Cuda(made.cudart),
        make_plan(onnx, made.version, max_rows),
        name="m",
        version="1",
        path=Path("/nonexistent.plan"),
        digest=file_digest(onnx),
    )


def features(rows: int) -> np.ndarray:
    return np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 7.0 - 1.0


# ------------------------------------------------------------------------------------------
# The runner against the stand-ins


@pytest.mark.parametrize(("version", "api"), VERSIONS)
def test_engine_outputs_equal_onnxruntime_through_the_claimed_api(
    standins: Any, version: str, api: str
) -> None:
    made = standins(version)
    model = engine_model(made)
    reference = load_model(NETWORK, "m", "1")
    assert model.platform == "tensorrt_plan"
    assert [s.describe() for s in model.signature.inputs] == ["input (FP32 [-1,4])"]
    assert [s.describe() for s in model.signature.outputs] == ["output (FP32 [-1,3])"]
    for rows in (1, 5, 3):  # grows, then reuses the device buffers
        (got,) = model.run({"input": features(rows)}, ["output"])
        (want,) = reference.run({"input": features(rows)}, ["output"])
        assert got.shape == (rows, 3)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    executes = made.calls.count("execute_async_v3" if api == "name" else "execute_async_v2")
    assert executes == 3
    assert made.violations == []
    model.close()
    assert made.violations == []


@pytest.mark.parametrize(("version", "api"), [VERSIONS[0], VERSIONS[3]])
def test_fixed_shape_model_mnist(standins: Any, version: str, api: str) -> None:
    made = standins(version)
    model = engine_model(made, MNIST)
    image = np.random.default_rng(3).random((1, 1, 28, 28), dtype=np.float32)
    (got,) = model.run({"Input3": image}, ["Plus214_Output_0"])
    (want,) = load_model(MNIST, "m", "1").run({"Input3": image}, ["Plus214_Output_0"])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    model.close()
    assert made.violations == []


def _one_run(calls: list[str], execute: str) -> list[str]:
    """The calls of the last run: from the first shape setting before the last execute to the
    synchronize after it."""
    end = len(calls) - 1 - calls[::-1].index(execute)
    sync = calls.index("cudaStreamSynchronize", end)
    setter = "set_input_shape" if execute == "execute_async_v3" else "set_binding_shape"
    before = calls[:end]
    previous_sync = (
        len(before) - before[::-1].index("cudaStreamSynchronize")
        if "cudaStreamSynchronize" in before
        else 0
    )
    start = calls.index(setter, previous_sync)
    return calls[start : sync + 1]


def _first_run(made: StandIns, execute_call: str) -> tuple[TensorRTModel, list[str], int]:
    """One inference on a new engine model: the model, that run's calls, the enqueue's index."""
    model = engine_model(made)
    model.run({"input": features(2)}, ["output"])
    run = _one_run(made.calls, execute_call)
    return model, run, run.index(execute_call)


def test_name_based_sequence_shapes_then_addresses_then_execute_then_synchronize(
    standins: Any,
) -> None:
    made = standins("10.3.0")
    model, run, execute = _first_run(made, "execute_async_v3")
    assert run[0] == "set_input_shape"
    # every IO tensor (1 input, 1 output) gets its address before the enqueue
    assert run[:execute].count("set_tensor_address") == 2
    assert run.index("cudaMemcpyAsync:HtoD") < execute < run.index("cudaMemcpyAsync:DtoH")
    assert run[-1] == "cudaStreamSynchronize"
    assert "cudaMalloc" in run[:execute]  # first run: buffers allocated before the enqueue
    model.run({"input": features(2)}, ["output"])
    assert "cudaMalloc" not in _one_run(made.calls, "execute_async_v3")  # reused
    assert made.violations == []


def test_bindings_sequence_on_tensorrt_8_2(standins: Any) -> None:
    made = standins("8.2.1.8")
    _, run, execute = _first_run(made, "execute_async_v2")
    assert run[0] == "set_binding_shape"
    assert run.index("context.get_binding_shape") < execute
    assert run.index("cudaMemcpyAsync:HtoD") < execute < run.index("cudaMemcpyAsync:DtoH")
    assert run[-1] == "cudaStreamSynchronize"
    assert not any(c.startswith(("set_tensor", "execute_async_v3")) for c in made.calls)
    assert made.violations == []


def test_close_frees_every_device_buffer_and_the_stream(standins: Any) -> None:
    made = standins("10.3.0")
    model = engine_model(made)
    model.run({"input": features(4)}, ["output"])
    assert len(made.cudart.memory) == 2
    model.close()
    assert made.cudart.memory == {}
    assert not any(stream.alive for stream in made.cudart.streams.values())
    model.close()  # idempotent: no double free
    assert made.calls.count("cudaFree") == 2
    with pytest.raises(EngineError, match="closed"):
        model.run({"input": features(1)}, ["output"])
    assert made.violations == []


def test_a_shape_outside_the_profile_is_the_requests_fault(standins: Any) -> None:
    made = standins("8.6.2.3")
    model = engine_model(made, max_rows=4)
    with pytest.raises(InvalidArgument, match=r"shape \[5, 4\] is outside"):
        model.run({"input": features(5)}, ["output"])
    config = RuntimeConfig(model_name="m", model_path=NETWORK)
    app = App(config, model, EngineStatus("tensorrt", "loaded", Path("/p.plan")))
    app.ready.set()
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [5, 4], "datatype": "FP32", "data": [0.0] * 20}]}
    ).encode()
    for _ in range(4):
        assert app.handle("POST", "/v2/models/m/infer", {}, body).status == 400
    assert app.healthy()  # a client cannot turn readiness off
    model.close()
    assert made.violations == []


def test_a_cuda_error_is_one_line_and_nothing_leaks(standins: Any) -> None:
    made = standins("10.3.0")
    model = engine_model(made, max_rows=64)
    model.run({"input": features(1)}, ["output"])
    made.cudart.fail_malloc_at = made.cudart.mallocs  # the next cudaMalloc fails
    with pytest.raises(EngineError, match=r"^cudaMalloc failed: cudaErrorMemoryAllocation$"):
        model.run({"input": features(32)}, ["output"])  # 512 bytes: a larger buffer
    model.close()
    assert made.cudart.memory == {}
    assert made.violations == []


def test_unservable_tensor_type_is_refused(standins: Any, tmp_path: Path) -> None:
    from tests.integration.runtime_helpers import identity_model

    made = standins("10.3.0")
    with pytest.raises(EngineError, match="'wide' has TensorRT type DOUBLE_UNSUPPORTED"):
        engine_model(made, identity_model(tmp_path / "id.onnx"))


# The stand-ins themselves must fail a runner that breaks the contract (else the tests above
# could not fail).


def test_standin_refuses_execute_before_every_address_is_set(standins: Any) -> None:
    made = standins("10.3.0")
    engine = made.trt.Runtime(made.trt.Logger()).deserialize_cuda_engine(
        make_plan(NETWORK, "10.3.0")
    )
    context = engine.create_execution_context()
    _, stream = made.cudart.cudaStreamCreate()
    assert context.set_input_shape("input", (1, 4))
    _, pointer = made.cudart.cudaMalloc(16)
    context.set_tensor_address("input", pointer)
    assert context.execute_async_v3(int(stream)) is False
    assert made.violations == ["execute_async_v3: no address for tensor 'output'"]


def test_standin_refuses_the_deprecated_bindings_api_on_8_6_and_has_none_on_10(
    standins: Any,
) -> None:
    made = standins("8.6.2.3")
    engine = made.trt.Runtime(made.trt.Logger()).deserialize_cuda_engine(
        make_plan(NETWORK, "8.6.2.3")
    )
    with pytest.raises(AssertionError):
        engine.get_binding_shape(0)
    assert "deprecated" in made.violations[0]
    newest = standins("10.3.0")
    engine = newest.trt.Runtime(newest.trt.Logger()).deserialize_cuda_engine(
        make_plan(NETWORK, "10.3.0")
    )
    assert not hasattr(engine, "num_bindings")
    old = standins("8.2.1.8")
    engine = old.trt.Runtime(old.trt.Logger()).deserialize_cuda_engine(
        make_plan(NETWORK, "8.2.1.8")
    )
    assert not hasattr(engine, "num_io_tensors")


def test_standin_gives_garbage_to_a_runner_that_skips_synchronize(
    standins: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = standins("10.3.0")
    model = engine_model(made)
    monkeypatch.setattr(Cuda, "synchronize", lambda self, stream: None)
    unique = features(3) * 3.0 + 11.0  # values no other test computes (np.empty reuses memory)
    (got,) = model.run({"input": unique}, ["output"])
    (want,) = load_model(NETWORK, "m", "1").run({"input": unique}, ["output"])
    assert not np.allclose(got, want)
    monkeypatch.undo()
    made.cudart.cudaStreamDestroy(model._stream)
    assert "cudaStreamDestroy with work still queued (no synchronize)" in made.violations


# ------------------------------------------------------------------------------------------
# Choosing the engine or the fallback


def key_for(onnx: Path = NETWORK, tensorrt: str = "10.3.0", sm: int = 87) -> EngineKey:
    return EngineKey(file_digest(onnx), tensorrt, sm, "fp16", None, 1024)


def install_plan(
    root: Path, key: EngineKey, *, built_with: str | None = None, key_file: EngineKey | None = None
) -> Path:
    """What the first-boot unit leaves: the plan, then its canonical key file."""
    plan = key.plan_path(root)
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(make_plan(NETWORK, built_with or key.tensorrt))
    key.key_path(root).write_text((key_file or key).to_json(), encoding="ascii")
    return plan


def engine_config(root: Path, key: EngineKey, fallback: str = "onnxruntime-cpu") -> RuntimeConfig:
    return RuntimeConfig(
        model_name="m",
        model_path=NETWORK,
        engine=EngineConfig(key=key, engines_dir=root, fallback=fallback),
    )


def test_a_matching_plan_is_loaded(standins: Any, tmp_path: Path) -> None:
    made = standins("10.3.0")
    plan = install_plan(tmp_path, key_for())
    model, status = load_served_model(engine_config(tmp_path, key_for()))
    assert isinstance(model, TensorRTModel)
    assert status == EngineStatus("tensorrt", "loaded", plan)
    assert status.line() == "engine: loaded"
    assert model.digest == file_digest(NETWORK)
    (got,) = model.run({"input": features(2)}, ["output"])
    assert got.shape == (2, 3)
    model.close()
    assert made.violations == []


def test_no_plan_is_absent_and_onnxruntime_serves(standins: Any, tmp_path: Path) -> None:
    made = standins("10.3.0")
    model, status = load_served_model(engine_config(tmp_path, key_for()))
    assert isinstance(model, Model)
    assert status is not None
    assert status.line() == "engine: absent, fallback: onnxruntime-cpu"
    assert (status.runner, status.state) == ("onnxruntime-cpu", "absent")
    assert model.run({"input": features(1)}, ["output"])[0].shape == (1, 3)
    assert made.calls == []  # TensorRT was not even touched


def _invalid(config: RuntimeConfig) -> str:
    assert config.engine is not None
    model, status = choose_engine(config, config.engine)
    assert model is None
    assert status.state == "invalid" and status.runner == "onnxruntime-cpu"
    line = status.line()
    assert line.startswith("engine: invalid (") and line.endswith("), fallback: onnxruntime-cpu")
    return line


def test_key_mismatch_is_invalid_and_never_deserialized(standins: Any, tmp_path: Path) -> None:
    made = standins("10.3.0")
    expected = key_for()
    install_plan(tmp_path, expected, key_file=key_for(tensorrt="10.0.1"))
    assert _invalid(engine_config(tmp_path, expected)) == (
        "engine: invalid (key differs: tensorrt: expected '10.3.0', found '10.0.1'), "
        "fallback: onnxruntime-cpu"
    )
    assert "deserialize_cuda_engine" not in made.calls


def test_a_plan_without_its_key_is_invalid(standins: Any, tmp_path: Path) -> None:
    standins("10.3.0")
    expected = key_for()
    install_plan(tmp_path, expected)
    expected.key_path(tmp_path).unlink()
    assert "without its key file" in _invalid(engine_config(tmp_path, expected))


def test_the_containers_tensorrt_must_be_the_keys(standins: Any, tmp_path: Path) -> None:
    made = standins("10.3.1")
    install_plan(tmp_path, key_for())
    line = _invalid(engine_config(tmp_path, key_for()))
    assert "the container's TensorRT is 10.3.1, the plan is for 10.3.0" in line
    assert "deserialize_cuda_engine" not in made.calls


def test_the_gpus_sm_must_be_the_keys(standins: Any, tmp_path: Path) -> None:
    standins("10.3.0", sm=72)
    install_plan(tmp_path, key_for())
    assert "this GPU is sm72, the plan is for sm87" in _invalid(engine_config(tmp_path, key_for()))


def test_no_gpu_visible_in_the_container_is_invalid(standins: Any, tmp_path: Path) -> None:
    made = standins("10.3.0")
    made.cudart.device_error = made.cudart.cudaError_t.cudaErrorInsufficientDriver
    install_plan(tmp_path, key_for())
    assert _invalid(engine_config(tmp_path, key_for())) == (
        "engine: invalid (cudaGetDevice failed: cudaErrorInsufficientDriver), "
        "fallback: onnxruntime-cpu"
    )


def test_a_plan_tensorrt_cannot_deserialize_is_invalid(standins: Any, tmp_path: Path) -> None:
    made = standins("10.3.0")
    install_plan(tmp_path, key_for(), built_with="10.0.1")  # the key file lies about the plan
    line = _invalid(engine_config(tmp_path, key_for()))
    assert "TensorRT could not deserialize the plan" in line
    assert made.cudart.memory == {} and made.violations == []


def test_no_tensorrt_in_the_container_is_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    install_plan(tmp_path, key_for())
    assert "TensorRT's Python API cannot be imported" in _invalid(
        engine_config(tmp_path, key_for())
    )


def test_fallback_none_refuses_to_serve(standins: Any, tmp_path: Path) -> None:
    standins("10.3.0")
    with pytest.raises(ModelError, match=r"engine absent and runtime.json's engine.fallback"):
        load_served_model(engine_config(tmp_path, key_for(), fallback="none"))


# ------------------------------------------------------------------------------------------
# runtime.json's engine section


def _parse(engine: Any) -> RuntimeConfig:
    return parse_config(
        {"model_name": "m", "model_path": "m.onnx", "engine": engine}, "c.json", Path(".")
    )


def test_engine_section_is_read_with_its_defaults() -> None:
    key = key_for()
    config = _parse({"key": key.as_dict()})
    assert config.engine == EngineConfig(key=key)
    assert config.engine.engines_dir == Path("/var/lib/edgepack/engines")
    assert config.engine.fallback == "onnxruntime-cpu"
    assert parse_config({"model_name": "m", "model_path": "m"}, "c", Path(".")).engine is None


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ([], "c.json: engine must be a JSON object"),
        ({}, "c.json: engine: missing required key 'key'"),
        ({"key": {}, "plan": 1}, "c.json: engine: unknown key 'plan'"),
        ({"engines_dir": "engines"}, "c.json: engine.engines_dir must be an absolute path"),
        ({"engines_dir": "/a/../b"}, "engine.engines_dir must not contain '..'"),
        ({"fallback": "cpu"}, "engine.fallback must be one of onnxruntime-cpu, none"),
        ({"key": {"sm": 87}}, "c.json: engine.key: engine key: missing model_sha256"),
        ({"key": {**key_for().as_dict(), "sm": "87"}}, "c.json: engine.key: sm: '87' is not"),
    ],
)
def test_bad_engine_sections_are_one_line(engine: Any, message: str) -> None:
    if isinstance(engine, dict) and "key" not in engine and engine:
        engine = {"key": key_for().as_dict(), **engine}
    with pytest.raises(ConfigError) as caught:
        _parse(engine)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------
# Over real HTTP on loopback


def free_port() -> int:
    return free_port_in(PORTS)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def infer(url: str, rows: int) -> list[float]:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [rows, 4],
                "datatype": "FP32",
                "data": features(rows).ravel().tolist(),
            }
        ]
    }
    request = urllib.request.Request(
        f"{url}/v2/models/m/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return list(json.loads(reply.read())["outputs"][0]["data"])


def engine_json(root: Path, key: EngineKey) -> dict[str, Any]:
    return {"engines_dir": str(root), "key": key.as_dict()}


@pytest.mark.parametrize("case", ["absent", "key mismatch"])
def test_the_runtime_process_falls_back_and_says_so(tmp_path: Path, case: str) -> None:
    """The runtime as a process (no tensorrt module here at all), fallback by onnxruntime."""
    root = tmp_path / "engines"
    if case == "key mismatch":
        install_plan(root, key_for(), key_file=key_for(sm=72))
    runtime = start_runtime(
        tmp_path / "rt", NETWORK, "m", port=free_port(), engine=engine_json(root, key_for())
    )
    try:
        status, text = get(f"{runtime.url}/v2/health/report")
        assert status == 200
        report = json.loads(text)
        expected = (
            "engine: absent, fallback: onnxruntime-cpu"
            if case == "absent"
            else "engine: invalid (key differs: sm: expected 87, found 72), "
            "fallback: onnxruntime-cpu"
        )
        assert report["engine"] == expected
        state = "absent" if case == "absent" else "invalid"
        assert report["engine_detail"]["runner"] == "onnxruntime-cpu"
        assert report["engine_detail"]["state"] == state
        _, metrics = get(f"{runtime.url}/metrics")
        assert (
            f'edgepack_engine_info{{engine="onnxruntime-cpu",state="{state}",'
            f'status="{expected}"}} 1'
        ) in metrics.splitlines()
        _, metadata = get(f"{runtime.url}/v2/models/m")
        assert json.loads(metadata)["platform"] == "onnxruntime_onnx"
        want = load_model(NETWORK, "m", "1").run({"input": features(2)}, ["output"])[0]
        np.testing.assert_allclose(infer(runtime.url, 2), want.ravel(), rtol=1e-6)
        events = [e for e in runtime.events() if e.get("event") == "engine"]
        assert [e["message"] for e in events] == [expected]
    finally:
        assert runtime.stop() == 0


def test_fallback_none_exits_3_naming_the_plan(tmp_path: Path) -> None:
    root = tmp_path / "engines"
    with pytest.raises(RuntimeError, match="runtime exited with 3") as caught:
        start_runtime(
            tmp_path / "rt",
            NETWORK,
            "m",
            port=free_port(),
            engine={**engine_json(root, key_for()), "fallback": "none"},
        )
    assert "engine absent and runtime.json's engine.fallback is none" in str(caught.value)


def test_the_engine_behind_the_http_server(standins: Any, tmp_path: Path) -> None:
    """The stand-in engine behind the real server: ready is 503 until loaded; then it serves."""
    made = standins("10.3.0")
    install_plan(tmp_path, key_for())
    config = engine_config(tmp_path, key_for())
    model, status = load_served_model(config)
    app = App(config, model, status)
    server = RuntimeServer(("127.0.0.1", free_port()), app)
    server.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert get(f"{url}/v2/health/ready")[0] == 503  # not yet warmed up and marked ready
        assert get(f"{url}/v2/models/m/ready")[0] == 503
        model.warm_up()
        app.ready.set()
        assert get(f"{url}/v2/health/ready")[0] == 200
        report = json.loads(get(f"{url}/v2/health/report")[1])
        assert report["engine"] == "engine: loaded"
        assert report["engine_detail"]["runner"] == "tensorrt"
        assert json.loads(get(f"{url}/v2/models/m")[1])["platform"] == "tensorrt_plan"
        metrics = get(f"{url}/metrics")[1].splitlines()
        assert (
            'edgepack_engine_info{engine="tensorrt",state="loaded",status="engine: loaded"} 1'
        ) in metrics
        want = load_model(NETWORK, "m", "1").run({"input": features(3)}, ["output"])[0]
        np.testing.assert_allclose(infer(url, 3), want.ravel(), rtol=1e-6)
    finally:
        app.ready.clear()
        server.drain(5)
        app.close()
        server.stop()
        model.close()
    assert made.cudart.memory == {}
    assert made.violations == []


def test_metrics_label_values_are_escaped() -> None:
    assert label_value('a "b" \\ c\nd') == 'a \\"b\\" \\\\ c\\nd'


def test_the_batcher_merges_requests_for_the_engine_when_the_batch_axis_is_declared(
    standins: Any, tmp_path: Path
) -> None:
    made = standins("10.3.0")
    install_plan(tmp_path, key_for())
    config = engine_config(tmp_path, key_for())
    model, status = load_served_model(config)
    # A plan keeps no dimension names: without batch_axis the batcher is refused, as for an
    # ONNX model whose first axis is not named a batch.
    unbatched = App(RuntimeConfig(model_name="m", model_path=NETWORK, max_batch_size=4), model)
    assert unbatched.batcher is None
    unbatched.close()
    settings = RuntimeConfig(
        model_name="m", model_path=NETWORK, max_batch_size=4, batch_axis=0, engine=config.engine
    )
    app = App(settings, model, status)
    assert app.batcher is not None
    app.ready.set()
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [0.5] * 8}]}
    ).encode()
    reply = app.handle("POST", "/v2/models/m/infer", {}, body)
    assert reply.status == 200
    want = load_model(NETWORK, "m", "1").run(
        {"input": np.full((2, 4), 0.5, np.float32)}, ["output"]
    )
    got = json.loads(reply.body)["outputs"][0]["data"]
    np.testing.assert_allclose(got, want[0].ravel(), rtol=1e-6)
    app.close()
    model.close()
    assert made.violations == []
