"""Data is never code: hostile strings in a target file or a build flag are refused at load.

Every string field of every target model that reaches a bundle (install.sh, the systemd units,
supervise.py, the MCU sources, the apt sources of the image) is tried with a corpus of values an
attacker would use: each is refused with exit 4 (target) or 2 (flag) and one line that names the
file, the field and the allowed form; nothing is written.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from packager.cli import main
from packager.errors import ExitCode, TargetError
from packager.image.debian import source_lines
from packager.image.spec import DebianBase
from packager.render import UnsafeValue, c, comment, py, sh, systemd, systemd_arg
from tests.target_files import dump_toml

# Shell, systemd, Python and C metacharacters, line breaks and a NUL, and a trailing newline
# (which `$` in a regular expression lets through).
HOSTILE = (
    "rpi4\n",
    "a\nb",
    "x\nExecStartPre=/bin/sh -c id",
    "a\r\nb",
    "$(touch /tmp/pwned)",
    "`id`",
    "a'b",
    'a"b',
    "a;b",
    "a && id",
    "[Service]",
    "x\n[Service]\nExecStart=/bin/sh",
    "\x00",
    "a\x00b",
    "%n",
    "a%i",
    "a\\",
    "#x",
    "",
    " lead",
    "a\u202eb",
)

# (shipped target, dotted field path) for every string field that is not a Literal.
FIELDS = (
    ("rpi4", "name"),
    ("rpi4", "description"),
    ("rpi4", "vendor"),
    ("rpi4", "platform.variant"),
    ("rpi4", "cpu.model"),
    ("rpi4", "cpu.isa.0"),
    ("rpi4", "cpu.qemu"),
    ("rpi4", "runtime.base"),
    ("rpi4", "accelerator.name"),
    ("rpi4", "accelerator.compute_capability"),
    ("jetson-nano", "runtime.jetpack"),
    ("jetson-nano", "runtime.l4t"),
    ("jetson-nano", "runtime.base"),
    ("jetson-nano", "runtime.tensorrt"),
    ("jetson-nano", "runtime.cuda"),
    ("stm32f746-disco", "runtime.board"),
    ("stm32f746-disco", "runtime.toolchain"),
    ("stm32f746-disco", "mcu.isa.0"),
)


def _set(doc: dict[str, Any], path: str, value: str) -> None:
    parts = path.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    _, err = capsys.readouterr()
    return int(exc.value.code or 0), err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    return lines[0]


@pytest.mark.parametrize(("target", "field"), FIELDS)
def test_every_hostile_value_in_every_target_field_is_refused_with_exit_4(
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    field: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = tomllib.loads((repo_root / "targets" / f"{target}.toml").read_text("utf-8"))
    for value in HOSTILE:
        doc = json.loads(json.dumps(shipped))
        _set(doc, field, value)
        path = tmp_path / "hostile.toml"
        path.write_text(dump_toml(doc), encoding="utf-8")
        assert tomllib.loads(path.read_text("utf-8")) == doc  # the file holds exactly `value`
        code, err = _run(["targets", "show", "hostile.toml"], capsys)
        assert code == ExitCode.TARGET, (field, value, err)
        line = _error_line(err)
        assert line.startswith(f"error: hostile.toml: {field}: must match "), (value, line)


def test_shipped_values_match_their_forms(repo_root: Path) -> None:
    """The allow-lists are not so tight that a real target fails (the catalogue loads)."""
    from packager.targets import catalogue, resolve_target

    for name in catalogue():
        assert resolve_target(name).name == name


@pytest.mark.parametrize("flag", ["--name", "--version"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_name_and_version_flags_exit_2(
    onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    out = tmp_path / "bundle"
    argv = ["build", str(onnx_dir / "mnist.onnx"), "-t", "rpi4", "-o", str(out), flag, value]
    code, err = _run(argv, capsys)
    assert code == ExitCode.USAGE, err
    assert _error_line(err).startswith(f"error: {flag}: ")
    assert "must match" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--ota-repo", 'http://r/"; import os; os.system("id"); "'),
        ("--ota-repo", "http://r/$(id)"),
        ("--ota-repo", "http://r/`id`"),
        ("--ota-repo", "http://r/\nid"),
        ("--ota-repo", "http://r/x\n"),
        ("--ota-repo", "http://r/a'b"),
        ("--ota-repo", "http://r/?q=1;id"),
        ("--ota-repo", "ftp://r/"),
        ("--ota-channel", 'stable", "engine": "/bin/sh'),
        ("--ota-channel", "stable\n"),
        ("--ota-channel", "$(id)"),
        ("--ota-channel", "a'b"),
        ("--ota-channel", "%n"),
    ],
)
def test_hostile_ota_flags_exit_2(
    onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    root = tmp_path / "root.json"
    root.write_text("{}")
    out = tmp_path / "bundle"
    argv = ["build", str(onnx_dir / "mnist.onnx"), "-t", "rpi4", "-o", str(out),
            "--ota-root", str(root), "--ota-repo", "http://127.0.0.1:8000/repo/", flag, value]
    code, err = _run(argv, capsys)
    assert code == ExitCode.USAGE, err
    assert _error_line(err).startswith(f"error: {flag}: {value!r} must match ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["root.json"]


def test_deeply_nested_target_file_is_exit_4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "deep.toml").write_text('name = "x"\na = ' + "[" * 50_000 + "]" * 50_000 + "\n")
    code, err = _run(["targets", "show", "deep.toml"], capsys)
    assert code == ExitCode.TARGET
    assert _error_line(err) == "error: deep.toml: not valid TOML: nested too deeply"


def test_huge_integer_is_exit_4(
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    text = (repo_root / "targets" / "rpi4.toml").read_text("utf-8")
    (tmp_path / "big.toml").write_text(text.replace("ram_mb = 4096", "ram_mb = " + "9" * 30))
    code, err = _run(["targets", "show", "big.toml"], capsys)
    assert code == ExitCode.TARGET
    assert _error_line(err) == "error: big.toml: memory.ram_mb: must be at most 2147483647"


def test_apt_sources_are_built_from_plain_fields_only() -> None:
    lines = source_lines(DebianBase(suite="bookworm"))
    assert len(lines) == 3 and all(ln.startswith("deb [signed-by=/usr/share/") for ln in lines)
    for suite in ("bookworm main\ndeb [trusted=yes] http://evil/ x", "bookworm\n", "a b", "x]"):
        with pytest.raises(TargetError, match="Debian base: suite"):
            source_lines(DebianBase(suite=suite))
    with pytest.raises(TargetError, match="mirror"):
        source_lines(DebianBase(mirror="http://deb.debian.org/debian [trusted=yes]"))


# --- the escaping filters, each against the language it is for ----------------------------


@pytest.mark.parametrize("value", [v for v in HOSTILE if "\n" not in v and "\x00" not in v
                                   and "\r" not in v])
def test_sh_filter_is_one_word_holding_the_value(value: str) -> None:
    import subprocess

    out = subprocess.run(
        ["sh", "-c", f"V={sh(value)}; printf %s \"$V\""], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout == value


@pytest.mark.parametrize("value", HOSTILE)
def test_py_filter_is_a_literal_of_the_value(value: str) -> None:
    import ast

    assert ast.literal_eval(py(value)) == value
    assert "\n" not in py(value)


@pytest.mark.parametrize("value", HOSTILE)
def test_c_filter_is_one_string_literal(value: str) -> None:
    literal = c(value)
    assert literal.startswith('"') and literal.endswith('"')
    assert all(0x20 <= ord(ch) < 0x7F for ch in literal) and "??" not in literal


def test_unit_and_comment_filters_refuse_what_they_cannot_hold() -> None:
    assert systemd("50%n") == "50%%n"
    assert systemd_arg('a "b" $X %n \\') == '"a \\"b\\" $$X %%n \\\\"'
    for value in ("a\nb", "a\x00", "a\rb"):
        for escape in (systemd, systemd_arg, sh, comment):
            with pytest.raises(UnsafeValue):
                escape(value)
    with pytest.raises(UnsafeValue):
        systemd("trailing\\")
    assert comment("a */ b \\") == "a * / b /"
