"""Untrusted model files never run code on the build host (README, "Security model"): a hostile
torch.save pickle, a .pt2 program carrying a pickled weight, TorchScript whose ``__setstate__``
writes a file, and a Keras model with a Lambda layer, each given to the real CLI in a fresh
process. Each is refused with one line (exit 3) and its payload never runs."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import edgepack
from tests.model_factory import sample_dir

pytestmark = [pytest.mark.integration]

MCU = "stm32f746-disco"


class _Payload:
    """Unpickling this runs os.mkdir(marker): what a hostile model file can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.marker),))


def _refused(proc: Any, model: Path) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 3, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(model) in errors[0] and "refused" in errors[0]
    return errors[0]


def _calibration(root: Path) -> Path:
    if (root / "calibration").is_dir():
        return root / "calibration"
    rows = np.random.default_rng(0).uniform(0, 1, size=(8, 1, 4)).astype(np.float32)
    return sample_dir(root / "calibration", set=rows)


def _build(model: Path, tmp_path: Path, *extra: str) -> Any:
    return edgepack(
        "build", str(model), "--target", MCU, "--calibration", str(_calibration(tmp_path)),
        "--out", str(tmp_path / "bundle"), *extra, check=False,
    )  # fmt: skip


def _optimize(model: Path, tmp_path: Path, *extra: str) -> Any:
    return edgepack(
        "optimize", str(model), "--quantize", "int8-dynamic", "--input-shape", "x=1,4",
        "--out", str(tmp_path / "optimized"), *extra, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["build", "optimize"])
def test_a_hostile_pickle_is_refused_without_unpickling(command: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    model = tmp_path / "evil.pt"
    model.write_bytes(pickle.dumps(_Payload(marker)))
    proc = (_build if command == "build" else _optimize)(model, tmp_path)
    line = _refused(proc, model)
    assert "torch.save pickle" in line and "runs code" in line
    assert "--trust-model-code" in line and "torch.onnx.export" in line
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "optimized").exists()


def test_the_flag_is_the_builders_word_and_only_that(tmp_path: Path) -> None:
    """With --trust-model-code the file is loaded as before: the payload runs (this is what
    the flag vouches for) and the file, no torch.save archive, is an input error."""
    marker = tmp_path / "ran"
    model = tmp_path / "evil.pt"
    model.write_bytes(pickle.dumps(_Payload(marker)))
    proc = _optimize(model, tmp_path, "--trust-model-code")
    assert proc.returncode == 3 and "PyTorch could not read" in proc.stderr
    assert marker.exists()


def _pt2_with_pickled_weight(tmp_path: Path, marker: Path) -> Path:
    """A real torch.export.save program whose weights config marks a weight ``use_pickle``,
    that weight's bytes replaced by a hostile pickle: torch 2.13 torch.load()s it with
    weights_only=False (torch/export/pt2_archive/_package.py, _load_state_dict)."""
    torch = pytest.importorskip("torch")
    good = tmp_path / "good.pt2"
    net = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(1, 4),)), str(good))
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data/weights/model_weights_config.json"):
                config = json.loads(data)
                entry = next(iter(config["config"].values()))
                entry["use_pickle"] = True
                data = json.dumps(config).encode()
                target = entry["path_name"]
            dst.writestr(item, data)
    with zipfile.ZipFile(evil) as src, zipfile.ZipFile(tmp_path / "x.pt2", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(f"/data/weights/{target}"):
                data = pickle.dumps(_Payload(marker))
            dst.writestr(item, data)
    return tmp_path / "x.pt2"


def test_a_pt2_program_is_refused_and_inspected_without_loading(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    model = _pt2_with_pickled_weight(tmp_path, marker)
    line = _refused(_optimize(model, tmp_path), model)
    assert "torch.export program" in line
    assert not marker.exists()
    # inspect reads the program's JSON, never torch.export.load
    proc = edgepack("inspect", str(model), "--json")
    info = json.loads(proc.stdout)
    assert info["format"] == "pytorch" and info["param_count"] == 4 * 2 + 2
    assert [t["shape"] for t in info["inputs"]] == [[1, 4]]
    assert not marker.exists()


_SETSTATE_MODULE = '''
import torch


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.ones(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        t = torch.from_file(TARGET, shared=True, size=8, dtype=torch.uint8)
        t.fill_(88)
        self.w = state[0] + t.float().sum() * 0
        self.training = state[1]
'''


def test_torchscript_is_refused_before_its_setstate_writes_a_file(tmp_path: Path) -> None:
    """torch.jit.load runs a module's TorchScript __setstate__; torch.from_file(shared=True)
    plus an in-place op writes through to any file the process may write."""
    torch = pytest.importorskip("torch")
    victim = tmp_path / "victim"
    source = tmp_path / "setstate_net.py"
    source.write_text(_SETSTATE_MODULE.replace("TARGET", repr(str(victim))))
    namespace: dict[str, Any] = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)  # the test's own source
    model = tmp_path / "net_script.pt"
    torch.jit.save(torch.jit.script(namespace["Net"]()), str(model))
    victim.write_bytes(b"AAAAAAAA")
    line = _refused(_optimize(model, tmp_path), model)
    assert "TorchScript" in line
    assert victim.read_bytes() == b"AAAAAAAA"
    # What the refusal prevents: loading it overwrites the file.
    torch.jit.load(str(model))
    assert victim.read_bytes() == b"XXXXXXXX"


def test_a_keras_lambda_layer_is_refused_without_running_it(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    marker = tmp_path / "ran"
    where = str(marker)
    # The Lambda's body (marshalled into the file) creates the marker when it runs.
    hostile = tf.keras.layers.Lambda(lambda x: (os.makedirs(where, exist_ok=True), x)[1])
    model = tf.keras.Sequential(
        [tf.keras.Input(shape=(4,)), hostile, tf.keras.layers.Dense(2)]
    )
    for name in ("lambda.h5", "lambda.keras"):
        model.save(tmp_path / name)
    if marker.exists():
        marker.rmdir()  # saving may trace the lambda here, in the test's own process
    for name in ("lambda.h5", "lambda.keras"):
        path = tmp_path / name
        line = _refused(_build(path, tmp_path), path)
        assert "Lambda" in line and "save it as .keras" in line
        assert not marker.exists(), name
        assert not (tmp_path / "bundle").exists()


# --- TensorFlow SavedModel directories ----------------------------------------------------------
# Loading a SavedModel runs graph operations from it (packager/models/keras.py has the sources):
# a TF2 model's resource initializers and a TF1 model's init op. Both crafted models below write
# ``marker`` with the WriteFile op (tf.io.write_file) when TensorFlow loads them.


def _save_serving_module(tf: Any, root: Path, weights: Any, **attributes: Any) -> Path:
    """A tf.Module serving ``y = x @ weights`` (x float32 [1,4]) as ``serving_default``, with
    ``attributes`` tracked on it, saved as a TF2 SavedModel at ``root``."""

    class Net(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(weights)
            for name, value in attributes.items():
                setattr(self, name, value)

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32, name="x")])  # type: ignore[untyped-decorator]
        def serve(self, x: Any) -> Any:
            return {"y": tf.matmul(x, self.w)}

    net = Net()
    tf.saved_model.save(net, str(root), signatures={"serving_default": net.serve})
    return root


def _saved_model_tf2(tf: Any, root: Path, marker: Path) -> Path:
    """A tf.Module with a serving signature and a resource whose initializer writes ``marker``:
    tf.saved_model.load calls every restored resource's ``_initialize`` (load.py:229)."""

    class Writer(tf.saved_model.experimental.TrackableResource):  # type: ignore[misc]
        def _create_resource(self) -> Any:
            return tf.constant(0.0)

        def _initialize(self) -> Any:
            return tf.io.write_file(str(marker), "ran")

    return _save_serving_module(tf, root, tf.ones([4, 2]), writer=Writer())


def _saved_model_tf1(tf: Any, root: Path, marker: Path) -> Path:
    """A TF1-style SavedModel (SavedModelBuilder) whose main_op writes ``marker``:
    load_v1_in_v2 runs the init op on load (load_v1_in_v2.py:261-284)."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        x = v1.placeholder(tf.float32, [1, 4], name="x")
        w = v1.get_variable("w", initializer=tf.ones([4, 2]))
        y = tf.identity(tf.matmul(x, w), name="y")
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(root))
        signature = v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(
            session, ["serve"], signature_def_map={"serving_default": signature},
            main_op=tf.io.write_file(str(marker), "ran"),
        )  # fmt: skip
        builder.save()
    return root


_CRAFTED = {"tf2-resource-initializer": _saved_model_tf2, "tf1-main-op": _saved_model_tf1}


def _crafted(kind: str, tmp_path: Path) -> tuple[Any, Path, Path]:
    tf = pytest.importorskip("tensorflow")
    marker = tmp_path / "ran"
    model = _CRAFTED[kind](tf, tmp_path / "evil_saved", marker)
    if marker.exists():
        marker.unlink()  # saving may run it here, in the test's own process
    return tf, model, marker


def _sm_calibration(tmp_path: Path) -> Path:
    if (tmp_path / "calibration-sm").is_dir():
        return tmp_path / "calibration-sm"
    rows = np.random.default_rng(0).uniform(0, 1, size=(32, 4)).astype(np.float32)
    return sample_dir(tmp_path / "calibration-sm", x=rows)


def _build_saved(model: Path, tmp_path: Path, *extra: str) -> Any:
    return edgepack(
        "build", str(model), "--target", MCU, "--calibration", str(_sm_calibration(tmp_path)),
        "--out", str(tmp_path / "bundle"), "--no-emulate", *extra, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_CRAFTED))
def test_a_savedmodel_is_refused_by_build_and_inspected_without_running(
    kind: str, tmp_path: Path
) -> None:
    tf, model, marker = _crafted(kind, tmp_path)
    line = _refused(_build_saved(model, tmp_path), model)
    assert "TensorFlow SavedModel" in line and "runs graph operations" in line
    assert ".tflite" in line and ".keras" in line and "--trust-model-code" in line
    assert not marker.exists()
    assert not (tmp_path / "bundle").exists()
    # inspect parses saved_model.pb; it never loads the model
    proc = edgepack("inspect", str(model), "--json")
    info = json.loads(proc.stdout)
    assert info["format"] == "keras"
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 4]}]
    assert info["outputs"] == [{"name": "y", "dtype": "float32", "shape": [1, 2]}]
    assert info["param_count"] == 4 * 2 and info["op_histogram"] == {"MatMul": 1}
    assert not marker.exists()
    # What the refusal prevents: TensorFlow's own loader writes the file.
    tf.saved_model.load(str(model))
    assert marker.read_bytes() == b"ran"


def _honest_saved_model(tf: Any, root: Path) -> Path:
    return _save_serving_module(tf, root, tf.random.stateless_normal([4, 2], seed=[3, 4]))


def test_a_trusted_savedmodel_builds_as_before(tmp_path: Path) -> None:
    """--trust-model-code is the builder's word: an honest SavedModel is refused without it and
    builds with it, the manifest saying so; a crafted one is loaded with it (its initializer
    runs: that is what the flag vouches for) and stops at the conversion of its WriteFile op."""
    tf = pytest.importorskip("tensorflow")
    model = _honest_saved_model(tf, tmp_path / "honest_saved")
    _refused(_build_saved(model, tmp_path), model)
    proc = _build_saved(model, tmp_path, "--trust-model-code")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["conversion"] == {"trusted_model_code": True}
    _, evil, marker = _crafted("tf2-resource-initializer", tmp_path)
    proc = _build_saved(evil, tmp_path, "--trust-model-code", "--out", str(tmp_path / "b2"))
    assert proc.returncode == 10 and "WriteFile" in proc.stderr, proc.stderr
    assert marker.exists()


def test_inspect_of_an_honest_savedmodel_matches_tensorflows_own_load(tmp_path: Path) -> None:
    """The protobuf inspector against what tf.saved_model.load (the old inspector, trusted here:
    the test's own model) reports: the serving signature's tensors, and the weights of the
    variables that signature captures (the old inspector counted none for a tf.Module)."""
    tf = pytest.importorskip("tensorflow")

    class Net(tf.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([4, 3], seed=[1, 2]))
            self.b = tf.Variable(tf.zeros([3]))
            self.unused = tf.Variable(tf.zeros([7], tf.int64), trainable=False)

        spec = tf.TensorSpec([None, 4], tf.float32, name="features")

        @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]
        def serve(self, features: Any) -> Any:
            h = tf.nn.relu(tf.matmul(features, self.w) + self.b)
            return {"scores": h, "label": tf.argmax(h, axis=1)}

    net = Net()
    model = tmp_path / "honest"
    tf.saved_model.save(net, str(model), signatures={"serving_default": net.serve})
    info = json.loads(edgepack("inspect", str(model), "--json").stdout)

    loaded = tf.saved_model.load(str(model))  # kept: the signature captures its variables
    signature = loaded.signatures["serving_default"]

    def tensors(specs: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"name": k, "dtype": v.dtype.name, "shape": v.shape.as_list()}
            for k, v in sorted(specs.items())
        ]

    assert info["inputs"] == tensors(signature.structured_input_signature[1])
    assert info["outputs"] == tensors(signature.structured_outputs)
    captured = [np.asarray(v) for v in signature.variables]
    assert len(captured) == 2  # w and b; not the unused variable
    assert info["param_count"] == sum(v.size for v in captured) == 4 * 3 + 3
    assert info["weights_bytes"] == sum(v.nbytes for v in captured)
    assert {"MatMul", "Relu", "ArgMax"} <= set(info["op_histogram"])
    assert info["format"] == "keras"
    assert info["producer"] == f"tensorflow {tf.__version__} SavedModel"
    assert info["size_bytes"] == sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
