"""End to end: real PyTorch export, real onnxruntime quantization and sessions, through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from packager.cli import cli
from packager.commands.optimize import optimize_cmd
from packager.optimize import optimize_for_build
from tests import cli_runner
from tests.model_factory import sample_dir

pytestmark = pytest.mark.integration
torch = pytest.importorskip("torch")

SIDE = 16
CLASSES = 4


# --- helpers ------------------------------------------------------------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``edgepack ARGS`` through packager.cli.main, as a user runs it."""
    if "optimize" not in cli.commands:
        cli.add_command(optimize_cmd)
    return cli_runner.run_cli(args, capsys)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def stripes(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: class k is a stripe pattern at angle k*45 degrees, with noise."""
    labels = rng.integers(0, CLASSES, size=count)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    images = np.empty((count, 1, SIDE, SIDE), dtype=np.float32)
    for i, label in enumerate(labels):
        angle = np.pi * label / CLASSES
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 1.2 + phase)
        images[i, 0] = wave + rng.normal(0, 0.3, size=(SIDE, SIDE))
    return images, labels.astype(np.int64)


def save_samples(directory: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        np.save(directory / f"{i:03d}.npy", image[None])
    if labels is not None:
        np.save(directory / "labels.npy", labels)
    return directory


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CNN trained for a few seconds; saved with torch.save, as TorchScript and .pt2."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 4 * 4, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, CLASSES),
    )
    images, labels = stripes(rng, 512)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(6):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                net(x[start : start + 64]), y[start : start + 64]
            )
            loss.backward()
            optimizer.step()
    net.eval()
    root = tmp_path_factory.mktemp("cnn")
    held_x, held_y = stripes(np.random.default_rng(1), 200)
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(held_x)).argmax(1).numpy() == held_y).mean())
    assert accuracy > 0.9, f"the test CNN did not learn the stripes ({accuracy:.2%})"
    torch.save(net, root / "cnn.pt")
    torch.jit.trace(net, torch.zeros(1, 1, SIDE, SIDE)).save(str(root / "cnn_script.pt"))
    program = torch.export.export(net, (torch.zeros(1, 1, SIDE, SIDE),))
    torch.export.save(program, str(root / "cnn.pt2"))
    cal_x, _ = stripes(np.random.default_rng(2), 64)
    return {
        "pickle": root / "cnn.pt",
        "script": root / "cnn_script.pt",
        "program": root / "cnn.pt2",
        "calibration": save_samples(root / "calibration", cal_x),
        "eval": save_samples(root / "eval", held_x, held_y),
    }


# --- the acceptance path ------------------------------------------------------------------------


def test_pruned_cnn_to_static_int8_and_the_gate(
    trained_cnn: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    args = [
        "optimize",
        str(trained_cnn["pickle"]),
        "--trust-model-code",
        "--quantize",
        "int8-static",
        "--input-shape",
        f"input=1,1,{SIDE},{SIDE}",
        "--dynamic-dim",
        "input:0",
        "--prune",
        "l1=0.5",
        "--calibration",
        str(trained_cnn["calibration"]),
        "--eval",
        str(trained_cnn["eval"]),
        "--latency-runs",
        "5",
        "--out",
        str(out),
        "--json",
    ]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    document = json.loads(stdout)
    report = json.loads((out / "optimize-report.json").read_text())
    assert document["variants"] == report["variants"]
    variants = {v["name"]: v for v in report["variants"]}
    fp32, pruned, int8 = variants["fp32"], variants["fp32-pruned"], variants["int8-static QDQ"]
    assert int8["size_bytes"] < 0.30 * fp32["size_bytes"]
    assert int8["metrics"]["top1_agreement"] >= 0.98
    assert int8["metrics"]["samples"] == 200
    assert int8["metrics"]["accuracy"] >= 0.9  # labels were given
    # Half the weights are zero: the same dense file size, but it compresses much better.
    assert 0.45 <= report["prune"]["sparsity"] <= 0.55
    assert pruned["gzip_bytes"] < 0.8 * fp32["gzip_bytes"]
    assert any("no speed-up" in note for note in report["notes"])
    assert {p.name for p in out.iterdir()} == {
        "cnn.int8-static.onnx",
        "cnn.fp32.onnx",
        "optimize-report.json",
        "optimize-report.md",
        "optimize-report.png",
    }
    assert (out / "optimize-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "int8-static QDQ" in (out / "optimize-report.md").read_text()
    # The written model runs in onnxruntime with a dynamic batch and agrees with the report.
    session = ort.InferenceSession(str(out / "cnn.int8-static.onnx"))
    batch = np.load(trained_cnn["eval"] / "000.npy").repeat(3, axis=0)
    assert session.run(None, {session.get_inputs()[0].name: batch})[0].shape == (3, CLASSES)

    # The gate: heavier pruning measured against a threshold the first run met must fail.
    measured = int8["metrics"]["top1_agreement"]
    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "previous.txt").write_text("an earlier good result")
    args_gated = [a if a != "l1=0.5" else "l1=0.97" for a in args if a != "--json"]
    args_gated[args_gated.index(str(out))] = str(gated)
    code, _, err = run_cli([*args_gated, "--force", "--min-top1-agreement", str(measured)], capsys)
    assert code == 11
    lines = error_lines(err)
    assert len(lines) == 1
    assert "accuracy gate" in lines[0] and f"required {measured:.2%}" in lines[0]
    # A failed run leaves the earlier result alone, even with --force.
    assert [p.name for p in gated.iterdir()] == ["previous.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gated.")]


def _digit(rng: np.random.Generator, digit: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (28, 28), 0)
    font = ImageFont.load_default(size=int(rng.integers(18, 24)))
    position = (int(rng.integers(5, 10)), int(rng.integers(0, 4)))
    ImageDraw.Draw(image).text(position, str(digit), fill=255, font=font)
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def mnist_data(onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibration: shifted copies of the README's handwritten 8 and synthetic printed digits."""
    eight = np.loadtxt(onnx_dir / "media" / "mnist_28.csv", delimiter=",", dtype=np.float32)
    eight = eight.reshape(28, 28)
    rng = np.random.default_rng(0)
    shifted = [np.roll(eight, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1)) for _ in range(6)]
    printed = [_digit(rng, d % 10) for d in range(14)]
    root = tmp_path_factory.mktemp("mnist")
    calibration = sample_dir(root / "calibration", set=np.stack(shifted + printed)[:, None])
    evaluation = root / "eval"
    evaluation.mkdir()
    np.savez(evaluation / "eight.npz", Input3=eight[None, None], label=np.array([8]))
    return {
        "model": onnx_dir / "mnist.onnx",
        "eight": evaluation / "eight.npz",
        "calibration": calibration,
        "eval": evaluation,
    }


def _answer(model: Path, eight_npz: Path) -> int:
    session = ort.InferenceSession(str(model))
    with np.load(eight_npz) as data:
        return int(session.run(None, {"Input3": data["Input3"]})[0].argmax())


@pytest.mark.parametrize(
    ("quantize", "extra"),
    [
        ("int8-static", ["--format", "QDQ"]),
        ("int8-static", ["--format", "QOperator", "--calibration-method", "Percentile"]),
        ("int8-dynamic", []),
        ("fp16", []),
    ],
)
def test_mnist_opset7_still_answers_eight(
    mnist_data: dict[str, Path],
    tmp_path: Path,
    quantize: str,
    extra: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert onnx.load(str(mnist_data["model"])).opset_import[0].version < 13
    out = tmp_path / "out"
    args = [
        "optimize",
        str(mnist_data["model"]),
        "--quantize",
        quantize,
        *extra,
        "--eval",
        str(mnist_data["eval"]),
        "--latency-runs",
        "3",
        "--out",
        str(out),
        "--json",
    ]
    if quantize == "int8-static":
        args += ["--calibration", str(mnist_data["calibration"])]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0
    model = Path(json.loads(stdout)["model"])
    assert _answer(model, mnist_data["eight"]) == 8
    final = json.loads(stdout)["variants"][-1]["metrics"]
    assert final["accuracy"] == 1.0 and final["baseline_accuracy"] == 1.0


def test_same_inputs_give_the_same_model_bytes(mnist_data: dict[str, Path], tmp_path: Path) -> None:
    first, report = optimize_for_build(
        mnist_data["model"], "int8-static", mnist_data["calibration"], None, tmp_path / "a"
    )
    second, _ = optimize_for_build(
        mnist_data["model"], "int8-static", mnist_data["calibration"], None, tmp_path / "b"
    )
    assert first.is_relative_to(tmp_path / "a")
    assert first.read_bytes() == second.read_bytes()
    assert report["quantize"] == "int8-static"
    assert any("calibration set" in str(note) for note in report["notes"])  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["script", "program"])
def test_torchscript_and_exported_program_are_exported(
    trained_cnn: dict[str, Path], tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        [
            "optimize",
            str(trained_cnn[kind]),
            "--trust-model-code",
            "--quantize",
            "int8-dynamic",
            "--input-shape",
            f"x=1,1,{SIDE},{SIDE}",
            "--eval",
            str(trained_cnn["eval"]),
            "--latency-runs",
            "3",
            "--out",
            str(out),
            "--json",
        ],
        capsys,
    )
    assert code == 0
    final = json.loads(stdout)["variants"][-1]
    assert final["metrics"]["top1_agreement"] >= 0.98
    fp32 = onnx.load(str(next(out.glob("*.fp32.onnx"))))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in fp32.graph.initializer)
    assert list(tmp_path.glob("**/*.onnx.data")) == []


# --- failure modes: one line, the right exit code, nothing half-written -------------------------


def _custom_op_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.acme")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)]
    )
    onnx.save(model, str(path))
    return path


FailureCase = Callable[[dict[str, Path], Path], tuple[list[str], int, str]]


def _missing_calibration(d: dict[str, Path], tmp: Path) -> tuple[list[str], int, str]:
    return (["--calibration", str(tmp / "nowhere")], 3, "nowhere: calibration directory")


def _too_few_samples(d: dict[str, Path], tmp: Path) -> tuple[list[str], int, str]:
    few = tmp / "few"
    few.mkdir()
    np.save(few / "a.npy", np.zeros((3, 1, 28, 28), np.float32))
    return (["--calibration", str(few)], 3, "3 calibration sample(s), at least 16")


def _wrong_shape(d: dict[str, Path], tmp: Path) -> tuple[list[str], int, str]:
    bad = tmp / "bad"
    bad.mkdir()
    np.save(bad / "wrong.npy", np.zeros((10, 3, 32, 32), np.float32))
    return (
        ["--calibration", str(bad)],
        3,
        "wrong.npy: array of shape [10, 3, 32, 32] does not "
        "match input 'Input3' float32 [1, 1, 28, 28]",
    )


@pytest.mark.parametrize("case", [_missing_calibration, _too_few_samples, _wrong_shape])
def test_bad_calibration_data_is_one_line_and_writes_nothing(
    mnist_data: dict[str, Path],
    tmp_path: Path,
    case: FailureCase,
    capsys: pytest.CaptureFixture[str],
) -> None:
    extra, exit_code, expected = case(mnist_data, tmp_path)
    out = tmp_path / "out"
    code, _, err = run_cli(
        [
            "optimize",
            str(mnist_data["model"]),
            "--quantize",
            "int8-static",
            *extra,
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == exit_code
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0]
    assert_nothing_written(out)


def test_unsupported_operator_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _custom_op_model(tmp_path / "custom.onnx")
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["optimize", str(model), "--quantize", "fp16", "--out", str(out)], capsys
    )
    assert code == 10
    lines = error_lines(err)
    assert len(lines) == 1 and "com.acme::Frobnicate" in lines[0]
    assert_nothing_written(out)


def test_unreadable_pytorch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"definitely not a pickle")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        [
            "optimize",
            str(broken),
            "--trust-model-code",
            "--quantize",
            "int8-dynamic",
            "--input-shape",
            "x=1,4",
            "--out",
            str(out),
            "--json",
        ],
        capsys,
    )
    assert code == 3
    document = json.loads(stdout)
    assert (
        document["error"] == "input" and "broken.pt: PyTorch could not read" in document["message"]
    )
    assert "\n" not in document["message"]
    assert_nothing_written(out)


def test_out_is_replaced_only_with_force(
    mnist_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    args = [
        "optimize",
        str(mnist_data["model"]),
        "--quantize",
        "fp16",
        "--latency-runs",
        "1",
        "--out",
        str(out),
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--force" in error_lines(err)[0]
    assert (out / "previous.txt").exists()
    code, _, _ = run_cli([*args, "--force"], capsys)
    assert code == 0
    assert not (out / "previous.txt").exists() and (out / "mnist.fp16.onnx").is_file()
