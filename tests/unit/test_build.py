"""Bad inputs to `edgepack build`: one clear line, the documented exit code, nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from packager.cli import main
from packager.errors import ExitCode
from tests.model_factory import too_big_model


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return " ".join(lines[0].split())


def _assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(tmp_path / "nope.onnx"), "--target", "rpi4", "--out", str(out)], capsys
    )
    assert code == ExitCode.INPUT
    assert "nope.onnx: model file not found" in _error_line(err)
    _assert_nothing_written(tmp_path, out)


def test_truncated_model(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "trunc.onnx"
    model.write_bytes((onnx_dir / "mnist.onnx").read_bytes()[:1000])
    out = tmp_path / "bundle"
    code, _, err = _run(["build", str(model), "--target", "rpi4", "--out", str(out)], capsys)
    assert code == ExitCode.INPUT
    line = _error_line(err)
    assert "trunc.onnx" in line and "not a valid ONNX model" in line
    _assert_nothing_written(tmp_path, out)


def test_unknown_target_suggests(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(onnx_dir / "mnist.onnx"), "--target", "rpi-4", "--out", str(out)], capsys
    )
    assert code == ExitCode.TARGET
    line = _error_line(err)
    assert "unknown target 'rpi-4'" in line and "did you mean 'rpi4'" in line
    _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("name", "edit", "expected"),
    [
        (  # a wrong field
            "my-board.toml",
            ("ram_mb = 4096", "ram_mb = -4096"),
            "my-board.toml: memory.ram_mb: must be a positive integer",
        ),
        (  # a misspelt key
            "board.toml",
            ("reserved_mb = 512", "reserved_mib = 512"),
            "memory.reserved_mib: unknown key (did you mean 'reserved_mb'?)",
        ),
    ],
)
def test_target_file_with_a_bad_field(
    name: str,
    edit: tuple[str, str],
    expected: str,
    tmp_path: Path,
    onnx_dir: Path,
    repo_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = (repo_root / "targets" / "rpi4.toml").read_text()
    assert edit[0] in text  # premise: rpi4.toml has the line edited
    bad = tmp_path / name
    bad.write_text(text.replace(*edit))
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(onnx_dir / "mnist.onnx"), "--target", str(bad), "--out", str(out)], capsys
    )
    assert code == ExitCode.TARGET
    assert expected in _error_line(err)
    _assert_nothing_written(tmp_path, out)


def test_model_too_big_for_zero_2w(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = too_big_model(tmp_path / "big.onnx")
    out = tmp_path / "bundle"
    code, _, err = _run(["build", str(model), "--target", "rpi-zero-2w", "--out", str(out)], capsys)
    assert code == ExitCode.FIT
    line = _error_line(err)
    assert "does not fit rpi-zero-2w" in line
    assert re.search(r"memory needs 2\.\d GiB \(weights .* \+ activations 2\.0 GiB", line)
    assert "the target has 300.0 MiB" in line
    _assert_nothing_written(tmp_path, out)


def test_errors_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["build", str(tmp_path / "x.onnx"), "--target", "rpi4", "--json"], capsys)
    assert code == ExitCode.INPUT
    doc = json.loads(out)
    assert doc["error"] == "input" and doc["exit_code"] == ExitCode.INPUT


def test_bad_name_and_version(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(onnx_dir / "mnist.onnx", model)
    code, _, err = _run(["build", str(model), "--target", "rpi4", "--name", "Bad Name"], capsys)
    assert code == ExitCode.USAGE and "--name" in _error_line(err)
    code, _, err = _run(["build", str(model), "--target", "rpi4", "--version", "1 0"], capsys)
    assert code == ExitCode.USAGE and "--version" in _error_line(err)


# --name/--version are the image's repository component and tag: exactly the OCI
# distribution-spec grammar, or podman/docker refuse the bundle at `load` ("invalid reference
# format") after edgepack said it was fine.
@pytest.mark.parametrize(
    ("option", "value"),
    [
        *(
            ("--name", name)
            for name in ["mnist-", "a..b", "a___b", "-a", "a.-b", "_a", "a_", "x" * 64, "a\n", "A"]
        ),
        *(("--version", version) for version in ["1.0+b1", "-1", ".1", "1" * 129, "1 0", "v1:2"]),
    ],
)
def test_name_or_version_outside_the_oci_grammar_is_refused(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    out = tmp_path / "bundle"
    argv = ["build", str(onnx_dir / "mnist.onnx"), "-t", "industrial-pc", "--out", str(out)]
    code, _, err = _run([*argv, option, value], capsys)
    assert code == ExitCode.USAGE
    line = _error_line(err)
    assert option in line
    if value == "1.0+b1":  # semver build metadata: refused, with the fix
        assert "use '-' instead, e.g. --version 1.0-b1" in line
    _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("mnist.onnx", "mnist"),
        ("ResNet50-v1.7.onnx", "resnet50-v1"),
        ("my___model.onnx", "my-model"),
        ("my__model.onnx", "my__model"),
        ("a_-b.onnx", "a-b"),
        ("a--b.onnx", "a--b"),
        ("-_x_-.onnx", "x"),
        ("Ünïcode model.onnx", "n-code-model"),
        ("___.onnx", "model"),
        ("x" * 70 + ".onnx", "x" * 63),
        ("a" * 62 + "_b.onnx", "a" * 62),
    ],
)
def test_default_name_from_the_model_file_is_a_valid_image_name(
    file_name: str, expected: str
) -> None:
    from packager.backends.base import BuildRequest, bundle_name
    from packager.targets import NAME_FORM

    name = bundle_name(BuildRequest(model=Path(file_name), target="rpi4"))
    assert name == expected and NAME_FORM.matches(name)


def test_out_below_a_file_is_a_usage_error(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "bundle"
    code, _, err = _run(
        ["build", str(onnx_dir / "mnist.onnx"), "-t", "industrial-pc", "--out", str(out)], capsys
    )
    assert code == ExitCode.USAGE
    assert "is a file, not a directory" in _error_line(err)
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://x:99999/", "not a valid URL"),
        ("https://x:0/", "port 0 is not in 1-65535"),
        ("https://x/../../", "'..' segments"),
        ("https://x/a/./b", "'..' segments"),
        ("https://x//a", "empty segments"),
        ("https://-x-/", "not a valid host name"),
        ("file:///srv/../etc", "'..' segments"),
        ("https://user@x/", "must match"),
    ],
)
def test_ota_repo_url_is_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, why: str
) -> None:
    """The model does not even exist: the flag is refused first (exit 2, not 3)."""
    root = tmp_path / "1.root.json"
    root.write_text("{}")
    out = tmp_path / "bundle"
    code, _, err = _run(
        ["build", str(tmp_path / "absent.onnx"), "-t", "industrial-pc", "--out", str(out),
         "--ota-repo", url, "--ota-root", str(root)],
        capsys,
    )
    assert code == ExitCode.USAGE
    line = _error_line(err)
    assert "--ota-repo" in line and why in line
    _assert_nothing_written(tmp_path, out)


def test_ota_channel_is_checked_before_the_model_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "1.root.json"
    root.write_text("{}")
    code, _, err = _run(
        ["build", str(tmp_path / "absent.onnx"), "-t", "industrial-pc",
         "--ota-repo", "https://updates.example.com/r/", "--ota-root", str(root),
         "--ota-channel", "Bad Channel"],
        capsys,
    )
    assert code == ExitCode.USAGE and "--ota-channel" in _error_line(err)


def test_a_killed_builds_staging_dir_is_removed_by_the_next_build(
    tmp_path: Path, onnx_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGKILLed build leaves .OUT.PID.RANDOM; the next build to that --out removes it when
    PID is dead, and keeps a live process's (a concurrent build) and other outputs'."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    out = tmp_path / "bundle"
    stale = tmp_path / f".bundle.{dead.pid}.abcd_123"
    live = tmp_path / f".bundle.{os.getpid()}.efgh_456"
    other = tmp_path / f".other.{dead.pid}.ijkl_789"
    for folder in (stale, live, other):
        (folder / "bundle").mkdir(parents=True)
        (folder / "bundle" / "image.tar").write_bytes(b"x" * 1000)
    model = tmp_path / "trunc.onnx"  # fails after staging: the build itself leaves nothing
    model.write_bytes((onnx_dir / "mnist.onnx").read_bytes()[:1000])
    code, _, _ = _run(["build", str(model), "--target", "rpi4", "--out", str(out)], capsys)
    assert code == ExitCode.INPUT
    assert not stale.exists()
    assert live.is_dir() and other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(
        [live.name, other.name]
    )
