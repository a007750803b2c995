"""The on-device runtime against the in-process floor and against MLServer, in one run.

    .venv/bin/python benchmarks/runtime.py [--requests 2000] [--latency-requests 1000]
        [--mlserver-workers 1] [--intra-op-threads 0]

Prints (issue 3's acceptance), all with the same client and the same request bodies:
  (a) p50/p99 latency at concurrency 1 for mnist: ``InferenceSession.run`` in-process (the floor),
      the edgepack runtime, MLServer;
  (b) throughput at concurrency 1, 8 and 32, with and without dynamic batching. mnist.onnx has a
      fixed batch dimension of 1, so the batching rows use Network.onnx (float32 [N,4] -> [N,3]);
  (c) the same workloads against MLServer serving the same ONNX files through a minimal custom
      model class that calls onnxruntime (benchmarks/mlserver_model.py).

The client: one thread per concurrent request, each with its own keep-alive ``http.client``
connection, sending Open Inference Protocol v2 JSON (MLServer's REST API has no binary tensors);
every response is checked against the in-process result. Each cell is warmed up first, request
counts are bounded. All servers run on loopback with onnxruntime's default session options.

MLServer comes from PyPI into its own virtual environment, benchmarks/.venv/mlserver (gitignored
through the ``.venv/`` pattern), created on first use with ``python3 -m venv`` + pip (uvloop pinned
below 0.22, which breaks MLServer 1.7's worker processes). The client,
the servers and onnxruntime share this machine's CPUs: numbers are noisy on a busy host, compare
ratios within one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
MLSERVER_VENV = ROOT / "benchmarks" / ".venv" / "mlserver"
MLSERVER_MODEL = Path(__file__).resolve().parent / "mlserver_model.py"
CONCURRENCY = (1, 8, 32)
# The same dynamic-batching settings for both servers.
MAX_BATCH = 32
MAX_DELAY_US = 500
# Goals from issue 3.
GOAL_OVERHEAD_MS = 0.5
GOAL_RATIO = 1.5


@dataclass(frozen=True)
class Workload:
    name: str  # the model name on both servers
    path: Path
    input_name: str
    output_name: str
    array: Any  # the request's input, numpy
    expected: Any  # the in-process result, numpy

    def body(self) -> bytes:
        document = {
            "inputs": [
                {
                    "name": self.input_name,
                    "shape": list(self.array.shape),
                    "datatype": "FP32",
                    "data": self.array.ravel().tolist(),
                }
            ],
            "outputs": [{"name": self.output_name}],
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def binary_body(self) -> tuple[bytes, dict[str, str]]:
        """The same request with the input as a binary tensor (the runtime only; not MLServer)."""
        blob = self.array.astype("<f4").tobytes()
        document = {
            "inputs": [
                {
                    "name": self.input_name,
                    "shape": list(self.array.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ],
            "outputs": [{"name": self.output_name}],
        }
        header = json.dumps(document, separators=(",", ":")).encode()
        return header + blob, {"Inference-Header-Content-Length": str(len(header))}

    def correct(self, reply: bytes) -> bool:
        outputs = json.loads(reply)["outputs"]
        data = np.asarray(outputs[0]["data"], dtype=np.float32)
        return data.size == self.expected.size and bool(
            np.allclose(data, self.expected.ravel(), rtol=1e-4, atol=1e-5)
        )


def workloads() -> tuple[Workload, Workload]:
    onnx_dir = TESTDATA / "onnx"
    digit = np.loadtxt(TESTDATA / "onnx" / "media" / "mnist_28.csv", delimiter=",")
    image = digit.astype(np.float32).reshape(1, 1, 28, 28)
    rows = np.random.default_rng(0).uniform(0, 8, size=(1, 4)).astype(np.float32)
    made = []
    for name, path, array in (
        ("mnist", onnx_dir / "mnist.onnx", image),
        ("network", onnx_dir / "Network.onnx", rows),
    ):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        output_name = session.get_outputs()[0].name
        (expected,) = session.run([output_name], {input_name: array})
        made.append(Workload(name, path, input_name, output_name, array, expected))
    return made[0], made[1]


# ---------------------------------------------------------------------------------------- client


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0  # transport errors and non-200 replies
    wrong: int = 0  # 200 with a wrong result

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1000 if self.latencies_s else 0.0


def drive(
    port: int,
    workload: Workload,
    requests: int,
    concurrency: int,
    warmup: int = 20,
    *,
    binary: bool = False,
) -> Result:
    """``requests`` POSTs from ``concurrency`` threads after ``warmup`` per connection."""
    path = f"/v2/models/{workload.name}/infer"
    body = workload.body()
    headers = {"Content-Type": "application/json"}
    if binary:
        body, extra = workload.binary_body()
        headers = {"Content-Type": "application/octet-stream", **extra}
    result = Result()
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]

    def worker(count: int) -> None:
        latencies: list[float] = []
        errors = wrong = 0
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def one() -> tuple[float, bytes | None]:
            nonlocal connection
            began = time.perf_counter()
            try:
                connection.request("POST", path, body, headers)
                reply = connection.getresponse()
                data = reply.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                return time.perf_counter() - began, None
            return time.perf_counter() - began, data if reply.status == 200 else None

        for _ in range(warmup):
            one()
        start.wait()
        for _ in range(count):
            elapsed, data = one()
            if data is None:
                errors += 1
            elif not workload.correct(data):
                wrong += 1
            else:
                latencies.append(elapsed)
        connection.close()
        with lock:
            result.latencies_s.extend(latencies)
            result.errors += errors
            result.wrong += wrong

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in shares]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - began
    return result


def floor(workload: Workload, requests: int, intra_op_threads: int = 0) -> Result:
    """``InferenceSession.run`` in this process: what no server can beat."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(
        str(workload.path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    feeds = {workload.input_name: workload.array}
    for _ in range(50):
        session.run([workload.output_name], feeds)
    result = Result()
    began = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        session.run([workload.output_name], feeds)
        result.latencies_s.append(time.perf_counter() - t0)
    result.wall_s = time.perf_counter() - began
    return result


# --------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def edgepack_runtime(workdir: Path, workload: Workload, **config: Any) -> Iterator[int]:
    """Start ``python -m packager.runtime.server`` on loopback; yields its port."""
    workdir.mkdir(parents=True)
    config_path = workdir / "runtime.json"
    document = {
        "model_name": workload.name,
        "model_path": str(workload.path),
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "info",  # the default; per-request events are debug
        **config,
    }
    config_path.write_text(json.dumps(document), encoding="utf-8")
    log_path = workdir / "runtime.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "packager.runtime.server", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=ROOT,
        )
    try:
        yield _wait_runtime_ready(process, log_path)
    finally:
        _stop(process)


def _wait_runtime_ready(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + 60
    port: int | None = None
    while time.monotonic() < deadline:
        for line in log_path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("event") == "listening":
                port = int(entry["port"])
            elif entry.get("event") == "ready" and port is not None:
                return port
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"edgepack runtime did not start: {log_path.read_text(encoding='utf-8')}")


def ensure_mlserver(venv: Path) -> Path:
    """MLServer's own virtual environment (created when missing); returns its ``mlserver``."""
    executable = venv / "bin" / "mlserver"
    if executable.is_file():
        return executable
    print(f"creating {venv} and installing mlserver from PyPI (a few minutes, once)", flush=True)
    python = shutil.which("python3") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # uvloop 0.22 breaks MLServer 1.7's worker processes ("There is no current event loop"):
    # https://github.com/SeldonIO/MLServer/issues/2286
    subprocess.run([*pip, "mlserver", "onnxruntime", "numpy", "uvloop<0.22"], check=True)
    return executable


def mlserver_version(venv: Path) -> str:
    python = venv / "bin" / "python"
    code = "import importlib.metadata as m; print(m.version('mlserver'))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()


@contextmanager
def mlserver(
    executable: Path,
    workdir: Path,
    models: Sequence[tuple[str, Workload, int]],
    workers: int,
    intra_op_threads: int,
) -> Iterator[int]:
    """One MLServer serving each (name, workload, max_batch_size); yields its HTTP port."""
    workdir.mkdir(parents=True)
    shutil.copy(MLSERVER_MODEL, workdir / "mlserver_model.py")
    port = free_port()
    settings = {
        "debug": False,  # no access log; the runtime logs requests at debug only
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": workers,
        "load_models_at_startup": True,
    }
    (workdir / "settings.json").write_text(json.dumps(settings), encoding="utf-8")
    for name, workload, max_batch in models:
        model_dir = workdir / name
        model_dir.mkdir()
        model_settings: dict[str, Any] = {
            "name": name,
            "implementation": "mlserver_model.OnnxModel",
            "parameters": {
                "uri": str(workload.path),
                "version": "1",
                "extra": {"intra_op_threads": intra_op_threads},
            },
        }
        if max_batch > 1:  # MLServer's adaptive batching
            model_settings["max_batch_size"] = max_batch
            model_settings["max_batch_time"] = MAX_DELAY_US / 1_000_000
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
    log_path = workdir / "mlserver.log"
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(executable), "start", str(workdir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,  # its .metrics and .envs folders go here
            env=env,
        )
    try:
        _wait_mlserver_ready(process, port, [name for name, _, _ in models], log_path)
        yield port
    finally:
        _stop(process)


def _wait_mlserver_ready(
    process: subprocess.Popen[bytes], port: int, names: Sequence[str], log_path: Path
) -> None:
    deadline = time.monotonic() + 180
    pending = list(names)
    while pending and time.monotonic() < deadline and process.poll() is None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", f"/v2/models/{pending[0]}/ready")
            if connection.getresponse().status == 200:
                pending.pop(0)
            connection.close()
        except OSError:
            pass
        time.sleep(0.2)
    if pending:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"MLServer did not get ready (exit {process.poll()}):\n{tail}")


# --------------------------------------------------------------------------------------- report


def _goal(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per throughput cell")
    parser.add_argument("--latency-requests", type=int, default=1000)
    parser.add_argument(
        "--mlserver-workers",
        type=int,
        default=1,
        help="MLServer parallel_workers (its default, 1: inference in one worker process)",
    )
    parser.add_argument("--mlserver-venv", type=Path, default=MLSERVER_VENV)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads for the floor, the runtime and MLServer (0: per core)",
    )
    args = parser.parse_args()
    requests = max(args.requests, max(CONCURRENCY))

    mnist, network = workloads()
    executable = ensure_mlserver(args.mlserver_venv)
    version = mlserver_version(args.mlserver_venv)
    print(
        f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
        f"onnxruntime {ort.__version__}; MLServer {version} (parallel_workers="
        f"{args.mlserver_workers}); onnxruntime intra-op threads {args.intra_op_threads or 'auto'}"
        f" everywhere; client: {max(CONCURRENCY)} threads max, http.client keep-alive, "
        "OIP v2 JSON",
        flush=True,
    )
    batched = {"max_batch_size": MAX_BATCH, "max_queue_delay_us": MAX_DELAY_US}
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp, ExitStack() as servers:
        work = Path(tmp)
        threads = {"intra_op_threads": args.intra_op_threads}
        rt_mnist = servers.enter_context(edgepack_runtime(work / "rt-mnist", mnist, **threads))
        rt_net = servers.enter_context(edgepack_runtime(work / "rt-net", network, **threads))
        rt_net_b = servers.enter_context(
            edgepack_runtime(work / "rt-net-b", network, **threads, **batched)
        )
        ml_models = [("mnist", mnist, 0), ("network", network, 0)]
        ml = servers.enter_context(
            mlserver(
                executable, work / "ml", ml_models, args.mlserver_workers, args.intra_op_threads
            )
        )
        network_b = replace(network, name="network-batched")
        ml_b = servers.enter_context(
            mlserver(
                executable,
                work / "ml-b",
                [("network-batched", network, MAX_BATCH)],
                args.mlserver_workers,
                args.intra_op_threads,
            )
        )

        # (a) latency at concurrency 1, interleaved in halves so drift hits all three alike.
        half = args.latency_requests // 2
        lat: dict[str, Result] = {
            key: Result() for key in ("floor", "runtime", "runtime_binary", "mlserver")
        }
        measures: list[tuple[str, Callable[[], Result]]] = [
            ("floor", lambda: floor(mnist, half, args.intra_op_threads)),
            ("runtime", lambda: drive(rt_mnist, mnist, half, 1)),
            ("runtime_binary", lambda: drive(rt_mnist, mnist, half, 1, binary=True)),
            ("mlserver", lambda: drive(ml, mnist, half, 1)),
        ]
        for _ in range(2):
            for key, measure in measures:
                _merge(lat[key], measure())

        # (b), (c) throughput; runtime and MLServer cells alternate for the same reason.
        rows: list[tuple[str, str, str, int, Workload]] = [
            ("mnist", "edgepack runtime", "off", rt_mnist, mnist),
            ("mnist", f"MLServer {version}", "off", ml, mnist),
            ("Network", "edgepack runtime", "off", rt_net, network),
            ("Network", f"MLServer {version}", "off", ml, network),
            (
                "Network",
                "edgepack runtime",
                f"on ({MAX_BATCH}, {MAX_DELAY_US} us)",
                rt_net_b,
                network,
            ),
            (
                "Network",
                f"MLServer {version}",
                f"adaptive ({MAX_BATCH}, {MAX_DELAY_US} us)",
                ml_b,
                network_b,
            ),
        ]
        cells: dict[tuple[int, int], Result] = {}
        for concurrency in CONCURRENCY:
            for index, (_, _, _, port, workload) in enumerate(rows):
                cells[index, concurrency] = drive(port, workload, requests, concurrency)
    _report(args, lat, rows, cells, requests)


def _merge(total: Result, part: Result) -> None:
    total.latencies_s.extend(part.latencies_s)
    total.wall_s += part.wall_s
    total.errors += part.errors
    total.wrong += part.wrong


def _report(
    args: argparse.Namespace,
    lat: dict[str, Result],
    rows: Sequence[tuple[str, str, str, int, Workload]],
    cells: dict[tuple[int, int], Result],
    requests: int,
) -> None:
    floor_p50 = lat["floor"].percentile_ms(50)
    print()
    print(f"(a) mnist latency at concurrency 1, {args.latency_requests} requests each")
    print(f"{'':<30}{'p50 ms':>9}{'p99 ms':>9}{'p50 over floor':>16}{'errors':>8}")
    names = {
        "floor": "InferenceSession.run (floor)",
        "runtime": "edgepack runtime",
        "mlserver": "MLServer",
        "runtime_binary": "edgepack runtime, binary in",
    }
    for key, label in names.items():
        r = lat[key]
        over = "" if key == "floor" else f"{r.percentile_ms(50) - floor_p50:+.3f} ms"
        print(
            f"{label:<30}{r.percentile_ms(50):>9.3f}{r.percentile_ms(99):>9.3f}{over:>16}"
            f"{r.errors + r.wrong:>8}"
        )
    overhead = lat["runtime"].percentile_ms(50) - floor_p50
    print(
        f"goal: runtime p50 overhead < {GOAL_OVERHEAD_MS} ms (same JSON requests as MLServer): "
        f"{overhead:.3f} ms -> {_goal(overhead < GOAL_OVERHEAD_MS)}"
    )
    print(
        "(the overhead includes the Python client's own HTTP cost; 'binary in' sends the image as "
        "a binary tensor, which MLServer's REST API does not accept, so it is not in the ratios)"
    )

    print()
    print(
        f"(b)+(c) throughput, requests/s ({requests} requests per cell; batching rows use "
        "Network.onnx [N,4]->[N,3] because mnist.onnx has a fixed batch of 1)"
    )
    head = "".join(f"{'c=' + str(c):>9}" for c in CONCURRENCY)
    print(f"{'model':<9}{'server':<20}{'batching':<23}{head}{'p99@32 ms':>11}{'errors':>8}")
    for index, (model, server, batching, _, _) in enumerate(rows):
        rates = "".join(f"{cells[index, c].throughput:>9.0f}" for c in CONCURRENCY)
        bad = sum(cells[index, c].errors + cells[index, c].wrong for c in CONCURRENCY)
        p99 = cells[index, max(CONCURRENCY)].percentile_ms(99)
        print(f"{model:<9}{server:<20}{batching:<23}{rates}{p99:>11.2f}{bad:>8}")

    print()
    print(f"ratios at concurrency {max(CONCURRENCY)} (runtime / MLServer, goal >= {GOAL_RATIO}x):")
    top = max(CONCURRENCY)
    for ours, theirs, label in (
        (0, 1, "mnist, no batching"),
        (2, 3, "Network, no batching"),
        (4, 5, "Network, batching on both"),
        (4, 3, "Network, runtime batching vs MLServer without"),
    ):
        ratio = cells[ours, top].throughput / max(cells[theirs, top].throughput, 1e-9)
        print(f"  {label:<48}{ratio:>6.2f}x  {_goal(ratio >= GOAL_RATIO)}")
    gain = cells[4, top].throughput / max(cells[2, top].throughput, 1e-9)
    print(f"  runtime batching on / off, Network at c={top}:       {gain:>6.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
