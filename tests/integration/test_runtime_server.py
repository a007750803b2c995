"""The runtime as a real process on loopback, driven by tritonclient (a client nobody here wrote)
and by raw HTTP for the malformed requests a real client would never send."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.integration.runtime_helpers import (
    IDENTITY_TENSORS,
    TESTDATA,
    RuntimeProcess,
    identity_model,
    install_as_edgepack_runtime,
    launch,
    runtime_factory,  # noqa: F401  (a fixture: importing it makes it available here)
    scrape,
    start_runtime,
    wait_ready,
    write_config,
)

pytestmark = pytest.mark.integration

MNIST = TESTDATA / "onnx" / "mnist.onnx"
NETWORK = TESTDATA / "onnx" / "Network.onnx"


def mnist_digit() -> np.ndarray[Any, Any]:
    text = (TESTDATA / "onnx" / "media" / "mnist_28.csv").read_text()
    values = [float(v) for v in text.replace("\n", ",").split(",") if v.strip()]
    return np.asarray(values, dtype=np.float32).reshape(1, 1, 28, 28)


def mnist_expected() -> np.ndarray[Any, Any]:
    lines = (TESTDATA / "onnx" / "expected" / "Mnist_8_input_CPU.csv").read_text().splitlines()
    return np.asarray([float(line.split(",")[1]) for line in lines[1:]], dtype=np.float32)


def assert_mnist_scores(scores: np.ndarray[Any, Any]) -> None:
    expected = mnist_expected()
    assert scores.shape == (1, 10)
    # The reference came from another build of onnxruntime: relative 1e-3 of the score range.
    np.testing.assert_allclose(
        scores[0], expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max())
    )
    assert int(np.argmax(scores)) == 8


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    runtime = start_runtime(
        tmp_path_factory.mktemp("mnist"), MNIST, "mnist", max_request_bytes=1 << 20
    )
    yield runtime
    assert runtime.stop() == 0


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    runtime = start_runtime(tmp_path_factory.mktemp("network"), NETWORK, "iris")
    yield runtime
    assert runtime.stop() == 0


def post(
    runtime: RuntimeProcess, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=10)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def test_health_and_metadata_through_tritonclient(mnist: RuntimeProcess) -> None:
    client = triton.InferenceServerClient(mnist.address)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("mnist")
    assert not client.is_model_ready("nonexistent")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("mnist")
    session = ort.InferenceSession(str(MNIST), providers=["CPUExecutionProvider"])
    assert metadata["name"] == "mnist"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in metadata["inputs"]] == [i.name for i in session.get_inputs()]
    assert metadata["inputs"][0]["datatype"] == "FP32"
    assert metadata["inputs"][0]["shape"] == list(session.get_inputs()[0].shape)
    assert metadata["outputs"][0]["name"] == session.get_outputs()[0].name
    assert metadata["outputs"][0]["shape"] == [1, 10]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_mnist_infer_matches_reference_scores(mnist: RuntimeProcess, binary: bool) -> None:
    client = triton.InferenceServerClient(mnist.address)
    tensor = triton.InferInput("Input3", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist_digit(), binary_data=binary)
    output = triton.InferRequestedOutput("Plus214_Output_0", binary_data=binary)
    result = client.infer("mnist", [tensor], outputs=[output], request_id="req-7")
    response = result.get_response()
    assert response["model_name"] == "mnist"
    assert response["model_version"] == "1"
    assert response["id"] == "req-7"
    assert ("parameters" in response["outputs"][0]) is binary
    assert_mnist_scores(result.as_numpy("Plus214_Output_0"))


def test_infer_without_requested_outputs_and_with_version(mnist: RuntimeProcess) -> None:
    client = triton.InferenceServerClient(mnist.address)
    tensor = triton.InferInput("Input3", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist_digit())
    result = client.infer("mnist", [tensor], model_version="1")
    assert_mnist_scores(result.as_numpy("Plus214_Output_0"))
    with pytest.raises(InferenceServerException, match="unknown version '2'"):
        client.infer("mnist", [tensor], model_version="2")
    with pytest.raises(InferenceServerException, match="unknown model 'digits'"):
        client.infer("digits", [tensor])


def _mnist_request(**override: Any) -> dict[str, Any]:
    tensor = {
        "name": "Input3",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "data": mnist_digit().ravel().tolist(),
    }
    tensor.update(override)
    return {"inputs": [tensor]}


def _json(document: Any) -> Callable[[], tuple[bytes, dict[str, str]]]:
    return lambda: (json.dumps(document() if callable(document) else document).encode(), {})


def _raw(
    body: bytes, headers: dict[str, str] | None = None
) -> Callable[[], tuple[bytes, dict[str, str]]]:
    return lambda: (body, headers or {})


def _binary_past_end() -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "Input3",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 784 * 4},
                }
            ]
        }
    ).encode()
    body = header + mnist_digit().tobytes()[:-4]
    return body, {"Inference-Header-Content-Length": str(len(header))}


def _with_header_length(value: str) -> Callable[[], tuple[bytes, dict[str, str]]]:
    return lambda: (
        json.dumps(_mnist_request()).encode(),
        {"Inference-Header-Content-Length": value},
    )


INFER = "/v2/models/mnist/infer"
# (id, path, body builder, status, the message the error must contain)
MALFORMED: list[tuple[str, str, Callable[[], tuple[bytes, dict[str, str]]], int, str]] = [
    ("malformed-json", INFER, _raw(b'{"inputs": ['), 400, "malformed JSON"),
    ("not-utf8", INFER, _raw(b"\xff\xfe"), 400, "malformed JSON"),
    ("not-object", INFER, _raw(b"[1, 2]"), 400, "JSON object"),
    ("no-inputs", INFER, _raw(b"{}"), 400, "expected: Input3 (FP32 [1,1,28,28])"),
    (
        "wrong-input-name",
        INFER,
        _json(lambda: _mnist_request(name="image")),
        400,
        "unknown input 'image'; the model's inputs are: Input3 (FP32 [1,1,28,28])",
    ),
    (
        "wrong-datatype",
        INFER,
        _json(lambda: _mnist_request(datatype="INT64")),
        400,
        'expected datatype FP32, got "INT64"',
    ),
    (
        "wrong-shape",
        INFER,
        _json(lambda: _mnist_request(shape=[1, 784])),
        400,
        "expected shape [1,1,28,28] (-1 = any size), got [1,784]",
    ),
    (
        "negative-shape",
        INFER,
        _json(lambda: _mnist_request(shape=[1, 1, -28, 28])),
        400,
        "shape must be a list of non-negative integers",
    ),
    (
        "wrong-element-count",
        INFER,
        _json(lambda: _mnist_request(data=[0.0] * 783)),
        400,
        "shape [1,1,28,28] needs 784 elements, got 783",
    ),
    (
        "strings-as-data",
        INFER,
        _json(lambda: _mnist_request(data=["x"] * 784)),
        400,
        "'data' must hold only numbers for FP32",
    ),
    (
        "booleans-for-fp32",
        INFER,
        _json(lambda: _mnist_request(data=[True] * 784)),
        400,
        "FP32 needs numbers in 'data'",
    ),
    (
        "no-data",
        INFER,
        _json({"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}),
        400,
        "needs 'data'",
    ),
    (
        "input-twice",
        INFER,
        _json(lambda: {"inputs": _mnist_request()["inputs"] * 2}),
        400,
        "input 'Input3' is given twice",
    ),
    (
        "unknown-output",
        INFER,
        _json(lambda: {**_mnist_request(), "outputs": [{"name": "probabilities"}]}),
        400,
        "unknown output 'probabilities'; the model's outputs are: Plus214_Output_0",
    ),
    (
        "binary-past-end",
        INFER,
        _binary_past_end,
        400,
        "binary_data_size 3136 runs past the end of the body",
    ),
    (
        "bad-header-length",
        INFER,
        _with_header_length("many"),
        400,
        "Inference-Header-Content-Length must be an integer",
    ),
    (
        "header-length-too-big",
        INFER,
        _with_header_length("99999999"),
        400,
        "Inference-Header-Content-Length is 99999999 but the body has only",
    ),
    (
        "wrong-model",
        "/v2/models/digits/infer",
        _json(lambda: _mnist_request()),
        404,
        "unknown model 'digits'; this runtime serves 'mnist'",
    ),
    ("unknown-endpoint", "/v2/repository/index", _raw(b"{}"), 404, "no such endpoint"),
    ("post-to-metadata", "/v2/models/mnist", _raw(b"{}"), 405, "accepts GET, not POST"),
    # The limit is mnist's largest valid request (784 x 26 + 65536), under max_request_bytes.
    (
        "too-large",
        INFER,
        _raw(b" " * 85921),
        413,
        "the limit is 85920 (the model's largest valid request)",
    ),
    (
        "output-twice",
        INFER,
        _json(lambda: {**_mnist_request(), "outputs": [{"name": "Plus214_Output_0"}] * 2}),
        400,
        "output 'Plus214_Output_0' is requested twice",
    ),
    (
        "nan-literal",
        INFER,
        _raw(json.dumps(_mnist_request(data=[float("nan")] * 784)).encode()),
        400,
        "malformed JSON request: NaN is not a JSON number",
    ),
    (
        "huge-integer",
        INFER,
        _raw(b'{"inputs":[{"name":"Input3","shape":[' + b"9" * 5000 + b"]}]}"),
        400,
        "malformed JSON request: a number is out of range",
    ),
    (
        "huge-dimension",
        INFER,
        _json(lambda: _mnist_request(shape=[10**4000, 1, 28, 28])),
        400,
        "expected shape [1,1,28,28] (-1 = any size), got [1000000000",
    ),
    (
        "deep-json",
        INFER,
        _raw(b'{"inputs":' + b"[" * 40_000 + b"]" * 40_000 + b"}"),
        400,
        "malformed JSON request: nested too deeply",
    ),
    (
        "header-length-5000-digits",
        INFER,
        _with_header_length("9" * 5000),
        400,
        "Inference-Header-Content-Length must be an integer",
    ),
]


@pytest.mark.parametrize(
    ("path", "build", "status", "message"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_requests_get_a_clear_error(
    mnist: RuntimeProcess,
    path: str,
    build: Callable[[], tuple[bytes, dict[str, str]]],
    status: int,
    message: str,
) -> None:
    body, headers = build()
    got_status, document = post(mnist, path, body, headers)
    assert (got_status, list(document)) == (status, ["error"])
    assert message in document["error"]
    assert len(document["error"]) <= 512  # short: never the client's input repeated whole
    # Nothing a client sends takes the server down.
    assert mnist.process.poll() is None
    assert triton.InferenceServerClient(mnist.address).is_server_ready()


RAW_HEADS: list[tuple[str, bytes, int, bytes]] = [
    (
        "content-length-5000-digits",
        b"POST /v2/health/live HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        413,
        b"Content-Length has 5000 digits",
    ),
    ("bare-lf", b"GET /v2/health/live HTTP/1.1\nHost: x\n\n", 400, b"a bare LF"),
    (
        "bare-lf-in-value",
        b"GET /v2/health/live HTTP/1.1\r\nX-A: 1\nX-B: 2\r\n\r\n",
        400,
        b"a bare LF",
    ),
    (
        "nul-in-header",
        b"GET /v2/health/live HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        400,
        b"control byte 0x00",
    ),
    ("nul-in-target", b"GET /v2/health\x00/live HTTP/1.1\r\n\r\n", 400, b"control byte 0x00"),
    (
        "space-in-name",
        b"GET /v2/health/live HTTP/1.1\r\nX A: 1\r\n\r\n",
        400,
        b"malformed header line",
    ),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [case[1:] for case in RAW_HEADS],
    ids=[case[0] for case in RAW_HEADS],
)
def test_malformed_heads_get_a_4xx_and_a_close(
    mnist: RuntimeProcess, request_bytes: bytes, status: int, message: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", mnist.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and message in body and len(body) < 600
    assert triton.InferenceServerClient(mnist.address).is_server_ready()


def test_nan_outputs_are_refused_as_json_and_carried_as_binary(tmp_path: Path) -> None:
    """JSON has no NaN or Infinity: such an output is refused as JSON (400, the server stays
    ready) and comes back exactly as a binary tensor."""
    model = identity_model(tmp_path / "identity.onnx")
    runtime = start_runtime(tmp_path / "rt", model, "identity")
    try:
        special = np.asarray([np.nan, np.inf, 1.0], dtype=np.float64)
        inputs = []
        for name, _, shape, datatype in IDENTITY_TENSORS:
            dims = [3] if name == "wide" else [1 if d is None else d for d in shape]
            tensor = triton.InferInput(name, dims, datatype)
            zeros = np.zeros(dims, dtype=triton_dtype(datatype))
            tensor.set_data_from_numpy(special if name == "wide" else zeros, binary_data=True)
            inputs.append(tensor)
        client = triton.InferenceServerClient(runtime.address)
        as_json = triton.InferRequestedOutput("wide_out", binary_data=False)
        with pytest.raises(InferenceServerException, match="holds NaN or infinite values"):
            client.infer("identity", inputs, outputs=[as_json])
        as_binary = triton.InferRequestedOutput("wide_out", binary_data=True)
        result = client.infer("identity", inputs, outputs=[as_binary]).as_numpy("wide_out")
        np.testing.assert_array_equal(result, special)
        assert client.is_server_ready()
    finally:
        assert runtime.stop() == 0


def test_binary_input_with_json_output_on_one_keepalive_connection(mnist: RuntimeProcess) -> None:
    header = json.dumps(
        {
            "id": "a",
            "inputs": [
                {
                    "name": "Input3",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 784 * 4},
                }
            ],
            "outputs": [{"name": "Plus214_Output_0", "parameters": {"binary_data": False}}],
        }
    ).encode()
    body = header + mnist_digit().astype("<f4").tobytes()
    connection = http.client.HTTPConnection("127.0.0.1", mnist.port, timeout=10)
    sockets = set()
    try:
        for _ in range(3):
            connection.request(
                "POST",
                "/v2/models/mnist/infer",
                body=body,
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
            reply = connection.getresponse()
            document = json.loads(reply.read())
            assert reply.status == 200
            assert reply.getheader("Content-Type") == "application/json"
            sockets.add(id(connection.sock))
            scores = np.asarray(document["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
            assert_mnist_scores(scores)
    finally:
        connection.close()
    assert len(sockets) == 1  # HTTP/1.1 keep-alive: one connection served all three


def test_request_without_content_length_is_refused(mnist: RuntimeProcess) -> None:
    with socket.create_connection(("127.0.0.1", mnist.port), timeout=10) as raw:
        raw.sendall(
            b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        reply = b""
        while chunk := raw.recv(65536):  # the runtime closes the connection after a 411
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 411")
    assert b"send Content-Length" in reply


def test_dynamic_batch_of_three_matches_onnxruntime(network: RuntimeProcess) -> None:
    client = triton.InferenceServerClient(network.address)
    metadata = client.get_model_metadata("iris")
    assert metadata["inputs"][0]["shape"] == [-1, 4]
    features = np.asarray(
        [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3]], dtype=np.float32
    )
    name = metadata["inputs"][0]["name"]
    tensor = triton.InferInput(name, [3, 4], "FP32")
    tensor.set_data_from_numpy(features)
    result = client.infer("iris", [tensor])
    session = ort.InferenceSession(str(NETWORK), providers=["CPUExecutionProvider"])
    expected = session.run(None, {name: features})[0]
    got = result.as_numpy(metadata["outputs"][0]["name"])
    assert got.shape == (3, expected.shape[1])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_dtype_the_model_uses_round_trips_through_tritonclient(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
    tmp_path: Path,
    binary: bool,
) -> None:
    runtime = runtime_factory(identity_model(tmp_path / "identity.onnx"), "identity")
    client = triton.InferenceServerClient(runtime.address)
    metadata = client.get_model_metadata("identity")
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [
        (name, datatype) for name, _, _, datatype in IDENTITY_TENSORS
    ]
    rng = np.random.default_rng(0)
    arrays = {}
    tensors = []
    for name, _, shape, datatype in IDENTITY_TENSORS:
        concrete = [3 if d is None else d for d in shape]
        dtype = triton_dtype(datatype)
        if datatype == "BOOL":
            array = rng.integers(0, 2, concrete).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            array = rng.integers(info.min, info.max, concrete, dtype=dtype, endpoint=True)
        else:
            array = rng.standard_normal(concrete).astype(dtype)
        arrays[name] = array
        tensor = triton.InferInput(name, concrete, datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    outputs = [triton.InferRequestedOutput(f"{n}_out", binary_data=binary) for n in arrays]
    result = client.infer("identity", tensors, outputs=outputs)
    for name, array in arrays.items():
        got = result.as_numpy(f"{name}_out")
        assert got.dtype == array.dtype
        np.testing.assert_array_equal(got, array)


def triton_dtype(datatype: str) -> np.dtype[Any]:
    from tritonclient.utils import triton_to_np_dtype

    return np.dtype(triton_to_np_dtype(datatype))


def test_sigterm_exits_zero_and_logs_each_event_as_one_json_line(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    runtime = runtime_factory(NETWORK, "iris")
    assert triton.InferenceServerClient(runtime.address).is_server_ready()
    # An idle keep-alive connection must not hold the shutdown up.
    idle = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=10)
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read() == b'{"live":true}'
    runtime.signal(signal.SIGTERM)
    assert runtime.process.wait(10) == 0
    idle.close()
    events = [entry["event"] for entry in runtime.events()]
    assert events[:2] == ["listening", "ready"]
    assert events[-2:] == ["signal", "stopped"]
    assert runtime.events()[-1]["drained"] is True


def test_runs_as_the_edgepack_runtime_package_with_healthcheck(tmp_path: Path) -> None:
    site = install_as_edgepack_runtime(tmp_path / "site")
    config = write_config(tmp_path, NETWORK, "iris")
    process, log = launch(
        config, tmp_path / "runtime.log", module="edgepack_runtime.server", pythonpath=site
    )
    try:
        port = wait_ready(process, tmp_path / "runtime.log")
        env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
        check = [sys.executable, "-m", "edgepack_runtime.healthcheck"]
        assert subprocess.run([*check, "--port", str(port)], env=env, cwd=site).returncode == 0
        # Without --port the port comes from the config named by the environment.
        config.write_text(json.dumps({**json.loads(config.read_text()), "port": port}))
        env_with_config = {**env, "EDGEPACK_RUNTIME_CONFIG": str(config)}
        assert subprocess.run(check, env=env_with_config, cwd=site).returncode == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert subprocess.run([*check, "--port", str(port)], env=env, cwd=site).returncode == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.parametrize(
    ("config", "code", "message"),
    [
        ({"model_name": "m", "model_path": str(MNIST), "batch": 4}, 2, "unknown key 'batch'"),
        ({"model_name": "m", "model_path": str(MNIST), "port": "80"}, 2, "port must be an integer"),
        (
            {"model_name": "m", "model_path": "missing.onnx"},
            3,
            "missing.onnx: model file not found",
        ),
    ],
    ids=["unknown-key", "port-type", "model-missing"],
)
def test_bad_config_exits_nonzero_with_one_line(
    tmp_path: Path, config: dict[str, Any], code: int, message: str
) -> None:
    path = tmp_path / "runtime.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "packager.runtime.server", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in json.loads(lines[0])["message"]


# ---- Phase 2: metrics, batching, queue bound, cache, sd_notify, faults, load -------------------


def _iris_rows(count: int, seed: int = 1) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).uniform(0, 8, (count, 4)).astype(np.float32)


def _iris_infer(runtime: RuntimeProcess, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    client = triton.InferenceServerClient(runtime.address)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    result = client.infer(runtime.model_name, [tensor])
    client.close()
    return result.as_numpy("output")  # type: ignore[no-any-return]


def test_metrics_and_health_report_count_what_happened(mnist: RuntimeProcess) -> None:
    before = scrape(mnist)
    ok_key = 'edgepack_requests_total{endpoint="infer",code="200"}'
    bad_key = 'edgepack_requests_total{endpoint="infer",code="400"}'
    client = triton.InferenceServerClient(mnist.address)
    tensor = triton.InferInput("Input3", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist_digit())
    for _ in range(5):
        client.infer("mnist", [tensor])
    post(mnist, INFER, b"{")
    after = scrape(mnist)
    assert after[ok_key] - before.get(ok_key, 0) == 5
    assert after[bad_key] - before.get(bad_key, 0) == 1
    count = "edgepack_request_duration_seconds_count"
    assert after[count] - before.get(count, 0) == 6
    assert after['edgepack_request_duration_seconds_bucket{le="+Inf"}'] == after[count]
    assert after["edgepack_model_ready"] == 1
    assert after["process_resident_memory_bytes"] > 10 << 20
    assert after["process_cpu_seconds_total"] > 0
    report = json.loads(http_get(mnist, "/v2/health/report"))
    assert report["ready"] is True
    assert report["model"]["name"] == "mnist"
    assert report["errors"] >= 1
    assert report["infer_requests"] == after[count]


def http_get(runtime: RuntimeProcess, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


def test_concurrent_clients_are_merged_into_batches(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    runtime = runtime_factory(NETWORK, "iris", max_batch_size=32, max_queue_delay_us=200_000)
    requests = [_iris_rows(1 + i % 3, seed=i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda rows: _iris_infer(runtime, rows), requests))
    session = ort.InferenceSession(str(NETWORK), providers=["CPUExecutionProvider"])
    for rows, got in zip(requests, results, strict=True):
        np.testing.assert_allclose(got, session.run(None, {"input": rows})[0], rtol=1e-5)
    metrics = scrape(runtime)
    # Every row went through the model once, in fewer runs than requests (the warm-up run is not
    # counted in these metrics).
    assert metrics["edgepack_batch_size_sum"] == sum(len(rows) for rows in requests)
    assert metrics["edgepack_batch_size_count"] < len(requests)


def test_full_queue_answers_503_with_retry_after_not_a_hang(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    runtime = runtime_factory(
        NETWORK, "iris", max_batch_size=64, max_queue_delay_us=1_500_000, max_queue_size=2
    )
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(_iris_infer, runtime, _iris_rows(1)) for _ in range(2)]
        deadline = time.monotonic() + 5
        while scrape(runtime)["edgepack_queue_depth"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        header = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
        ).encode()
        connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=10)
        connection.request("POST", "/v2/models/iris/infer", body=header)
        reply = connection.getresponse()
        document = json.loads(reply.read())
        connection.close()
        assert time.monotonic() - started < 1.0  # refused at once, not after the queue delay
        assert reply.status == 503
        assert reply.getheader("Retry-After") == "1"
        assert "queue is full" in document["error"]
        assert all(f.result().shape == (1, 3) for f in waiting)
    assert scrape(runtime)["edgepack_queue_rejections_total"] == 1


def test_response_cache_hits_on_repeated_input(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    runtime = runtime_factory(MNIST, "mnist", cache_bytes=1 << 20)
    client = triton.InferenceServerClient(runtime.address)
    tensor = triton.InferInput("Input3", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(mnist_digit())
    first = client.infer("mnist", [tensor]).as_numpy("Plus214_Output_0")
    second = client.infer("mnist", [tensor]).as_numpy("Plus214_Output_0")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    client.infer("mnist", [tensor])
    np.testing.assert_array_equal(first, second)
    assert_mnist_scores(second)
    metrics = scrape(runtime)
    assert (metrics["edgepack_cache_hits_total"], metrics["edgepack_cache_misses_total"]) == (1, 2)
    assert metrics["edgepack_batch_size_count"] == 2  # the hit did not run the model
    assert 0 < metrics["edgepack_cache_bytes"] <= 1 << 20


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))  # AF_UNIX paths are short
    address = str(directory / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(10)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
        runtime = start_runtime(tmp_path, NETWORK, "iris", env_extra=env)
        try:
            messages = [listener.recv(256).decode() for _ in range(3)]
            assert messages[0] == "READY=1"
            assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
            assert runtime.stop() == 0
            rest = []
            while (message := listener.recv(256).decode()) != "STOPPING=1":
                rest.append(message)
            assert set(rest) <= {"WATCHDOG=1"}
        finally:
            runtime.stop()
            shutil.rmtree(directory, ignore_errors=True)


def test_sigterm_during_load_drains_in_flight_requests(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    runtime = runtime_factory(NETWORK, "iris", max_batch_size=64, max_queue_delay_us=800_000)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_iris_infer, runtime, _iris_rows(2, seed=i)) for i in range(6)]
        deadline = time.monotonic() + 5
        while scrape(runtime)["edgepack_queue_depth"] < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        runtime.signal(signal.SIGTERM)
        assert all(f.result(timeout=10).shape == (2, 3) for f in futures)
    assert runtime.process.wait(10) == 0
    last = runtime.events()[-1]
    assert (last["event"], last["drained"], last["abandoned"]) == ("stopped", True, 0)


def test_killed_runtime_is_restarted_by_a_supervisor(tmp_path: Path) -> None:
    runtime = start_runtime(tmp_path / "first", MNIST, "mnist")
    port = runtime.port
    config = json.loads(runtime.config_path.read_text())
    runtime.process.kill()  # a crash: no drain, no cleanup
    runtime.process.wait(10)
    runtime.stop()
    # What systemd's Restart=always does: start the same unit again with the same config.
    restarted = start_runtime(tmp_path / "second", MNIST, "mnist", port=port)
    try:
        assert config["port"] == 0 and restarted.port == port
        client = triton.InferenceServerClient(restarted.address)
        tensor = triton.InferInput("Input3", [1, 1, 28, 28], "FP32")
        tensor.set_data_from_numpy(mnist_digit())
        assert_mnist_scores(client.infer("mnist", [tensor]).as_numpy("Plus214_Output_0"))
    finally:
        assert restarted.stop() == 0


@pytest.mark.slow
def test_load_20000_requests_at_concurrency_32(
    runtime_factory: Callable[..., RuntimeProcess],  # noqa: F811  (the imported fixture)
) -> None:
    total = int(os.environ.get("EDGEPACK_LOAD_REQUESTS", "20000"))
    concurrency = 32
    runtime = runtime_factory(MNIST, "mnist")
    digit = mnist_digit()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "Input3",
                    "shape": [1, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": digit.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + digit.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header))}

    def worker(count: int) -> tuple[int, int]:
        ok = wrong = 0
        connection = http.client.HTTPConnection("127.0.0.1", runtime.port, timeout=30)
        for _ in range(count):
            connection.request("POST", "/v2/models/mnist/infer", body=body, headers=headers)
            reply = connection.getresponse()
            payload = reply.read()
            length = int(reply.getheader("Inference-Header-Content-Length") or 0)
            scores = np.frombuffer(payload[length:], dtype="<f4")
            if reply.status == 200 and scores.size == 10 and int(np.argmax(scores)) == 8:
                ok += 1
            else:
                wrong += 1
        connection.close()
        return ok, wrong

    warm = worker(500)
    assert warm == (500, 0)
    rss_after_warm_up = scrape(runtime)["process_resident_memory_bytes"]
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
        outcomes = list(pool.map(worker, shares))
    elapsed = time.monotonic() - started
    rss_end = scrape(runtime)["process_resident_memory_bytes"]
    print(
        f"\n{total} requests, concurrency {concurrency}: {elapsed:.1f}s, "
        f"{total / elapsed:.0f} req/s; RSS {rss_after_warm_up / 2**20:.1f} -> "
        f"{rss_end / 2**20:.1f} MiB"
    )
    assert sum(ok for ok, _ in outcomes) == total
    assert sum(wrong for _, wrong in outcomes) == 0
    assert rss_end < rss_after_warm_up * 1.10
