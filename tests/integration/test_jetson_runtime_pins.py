"""The runtime serves with exactly the onnxruntime / numpy versions each JetPack image ships.

A JetPack 5 image runs packager/runtime on CPython 3.8 with onnxruntime 1.19.2 and numpy 1.24.4,
a JetPack 6 image on CPython 3.10 with onnxruntime 1.23.2 and numpy 2.2.6
(packager/backends/jetson/container.py WHEEL_PINS); the rest of the suite runs the runtime with
requirements.txt's much newer pins. For each pinned generation this test

- plans the shipped Jetson target of that generation (a TEST-ONLY copy whose ``runtime.base``
  carries a made-up digest, as nothing is pulled) and takes the wheels and the runtime.json that
  the bundle would ship;
- makes a throwaway venv with exactly those onnxruntime / numpy pins (``--no-deps``, as the image
  installs them), cached for the test session under its tmp directory (never in the repo);
- starts packager/runtime, copied as ``edgepack_runtime`` as images do, with that runtime.json
  (model path, loopback address and engines directory rewritten) on mnist, and checks ready, one
  real inference, the health report's "engine: absent, fallback: onnxruntime-cpu" and that the
  served process mapped the venv's onnxruntime and numpy (/proc/PID/maps);
- re-measures, with the venv's onnxruntime, the IR / opset limits the build's runtime-compat step
  holds for that release (packager/models/runtime_compat.py ONNXRUNTIME_SUPPORT): each limit
  loads, one above it does not.

STAND-IN, named as such: the INTERPRETER. No CPython 3.8 or 3.10 exists on this machine (Debian
12 ships 3.11 only; nothing else is reachable), so the venvs use this machine's CPython 3.11 and
the cp311 x86_64 wheels of the SAME onnxruntime / numpy releases (both pins publish them). The
libraries' Python APIs and behaviour are the real pinned ones; the builds are not the cp38/cp310
aarch64 ones the device runs, and the interpreter is not 3.8/3.10 (that the runtime's code keeps
to 3.8 is checked statically by tests/unit/runtime/test_min_python.py). No TensorRT, no GPU: the
engine is absent and the explicit onnxruntime-cpu fallback serves.

Measured on this 2-core machine, both generations: 19 s with pip's cache off (the two venvs 11 s,
about 64 MB of wheels from PyPI), 13 s with it warm; the test asserts no timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from packager.backends.base import BuildRequest
from packager.backends.jetson.backend import JetsonBackend, JetsonPayload
from packager.backends.jetson.container import WHEEL_PINS
from packager.models import inspect_model
from packager.models.runtime_compat import support_for
from packager.resources import targets_dir
from packager.targets import load_target_file
from tests.integration.runtime_helpers import install_as_edgepack_runtime, wait_ready
from tests.ports import free_port_in
from tests.process_guard import Processes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MNIST = Path("/work/shared/testdata/onnx/mnist.onnx")
PORTS = range(19800, 19900)
# The shipped target of each pinned generation: CPython of its base -> target name.
GENERATIONS = {"3.8": "jetson-xavier-nx", "3.10": "jetson-orin-nano"}
DIGEST = "ab" * 32  # made up: the plan pulls nothing


def test_every_pinned_generation_is_covered_here() -> None:
    assert set(GENERATIONS) == set(WHEEL_PINS)


def _planned(python: str, tmp: Path) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(wheel pins, runtime.json) of the shipped target's plan, on a made-up pinned base."""
    name = GENERATIONS[python]
    text = (targets_dir() / f"{name}.toml").read_text()
    line = f'base = "{tomllib.loads(text)["runtime"]["base"]}"'
    assert text.count(line) == 1
    tmp.mkdir(parents=True, exist_ok=True)
    copy = tmp / f"{name}.toml"
    copy.write_text(text.replace(line, f'{line[:-1]}@sha256:{DIGEST}"'))
    target = load_target_file(copy)
    model = inspect_model(MNIST)
    backend = JetsonBackend()
    request = BuildRequest(model=MNIST, target=target.source)
    payload = backend.plan(request, model, target, backend.fit(request, model, target)).payload
    assert isinstance(payload, JetsonPayload)
    assert payload.choice.serving == "tensorrt" and payload.choice.python == python
    wheels = payload.image.wheels
    assert wheels is not None and wheels.python_version == python
    layer = next(layer for layer in payload.image.layers if layer.name == "model")
    entry = next(f for f in layer.files if f.dest.endswith("/runtime.json"))
    assert isinstance(entry.source, bytes)
    config: dict[str, Any] = json.loads(entry.source)
    return wheels.requirements, config


@pytest.fixture(scope="session")
def pinned_venvs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, float]]:
    """{python: (venv interpreter, seconds to make it)}: one venv per pinned generation, made
    with this machine's CPython 3.11 (the STAND-IN interpreter) and the generation's exact pins."""
    root = tmp_path_factory.mktemp("jetson-pinned-venvs")
    made = {}
    for python, pins in sorted(WHEEL_PINS.items()):
        started = time.monotonic()
        venv = root / f"cp{python.replace('.', '')}-pins"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                       timeout=300)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
             "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--no-deps", *pins],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        made[python] = (venv / "bin" / "python", time.monotonic() - started)
    return made


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as reply:
        return json.loads(reply.read())


@pytest.mark.parametrize("python", sorted(GENERATIONS))
def test_the_runtime_serves_mnist_with_the_generations_exact_onnxruntime_and_numpy(
    python: str, pinned_venvs: dict[str, tuple[Path, float]], tmp_path: Path,
    processes: Processes,
) -> None:  # fmt: skip
    started = time.monotonic()
    pins, config = _planned(python, tmp_path / "target")
    interpreter, venv_s = pinned_venvs[python]
    assert pins == WHEEL_PINS[python]
    versions = json.loads(subprocess.run(
        [str(interpreter), "-c", "import json, numpy, onnxruntime; print(json.dumps("
         "{'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__}))"],
        capture_output=True, text=True, timeout=120, check=True).stdout)  # fmt: skip
    assert sorted(f"{k}=={v}" for k, v in versions.items()) == sorted(pins)

    root = install_as_edgepack_runtime(tmp_path / "image")
    engines = tmp_path / "engines"
    engines.mkdir()
    config.update(model_path=str(MNIST), host="127.0.0.1", port=free_port_in(PORTS))
    assert config["engine"]["fallback"] == "onnxruntime-cpu"
    config["engine"]["engines_dir"] = str(engines)  # empty: no plan, as before first boot's build
    config_path = tmp_path / "runtime.json"
    config_path.write_text(json.dumps(config))
    log_path = tmp_path / "runtime.log"
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}  # fmt: skip
    env["PYTHONPATH"] = str(root)
    with log_path.open("wb") as log:
        process = processes.own(subprocess.Popen(
            [str(interpreter), "-m", "edgepack_runtime.server", "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=root, env=env))
    port = wait_ready(process, log_path)
    url = f"http://127.0.0.1:{port}"

    report = _get(f"{url}/v2/health/report")
    assert report["engine"] == "engine: absent, fallback: onnxruntime-cpu"
    eight = np.loadtxt(MNIST.parent / "media" / "mnist_28.csv", delimiter=",", dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "Input3", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                   "data": eight.ravel().tolist()}]})  # fmt: skip
    request = urllib.request.Request(f"{url}/v2/models/{config['model_name']}/infer",
                                     data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        outputs = json.loads(reply.read())["outputs"]
    assert outputs[0]["shape"] == [1, 10]
    assert int(np.argmax(outputs[0]["data"])) == 8
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
        assert 'state="absent"' in reply.read().decode()
    # The serving process runs the venv's libraries, not the suite's.
    maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    mapped = {fields[5] for fields in map(str.split, maps) if len(fields) == 6}
    numpy_core = "numpy/core/" if versions["numpy"].startswith("1.") else "numpy/_core/"
    for library in ("onnxruntime/capi/onnxruntime_pybind11_state",
                    f"{numpy_core}_multiarray_umath"):
        (path,) = [p for p in mapped if library in p]
        assert path.startswith(str(interpreter.parent.parent / "lib")), path
    process.terminate()
    assert process.wait(timeout=30) == 0, log_path.read_text()[-2000:]
    print(f"CPython {python} pins {', '.join(pins)}: venv {venv_s:.1f}s, "
          f"served and checked in {time.monotonic() - started:.1f}s")


_LOADS = """
import json, sys
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 4
found = {}
for path in sys.argv[1:]:
    try:
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        found[path] = True
    except Exception:
        found[path] = False
print(json.dumps(found))
"""


@pytest.mark.parametrize("python", sorted(GENERATIONS))
def test_the_recorded_limits_of_the_pinned_onnxruntime_are_what_it_loads(
    python: str, pinned_venvs: dict[str, tuple[Path, float]], tmp_path: Path
) -> None:
    from onnx import TensorProto, helper

    (pin,) = [p for p in WHEEL_PINS[python] if p.startswith("onnxruntime==")]
    support = support_for(pin.partition("==")[2])

    def relu(ir: int, opset: int, extra: tuple[tuple[str, int], ...] = ()) -> str:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
        opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = ir
        path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
        path.write_bytes(model.SerializeToString())
        return str(path)

    top_opset = support.max_opset("")
    assert top_opset is not None
    expected = {
        relu(support.max_ir_version, 17): True,
        relu(support.max_ir_version + 1, 17): False,
        relu(10, top_opset): True,
        relu(10, top_opset + 1): False,
    }
    for domain, limit in support.max_opsets[1:]:
        expected[relu(10, 17, ((domain, limit),))] = True
        expected[relu(10, 17, ((domain, limit + 1),))] = False
    interpreter, _ = pinned_venvs[python]
    proc = subprocess.run([str(interpreter), "-c", _LOADS, *expected], capture_output=True,
                          text=True, timeout=300, check=True)
    assert json.loads(proc.stdout) == expected
