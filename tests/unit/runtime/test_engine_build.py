"""The on-device engine build against a STAND-IN trtexec (tests/data/jetson/fake_trtexec.py:
records its argv, prints trtexec's banner, writes the plan, optionally sleeping mid-write).
TensorRT, trtexec and a GPU cannot exist here; everything else is real: processes, signals,
files, renames."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from packager.runtime import engine_build
from packager.runtime.engine_key import EngineKey, check_plan

REPO = Path(__file__).resolve().parents[3]
FAKE = REPO / "tests" / "data" / "jetson" / "fake_trtexec.py"


@pytest.fixture
def device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A model, a stand-in trtexec, a stand-in libnvinfer.so.8.6.2 and an engines dir."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"stand-in onnx bytes")
    trtexec = tmp_path / "bin" / "trtexec"
    trtexec.parent.mkdir()
    trtexec.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
    trtexec.chmod(0o755)
    libs = tmp_path / "lib"
    libs.mkdir()
    (libs / "libnvinfer.so.8.6.2").write_bytes(b"stand-in")
    record = tmp_path / "argv.jsonl"
    monkeypatch.setenv("FAKE_TRTEXEC_RECORD", str(record))
    return {"model": model, "trtexec": trtexec, "libs": libs, "engines": tmp_path / "engines",
            "record": record, "tmp": tmp_path}


def _args(device: dict[str, Path], *extra: str, workspace: int = 1024) -> list[str]:
    sha = hashlib.sha256(device["model"].read_bytes()).hexdigest()
    return ["--model", str(device["model"]), "--model-sha256", sha, "--tensorrt", "8.6.2",
            "--sm", "87", "--precision", "fp16", "--workspace-mib", str(workspace),
            "--engines-dir", str(device["engines"]), "--trtexec", str(device["trtexec"]),
            "--lib-dir", str(device["libs"]), "--progress-s", "1", *extra]


def _key(device: dict[str, Path], workspace: int = 1024) -> EngineKey:
    return EngineKey(model_sha256=hashlib.sha256(device["model"].read_bytes()).hexdigest(),
                     tensorrt="8.6.2", sm=87, precision="fp16", dla_core=None,
                     workspace_mib=workspace)


def _main(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = engine_build.main(args, out=out)
    return code, out.getvalue()


def _calls(device: dict[str, Path]) -> list[list[str]]:
    if not device["record"].exists():
        return []
    return [json.loads(line) for line in device["record"].read_text().splitlines()]


def _leftovers(device: dict[str, Path]) -> list[str]:
    return sorted(p.name for p in device["engines"].rglob(".*.tmp"))


def test_builds_then_skips_then_rebuilds_on_a_changed_key(device: dict[str, Path]) -> None:
    code, out = _main(_args(device))
    assert code == 0, out
    key = _key(device)
    plan = key.plan_path(device["engines"])
    assert check_plan(key, device["engines"]).ready
    assert key.key_path(device["engines"]).read_text() == key.to_json()
    assert plan.read_bytes().startswith(b"FAKE-PLAN")
    calls = _calls(device)
    assert len(calls) == 1
    assert calls[0][0] == f"--onnx={device['model']}"
    assert calls[0][1] == f"--saveEngine={plan.parent / '.8.6.2-sm87-fp16.plan.tmp'}"
    assert calls[0][2:] == ["--memPoolSize=workspace:1024",
                            calls[0][3], "--fp16", "--skipInference"]
    assert "engine build: trtexec: &&&& RUNNING TensorRT.trtexec [TensorRT v8602]" in out
    assert _leftovers(device) == []
    cache = key.timing_cache_path(device["engines"])
    assert cache.read_text() == "timing entry\n"

    code, out = _main(_args(device))
    assert code == 0 and "plan up to date, nothing to build" in out
    assert len(_calls(device)) == 1  # trtexec not run again

    code, out = _main(_args(device, workspace=2048))
    assert code == 0, out
    assert "existing plan not used: key differs: workspace_mib: expected 2048, found 1024" in out
    assert len(_calls(device)) == 2
    assert check_plan(_key(device, 2048), device["engines"]).ready
    assert not check_plan(key, device["engines"]).ready
    assert cache.read_text() == "timing entry\ntiming entry\n"  # the cache was kept and reused


def test_a_plan_without_its_key_is_rebuilt(device: dict[str, Path]) -> None:
    key = _key(device)
    key.plan_path(device["engines"]).parent.mkdir(parents=True)
    key.plan_path(device["engines"]).write_bytes(b"half a plan from a killed build")
    code, out = _main(_args(device))
    assert code == 0
    assert "without its key file (an interrupted build); rebuilding" in out
    assert key.plan_path(device["engines"]).read_bytes().startswith(b"FAKE-PLAN")


def test_progress_lines_while_trtexec_runs(device: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "3")
    code, out = _main(_args(device))
    assert code == 0
    assert "engine build: still building 8.6.2-sm87-fp16: " in out


def test_timeout_stops_trtexec_and_leaves_nothing(device: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "60")
    code, out = _main(_args(device, "--timeout-s", "2"))
    assert code == engine_build.EXIT_TIMEOUT
    assert "trtexec ran past --timeout-s=2 and was stopped" in out
    assert check_plan(_key(device), device["engines"]).state == "absent"
    assert _leftovers(device) == []


def test_trtexec_failure_leaves_no_plan(device: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRTEXEC_EXIT", "1")
    code, out = _main(_args(device))
    assert code == engine_build.EXIT_BUILD
    assert "trtexec exited with status 1" in out
    assert check_plan(_key(device), device["engines"]).state == "absent"
    assert _leftovers(device) == []


def test_a_trtexec_of_another_tensorrt_is_stopped(device: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRTEXEC_VERSION", "100300")
    code, out = _main(_args(device))
    assert code == engine_build.EXIT_TENSORRT
    assert "TensorRT: expected 8.6.2, found 10.3.0 (trtexec's banner)" in out
    assert check_plan(_key(device), device["engines"]).state == "absent"


def test_refuses_a_model_or_tensorrt_that_is_not_the_bundles(device: dict[str, Path]) -> None:
    args = _args(device)
    args[args.index("--model-sha256") + 1] = "00" * 32
    code, out = _main(args)
    assert code == engine_build.EXIT_MODEL
    assert out.startswith("engine build: model: expected sha256 " + "00" * 32 + ", found ")
    (device["libs"] / "libnvinfer.so.8.6.2").rename(device["libs"] / "libnvinfer.so.10.3.0")
    code, out = _main(_args(device))
    assert code == engine_build.EXIT_TENSORRT
    assert out == (f"engine build: TensorRT: expected 8.6.2, found 10.3.0 in {device['libs']}\n")
    assert _calls(device) == []


def test_bad_key_fields_exit_2_with_one_line(device: dict[str, Path]) -> None:
    args = _args(device)
    args[args.index("--tensorrt") + 1] = "8.6"
    code, out = _main(args)
    assert code == engine_build.EXIT_USAGE
    assert out == "engine build: tensorrt: '8.6' is not major.minor.patch (e.g. 8.6.2)\n"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--sm", "5", "engine build: sm: 5 is not a compute capability like 87\n"),
    ("--sm", "1000", "engine build: sm: 1000 is not a compute capability like 87\n"),
])
def test_an_sm_outside_the_keys_range_exits_2_with_the_keys_line(
    device: dict[str, Path], flag: str, value: str, message: str,
) -> None:
    """The CLI's --sm is checked by EngineKey's own rule (one rule for a key)."""
    args = _args(device)
    args[args.index(flag) + 1] = value
    assert _main(args) == (engine_build.EXIT_USAGE, message)
    assert _calls(device) == []


@pytest.mark.parametrize("value", ["8", "-1", "", "0x1", "1 "])
def test_a_dla_core_outside_the_choices_is_an_argparse_error(
    device: dict[str, Path], value: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _main(_args(device, "--dla-core", value))
    assert exit_.value.code == engine_build.EXIT_USAGE
    assert "argument --dla-core: invalid choice" in capsys.readouterr().err
    assert _calls(device) == []


def test_dla_core_none_and_a_number_reach_the_key(device: dict[str, Path]) -> None:
    args = _args(device, "--dla-core", "none")
    assert engine_build._expected(engine_build.parser().parse_args(args))[0].dla_core is None
    args = _args(device, "--dla-core", "1")
    args[args.index("--precision") + 1] = "int8"  # DLA runs fp16 or int8
    assert engine_build._expected(engine_build.parser().parse_args(args))[0].dla_core == 1


def test_a_tensorrt_without_a_trtexec_command_line_exits_2_and_keeps_the_key(
    device: dict[str, Path],
) -> None:
    """Before: trtexec.form raised UnsupportedTensorRT out of main (a traceback, exit 1), after
    the existing key file had been removed."""
    (device["libs"] / "libnvinfer.so.8.6.2").rename(device["libs"] / "libnvinfer.so.8.0.1")
    args = _args(device)
    args[args.index("--tensorrt") + 1] = "8.0.1"
    key = EngineKey(model_sha256=_key(device).model_sha256, tensorrt="8.0.1", sm=87,
                    precision="fp16", dla_core=None, workspace_mib=1024)
    key.key_path(device["engines"]).parent.mkdir(parents=True)
    key.key_path(device["engines"]).write_text(key.to_json())
    code, out = _main(args)
    assert code == engine_build.EXIT_USAGE
    assert out == ("engine build: tensorrt: 8.0.1 has no known trtexec command line "
                   "(supported: 8.2, 8.4, 8.5, 8.6, 10.x)\n")
    assert key.key_path(device["engines"]).read_text() == key.to_json()
    assert _calls(device) == []


def test_a_symlinked_model_directory_is_never_written_through(device: dict[str, Path]) -> None:
    """Before: the lock, the plan and its key file were written wherever the link pointed."""
    outside = device["tmp"] / "outside"
    outside.mkdir()
    device["engines"].mkdir()
    model_dir = _key(device).plan_path(device["engines"]).parent
    model_dir.symlink_to(outside)
    code, out = _main(_args(device))
    assert code == engine_build.EXIT_IO
    assert out == (f"engine build: {model_dir}: expected a directory, found a symlink or another "
                   "file (remove it)\n")
    assert list(outside.iterdir()) == []
    assert _calls(device) == []


def test_installs_a_matching_prebuilt_plan_and_ignores_another(device: dict[str, Path]) -> None:
    key = _key(device)
    prebuilt = device["tmp"] / "bundle-engine"
    prebuilt.mkdir()
    (prebuilt / f"{key.stem}.plan").write_bytes(b"PREBUILT PLAN")
    (prebuilt / f"{key.stem}.key.json").write_text(_key(device, 4096).to_json())
    code, out = _main(_args(device, "--prebuilt-dir", str(prebuilt)))
    assert code == 0 and "prebuilt plan ignored: key differs: workspace_mib" in out
    assert len(_calls(device)) == 1
    (prebuilt / f"{key.stem}.key.json").write_text(_key(device, 2048).to_json())
    code, out = _main(_args(device, "--prebuilt-dir", str(prebuilt), workspace=2048))
    assert code == 0 and "installed the bundle's prebuilt plan" in out
    assert len(_calls(device)) == 1
    assert key.plan_path(device["engines"]).read_bytes() == b"PREBUILT PLAN"


def test_timing_cache_seed_is_copied_not_moved(device: dict[str, Path]) -> None:
    seed = device["tmp"] / "timing.cache"
    seed.write_text("seed\n")
    code, out = _main(_args(device, "--timing-cache-seed", str(seed)))
    assert code == 0 and "timing cache seeded from" in out
    assert seed.read_text() == "seed\n"
    assert _key(device).timing_cache_path(device["engines"]).read_text() == "seed\ntiming entry\n"


def _start(device: dict[str, Path], started: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "FAKE_TRTEXEC_SLEEP": "60", "FAKE_TRTEXEC_STARTED": str(started),
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "packager.runtime.engine_build",
                             *_args(device)], env=env, stdout=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "stand-in trtexec never started"
        time.sleep(0.05)


def _trtexec_gone(device: dict[str, Path]) -> bool:
    marker = str(device["trtexec"])
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in status.read_bytes():
                return False
        except OSError:
            continue
    return True


def test_sigkill_mid_build_leaves_no_plan_that_looks_valid(device: dict[str, Path]) -> None:
    started = device["tmp"] / "started"
    proc = _start(device, started)
    _wait_for(started, proc)
    key = _key(device)
    assert (key.plan_path(device["engines"]).parent / ".8.6.2-sm87-fp16.plan.tmp").exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not _trtexec_gone(device):  # PR_SET_PDEATHSIG takes trtexec down with the builder
        assert time.monotonic() < deadline, "stand-in trtexec outlived the killed builder"
        time.sleep(0.05)
    assert not key.plan_path(device["engines"]).exists()
    assert not key.key_path(device["engines"]).exists()
    assert check_plan(key, device["engines"]).state == "absent"
    code, out = _main(_args(device))  # the next boot builds it, clearing the leftover
    assert code == 0, out
    assert check_plan(key, device["engines"]).ready
    assert _leftovers(device) == []


def test_sigterm_stops_trtexec_and_removes_temporary_files(device: dict[str, Path]) -> None:
    started = device["tmp"] / "started"
    proc = _start(device, started)
    _wait_for(started, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == engine_build.EXIT_TERMINATED
    assert "stopped by SIGTERM; trtexec stopped, temporary files removed" in out
    assert _trtexec_gone(device)
    assert _leftovers(device) == []
    assert check_plan(_key(device), device["engines"]).state == "absent"


def test_engine_build_modules_keep_to_python_3_8() -> None:
    import ast

    for name in ("engine_key", "trtexec", "engine_build"):
        ast.parse((REPO / "packager" / "runtime" / f"{name}.py").read_text(),
                  feature_version=(3, 8))


# --- --from-config: the key and the model from the image's own runtime.json --------------------


def _config(device: dict[str, Path], *, workspace: int = 1024, dla: int | None = None,
            engines: bool = True, **engine: object) -> Path:
    """A runtime.json as the Jetson backend writes it (model_path relative here: the config's
    folder, as the runtime resolves it; absolute /opt/edgepack/model/... in the image)."""
    key = _key(device, workspace)
    section: dict[str, object] = {"key": {**key.as_dict(), "dla_core": dla},
                                  "fallback": "onnxruntime-cpu", **engine}
    if engines:
        section["engines_dir"] = str(device["engines"])
    doc = {"model_name": "mnist", "model_path": "model.onnx", "engine": section}
    path = device["tmp"] / "runtime.json"
    path.write_text(json.dumps(doc))
    return path


def _from_config(device: dict[str, Path], config: Path, *extra: str) -> list[str]:
    return ["--from-config", str(config), "--trtexec", str(device["trtexec"]),
            "--lib-dir", str(device["libs"]), "--progress-s", "1", *extra]


def test_from_config_builds_skips_and_rebuilds_the_configs_key(device: dict[str, Path]) -> None:
    config = _config(device)
    code, out = _main(_from_config(device, config))
    assert code == 0, out
    key = _key(device)
    assert check_plan(key, device["engines"]).ready
    (call,) = _calls(device)
    assert call[0] == f"--onnx={device['model']}"  # the config's model, resolved
    assert "--memPoolSize=workspace:1024" in call and "--fp16" in call
    # The same plan as the explicit flags would build: they name the same key.
    code, out = _main(_args(device))
    assert code == 0 and "plan up to date, nothing to build" in out
    code, out = _main(_from_config(device, config))
    assert code == 0 and "plan up to date, nothing to build" in out
    assert len(_calls(device)) == 1

    # An update's config (another key): rebuilt, as the runtime of that image will look for it.
    code, out = _main(_from_config(device, _config(device, workspace=2048)))
    assert code == 0, out
    assert "key differs: workspace_mib: expected 2048, found 1024" in out
    assert check_plan(_key(device, 2048), device["engines"]).ready
    assert len(_calls(device)) == 2


def test_from_config_takes_dla_and_the_engines_dir_of_the_config(
    device: dict[str, Path],
) -> None:
    code, out = _main(_from_config(device, _config(device, dla=1)))
    assert code == 0, out
    key = EngineKey(**{**_key(device).as_dict(), "dla_core": 1})
    assert check_plan(key, device["engines"]).ready
    assert key.plan_path(device["engines"]).name == "8.6.2-sm87-fp16-dla1.plan"
    assert "--useDLACore=1" in _calls(device)[0]
    # --engines-dir still wins over the config's (the first-boot unit passes it).
    other = device["tmp"] / "other-engines"
    code, out = _main(_from_config(device, _config(device), "--engines-dir", str(other)))
    assert code == 0, out
    assert check_plan(_key(device), other).ready


def test_from_config_checks_the_model_as_the_flags_do(device: dict[str, Path]) -> None:
    config = _config(device)
    device["model"].write_bytes(b"another model")
    code, out = _main(_from_config(device, config))
    assert code == engine_build.EXIT_MODEL
    assert out.startswith("engine build: model: expected sha256 ")
    assert _calls(device) == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("key flag too", "engine build: --from-config: --tensorrt cannot be given too "
                         "(the config holds it)\n"),
        ("missing file", "engine build: {tmp}/absent.json: cannot read the config file "
                         "(No such file or directory)\n"),
        ("no engine section", "engine build: {tmp}/runtime.json: no engine section: this "
                              "runtime serves no TensorRT engine\n"),
        ("bad key", "engine build: {tmp}/runtime.json: engine.key: sm: '87' is not a compute "
                     "capability like 87\n"),
        ("unknown engine key", "engine build: {tmp}/runtime.json: engine: unknown key 'extra'; "
                               "known keys: engines_dir, fallback, key\n"),
        ("neither", "engine build: --model is required (or --from-config RUNTIME_JSON)\n"),
    ],
)  # fmt: skip
def test_from_config_refuses_with_one_line_and_exit_2(
    device: dict[str, Path], case: str, message: str
) -> None:
    config = _config(device)
    if case == "key flag too":
        args = _from_config(device, config, "--tensorrt", "8.6.2")
    elif case == "missing file":
        args = _from_config(device, device["tmp"] / "absent.json")
    elif case == "no engine section":
        config.write_text(json.dumps({"model_name": "mnist", "model_path": "model.onnx"}))
        args = _from_config(device, config)
    elif case == "bad key":
        doc = json.loads(config.read_text())
        doc["engine"]["key"]["sm"] = "87"
        config.write_text(json.dumps(doc))
        args = _from_config(device, config)
    elif case == "unknown engine key":
        args = _from_config(device, _config(device, extra=1))
    else:
        args = ["--trtexec", str(device["trtexec"])]
    code, out = _main(args)
    assert (code, out) == (engine_build.EXIT_USAGE, message.format(tmp=device["tmp"]))
    assert _calls(device) == []


def test_from_config_reads_the_runtime_json_the_jetson_backend_writes(
    device: dict[str, Path],
) -> None:
    """The Jetson backend's own runtime.json of a jetson-orin-nano plan (on a stand-in --base
    pinned by a made-up digest: nothing is pulled), its model path moved to a copy here."""
    from packager.backends.base import BuildRequest
    from packager.backends.jetson.backend import JetsonBackend, JetsonPayload
    from packager.models import inspect_model
    from packager.targets import resolve_target

    mnist = Path("/work/shared/testdata/onnx/mnist.onnx")
    backend, target = JetsonBackend(), resolve_target("jetson-orin-nano")
    request = BuildRequest(model=mnist, target="jetson-orin-nano",
                           base="docker://127.0.0.1:19400/stand-in/l4t@sha256:" + "ab" * 32)
    info = inspect_model(mnist)
    payload = backend.plan(request, info, target, backend.fit(request, info, target)).payload
    assert isinstance(payload, JetsonPayload)
    layer = next(layer for layer in payload.image.layers if layer.name == "model")
    entry = next(f for f in layer.files if f.dest == "/opt/edgepack/model/runtime.json")
    assert isinstance(entry.source, bytes)
    doc = json.loads(entry.source)
    assert doc["model_path"] == "/opt/edgepack/model/mnist.onnx"
    copy = device["tmp"] / "mnist.onnx"
    copy.write_bytes(mnist.read_bytes())
    doc["model_path"] = str(copy)
    doc["engine"]["engines_dir"] = str(device["engines"])
    config = device["tmp"] / "runtime.json"
    config.write_text(json.dumps(doc))
    code, out = _main(_from_config(device, config))
    assert code == 0, out
    key = EngineKey.from_dict(doc["engine"]["key"])
    assert key.model_sha256 == hashlib.sha256(mnist.read_bytes()).hexdigest()
    assert check_plan(key, device["engines"]).ready


def test_the_modules_engine_build_on_ships_still_run_with_explicit_flags(
    device: dict[str, Path],
) -> None:
    """`edgepack engine build --on` copies only BUILDER_MODULES to the reference device
    (packager/backends/jetson/engine_remote.py): --from-config's import of config.py must not
    break the explicit-flag build there, and every module engine_build imports (engine_key,
    trtexec, jetson_preflight for its argparse types) must be among them."""
    from packager.backends.jetson.engine_remote import BUILDER_MODULES

    package = device["tmp"] / "shipped" / "edgepack_runtime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in BUILDER_MODULES:
        (package / name).write_bytes((REPO / "packager" / "runtime" / name).read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "edgepack_runtime.engine_build", *_args(device)],
        cwd=package.parent, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(package.parent)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert check_plan(_key(device), device["engines"]).ready
