from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from packager.errors import TargetError
from packager.targets import (
    MAX_TARGET_FILE_BYTES,
    JetsonTarget,
    LinuxTarget,
    McuTarget,
    catalogue,
    load_target_file,
    resolve_target,
)

CLASSES = {"linux-container": LinuxTarget, "jetson": JetsonTarget, "mcu": McuTarget}


def test_every_shipped_target_loads(repo_root: Path) -> None:
    files = sorted((repo_root / "targets").glob("*.toml"))
    assert files, "no shipped targets"
    assert set(catalogue()) == {f.stem for f in files}
    for f in files:
        raw = tomllib.loads(f.read_text(encoding="utf-8"))
        loaded = resolve_target(f.stem)
        assert loaded.name == f.stem == raw["name"]
        assert isinstance(loaded.spec, CLASSES[raw["device_class"]])
        assert loaded.source == f"targets/{f.name}"


@pytest.fixture
def rpi4_copy(repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of rpi4.toml at ./targets/rpi4.toml in a temp working directory."""
    folder = tmp_path / "targets"
    folder.mkdir()
    copy = folder / "rpi4.toml"
    copy.write_text((repo_root / "targets" / "rpi4.toml").read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _error(path: Path) -> str:
    with pytest.raises(TargetError) as err:
        resolve_target(path.stem, directory=path.parent)
    line = err.value.one_line()
    assert "\n" not in line
    return line


def test_copy_loads_unchanged(rpi4_copy: Path) -> None:
    assert resolve_target("rpi4", directory=rpi4_copy.parent).source == "targets/rpi4.toml"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "ram_mb = 4096",
            "ram_mb = 0",
            "targets/rpi4.toml: memory.ram_mb: must be a positive integer",
        ),
        (
            "ram_mb = 4096",
            "ram_mb = -1",
            "targets/rpi4.toml: memory.ram_mb: must be a positive integer",
        ),
        (
            "ram_mb = 4096",
            'ram_mb = "4096"',
            "targets/rpi4.toml: memory.ram_mb: must be an integer",
        ),
        (
            "reserved_mb = 512",
            "reserved_mb = -1",
            "targets/rpi4.toml: memory.reserved_mb: must be zero or a positive integer",
        ),
        (
            "ram_mb = 4096",
            "ram_mb = 4096\nram_mbb = 1",
            "targets/rpi4.toml: memory.ram_mbb: unknown key (did you mean 'ram_mb'?)",
        ),
        (
            'arch = "arm64"',
            'arch = "arm46"',
            "targets/rpi4.toml: platform.arch: must be one of arm64, amd64, armv7 "
            "(did you mean 'arm64'?)",
        ),
        (
            'device_class = "linux-container"',
            'device_class = "linux-contianer"',
            "targets/rpi4.toml: device_class: must be one of linux-container, jetson, mcu "
            "(did you mean 'linux-container'?)",
        ),
        (
            'device_class = "linux-container"',
            "",
            "targets/rpi4.toml: device_class: is required (one of linux-container, jetson, mcu)",
        ),
        (
            "[memory]\nram_mb = 4096\nreserved_mb = 512\n",
            "",
            "targets/rpi4.toml: memory: is required",
        ),
        (
            'kind = "none"',
            'kind = "none"\ntops = nan',
            "targets/rpi4.toml: accelerator.tops: must be a finite number",
        ),
        (
            'kind = "none"',
            'kind = "none"\ntops = -1.5',
            "targets/rpi4.toml: accelerator.tops: must be a positive number",
        ),
        # accelerator.tops is strict like every other number: no string, bool or absurd value.
        (
            'kind = "none"',
            'kind = "none"\ntops = "12"',
            "targets/rpi4.toml: accelerator.tops: must be a number (not a string or true/false)",
        ),
        (
            'kind = "none"',
            'kind = "none"\ntops = true',
            "targets/rpi4.toml: accelerator.tops: must be a number (not a string or true/false)",
        ),
        (
            'kind = "none"',
            'kind = "none"\ntops = 1e40',
            "targets/rpi4.toml: accelerator.tops: must be at most 2147483647",
        ),
        (
            "memory_max_mb = 2048",
            "memory_max_mb = 99999999",
            "targets/rpi4.toml: service.memory_max_mb: must be at most 1048576",
        ),
        (
            'variant = "v8"',
            'variant = "v8\\n"',
            "targets/rpi4.toml: platform.variant: must match 'v' and a number, as OCI platform "
            "variants are (e.g. v8)",
        ),
        (
            'base = "debian:bookworm"',
            'base = "debian:bookworm main\\ndeb [trusted=yes] http://evil.example/ x"',
            "targets/rpi4.toml: runtime.base: must match debian:SUITE with a lower-case Debian "
            "suite name (e.g. debian:bookworm)",
        ),
    ],
)
def test_error_messages(rpi4_copy: Path, old: str, new: str, expected: str) -> None:
    _edit(rpi4_copy, old, new)
    assert _error(rpi4_copy) == expected


def test_misspelt_required_key_reports_the_unknown_key_first(rpi4_copy: Path) -> None:
    _edit(rpi4_copy, "ram_mb = 4096", "ramm_mb = 4096")
    line = _error(rpi4_copy)
    assert line.startswith(
        "targets/rpi4.toml: memory.ramm_mb: unknown key (did you mean 'ram_mb'?)"
    )
    assert "1 more problem" in line


def test_toml_syntax_error(rpi4_copy: Path) -> None:
    _edit(rpi4_copy, "ram_mb = 4096", "ram_mb = = 4096")
    text = rpi4_copy.read_text(encoding="utf-8")
    line_no = next(i for i, ln in enumerate(text.splitlines(), 1) if "= =" in ln)
    line = _error(rpi4_copy)
    assert line.startswith("targets/rpi4.toml: not valid TOML")
    assert f"line {line_no}" in line


def test_unknown_target_name_suggests(rpi4_copy: Path) -> None:
    with pytest.raises(TargetError) as err:
        resolve_target("rpi44", directory=rpi4_copy.parent)
    assert "unknown target 'rpi44' (did you mean 'rpi4'?)" in err.value.one_line()
    assert "--target" in err.value.one_line()


def test_name_must_match_file_name(rpi4_copy: Path) -> None:
    renamed = rpi4_copy.with_name("rpi9.toml")
    rpi4_copy.rename(renamed)
    with pytest.raises(TargetError, match="rpi9"):
        resolve_target("rpi9", directory=renamed.parent)


def test_target_given_as_path(rpi4_copy: Path, tmp_path: Path) -> None:
    mine = tmp_path / "my-board.toml"
    mine.write_text(rpi4_copy.read_text(encoding="utf-8").replace('"rpi4"', '"my-board"', 1))
    for given in (str(mine), "./my-board.toml", "my-board.toml"):
        loaded = resolve_target(given)
        assert loaded.name == "my-board"
        assert loaded.source == "my-board.toml"
    with pytest.raises(TargetError, match=r"missing\.toml: target file not found"):
        resolve_target("./missing.toml")


def test_load_target_file_rejects_binary(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(TargetError, match="not a UTF-8 text file"):
        load_target_file(bad)


def test_load_target_file_reads_at_most_its_cap(rpi4_copy: Path) -> None:
    """A target padded past MAX_TARGET_FILE_BYTES is refused (read through packager.bounded),
    even though it is valid TOML."""
    with rpi4_copy.open("ab") as handle:
        handle.write(b"#" * MAX_TARGET_FILE_BYTES + b"\n")
    with pytest.raises(TargetError) as raised:
        load_target_file(rpi4_copy)
    assert raised.value.message.endswith(
        f": larger than {MAX_TARGET_FILE_BYTES} bytes: not a target file")


def test_integer_tops_is_still_a_number(rpi4_copy: Path) -> None:
    _edit(rpi4_copy, 'kind = "none"', 'kind = "npu"\ntops = 13')
    spec = load_target_file(rpi4_copy).spec
    assert isinstance(spec, LinuxTarget) and spec.accelerator.tops == 13.0


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('l4t = "r36.3.0"', 'l4t = "r36.03.0"', "runtime.l4t"),
        ('tensorrt = "8.6.2"', 'tensorrt = "08.6.2"', "runtime.tensorrt"),
    ],
)
def test_jetson_versions_with_leading_zeros_name_their_field(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str,
    field: str,
) -> None:
    """A leading zero the device never writes (/etc/nv_tegra_release, TensorRT's banner) is
    refused at the field, not as a '(top level)' error from the range check (review finding)."""
    folder = tmp_path / "targets"
    folder.mkdir()
    copy = folder / "jetson-orin-nano.toml"
    copy.write_text((repo_root / "targets" / "jetson-orin-nano.toml").read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    _edit(copy, old, new)
    assert _error(copy).startswith(f"targets/jetson-orin-nano.toml: {field}: must match"), (
        _error(copy))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_target_path_that_is_not_a_file_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Before: a FIFO or directory named *.toml was "target file not found (check the path)";
    now read_bounded says what is there (and never waits on the FIFO)."""
    monkeypatch.chdir(tmp_path)
    os.mkfifo("board.toml") if kind == "fifo" else os.mkdir("board.toml")
    with pytest.raises(TargetError) as raised:
        resolve_target("board.toml")
    assert raised.value.message == "board.toml: not a regular file"
