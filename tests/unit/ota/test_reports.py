"""Device reports picked up from USB sticks (`edgepack ota status --reports`): untrusted files.
Each bad one is one line naming file (and line), a non-zero exit and never a traceback or a hang,
also under --json. Before packager.bounded: invalid UTF-8 and a non-object line were internal
errors (exit 1), and a FIFO named *.jsonl held the command forever."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from packager.errors import ExitCode, InputError
from packager.ota import reports as reports_module
from packager.ota.reports import read_reports, summarize
from tests.cli_runner import run_cli as _cli


def _report(device: str, outcome: str, second: int, sequence: int = 1) -> str:
    return json.dumps({"device_id": device, "sequence": sequence, "outcome": outcome,
                       "time": f"2026-01-01T00:00:{second:02d}"}) + "\n"


def _read(paths: list[Path]) -> list[dict[str, object]]:
    return [read.report for read in read_reports(paths)]


def test_reads_files_and_directories_in_file_order(tmp_path: Path) -> None:
    stick = tmp_path / "stick" / "edgepack" / "reports"
    stick.mkdir(parents=True)
    (stick / "a.jsonl").write_text(_report("a", "committed", 3) + "\n" + _report("b", "failed", 1))
    (tmp_path / "c.jsonl").write_text(_report("c", "committed", 2))
    (stick / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    found = list(read_reports([tmp_path / "stick", tmp_path / "c.jsonl"]))
    assert [(r.file.name, r.line, r.report["device_id"]) for r in found] == [
        ("a.jsonl", 1, "a"), ("a.jsonl", 3, "b"), ("c.jsonl", 1, "c")]


def test_summary_keeps_each_devices_latest_report_and_final_outcome(tmp_path: Path) -> None:
    """Reports come in any order (several sticks, the collector's file): the latest by time
    wins, and of two with the same time the one read last (as a stable sort by time did)."""
    (tmp_path / "1.jsonl").write_text(
        _report("a", "rolled-back", 5) + _report("b", "committed", 1)
        + _report("a", "downloading", 9, sequence=2) + _report("c", "failed", 4))
    (tmp_path / "2.jsonl").write_text(
        _report("a", "committed", 2) + _report("b", "failed", 1) + _report("c", "committed", 3))
    summary = summarize(read_reports([tmp_path]), 1)
    assert {d: (r["outcome"], r["sequence"]) for d, r in summary.devices.items()} == {
        "a": ("downloading", 2), "b": ("failed", 1), "c": ("failed", 1)}
    assert list(summary.devices) == ["a", "b", "c"]
    health = summary.health
    assert health is not None
    # a: rolled-back at :05 beats committed at :02; b: failed read last at the same :01;
    # c: failed at :04 beats committed at :03.
    assert (health.devices, health.committed, health.failed) == (3, 0, 3)
    assert summarize(read_reports([tmp_path]), None).health is None


@pytest.mark.parametrize(("content", "problem"), [
    (b"\xff\xfe\n", "1: not UTF-8 text"),
    (b'{"device_id": "a"}\n[1, 2]\n', "2: a report is a JSON object, found list"),
    (b"null\n", "1: a report is a JSON object, found NoneType"),
    (b"{not json\n", "1: not a JSON report (Expecting property name enclosed in double quotes)"),
    (b"[" * 60_000 + b"\n", "1: not a JSON report (nested too deeply)"),
    (b"1" * 5000 + b"\n", "1: not a JSON report (Exceeds the limit (4300 digits) for integer "
                          "string conversion: value has 5000 digits; use "
                          "sys.set_int_max_str_digits() to increase the limit)"),
])
def test_a_bad_line_is_one_line_naming_file_and_line(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "device.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as raised:
        _read([tmp_path])
    assert raised.value.message == f"{path}:{problem}"


def test_a_fifo_on_the_stick_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "device.jsonl")
    with pytest.raises(InputError, match=r"device\.jsonl: not a regular file$"):
        _read([tmp_path])


def test_links_on_the_stick_are_never_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jsonl").write_text(_report("x", "committed", 1))
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "dir").symlink_to(elsewhere)  # a linked directory is not searched
    assert _read([stick]) == []
    (stick / "y.jsonl").symlink_to(elsewhere / "x.jsonl")  # a linked file is refused
    with pytest.raises(InputError, match=r"y\.jsonl: is a symbolic link$"):
        _read([stick])
    # A file the operator names on the command line is theirs to point anywhere.
    assert len(_read([stick / "y.jsonl"])) == 1


def test_a_file_over_the_cap_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reports_module, "MAX_REPORT_FILE_BYTES", 100)
    (tmp_path / "device.jsonl").write_text(_report("a", "committed", 1) * 2)
    with pytest.raises(InputError, match="larger than 100 bytes: not a device report file"):
        _read([tmp_path])


@pytest.mark.parametrize("as_json", [False, True])
def test_ota_status_reports_a_bad_stick_in_one_line_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    repo = tmp_path / "repo"
    assert _cli(["ota", "init", str(repo)], capsys)[0] == 0
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "device.jsonl").write_bytes(b"\xff\n")
    code, out, err = _cli(["ota", "status", "--repo", str(repo), "--reports", str(stick),
                           *(["--json"] if as_json else [])], capsys)
    assert code == ExitCode.INPUT
    expected = f"{stick / 'device.jsonl'}:1: not UTF-8 text"
    if as_json:
        assert json.loads(out)["message"] == expected
    else:
        assert err.strip() == f"error: {expected}"


def _remove_deep(top: Path, depth: int) -> None:
    """Remove the chain top/d/d/.../deep.jsonl bottom-up, by relative steps (shutil.rmtree and
    pytest's own clean-up recurse once per level and would fail on it)."""
    parents = [os.open(top, os.O_RDONLY)]
    for _ in range(depth):
        try:
            parents.append(os.open("d", os.O_RDONLY, dir_fd=parents[-1]))
        except FileNotFoundError:
            break
    try:
        os.unlink("deep.jsonl", dir_fd=parents[-1])
    except FileNotFoundError:
        pass
    while len(parents) > 1:
        os.close(parents.pop())
        os.rmdir("d", dir_fd=parents[-1])
    os.close(parents[0])


def test_a_stick_nested_deeper_than_the_recursion_limit_is_searched(tmp_path: Path) -> None:
    """Before: Path.rglob recursed once per directory level, and a stick 1,500 directories deep
    was an internal error (RecursionError, exit 1) of `edgepack ota status`."""
    stick = tmp_path / "stick"
    stick.mkdir()
    depth = 1500  # relative steps: the deepest path stays under PATH_MAX (~3 KiB here)
    fd = os.open(stick, os.O_RDONLY)
    try:
        try:
            for _ in range(depth):
                os.mkdir("d", dir_fd=fd)
                inner = os.open("d", os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = inner
            report = os.open("deep.jsonl", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(report, _report("deep", "committed", 1).encode())
            os.close(report)
        finally:
            os.close(fd)
        assert [r["device_id"] for r in _read([stick])] == ["deep"]
    finally:
        _remove_deep(stick, depth)


def test_a_line_longer_than_any_report_is_refused(tmp_path: Path) -> None:
    line = json.dumps({"device_id": "a", "reason": "x" * reports_module.MAX_REPORT_LINE_BYTES})
    (tmp_path / "device.jsonl").write_text(_report("a", "committed", 1) + line + "\n")
    with pytest.raises(InputError) as raised:
        _read([tmp_path])
    assert raised.value.message == (f"{tmp_path / 'device.jsonl'}:2: longer than "
                                    f"{reports_module.MAX_REPORT_LINE_BYTES} bytes: not a device "
                                    "report")


def test_the_summary_is_bounded_by_its_devices_not_by_the_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every report of every file was kept (64 MiB of "{}" lines held 2.9 GB). Now a
    repository's reports/ growing with each release keeps one report a device; only new
    devices grow the summary, up to MAX_KEPT_BYTES."""
    size = len(_report("0", "committed", 0)) + reports_module.KEPT_ENTRY_BYTES
    monkeypatch.setattr(reports_module, "MAX_KEPT_BYTES", 3 * size)
    many = "".join(_report(str(n % 3), "committed", n % 60) for n in range(3000))
    (tmp_path / "reports.jsonl").write_text(many)
    assert list(summarize(read_reports([tmp_path]), 1).devices) == ["0", "1", "2"]
    (tmp_path / "z.jsonl").write_text(_report("3", "committed", 1))
    with pytest.raises(InputError) as raised:
        summarize(read_reports([tmp_path]), 1)
    assert raised.value.message == (
        f"{tmp_path / 'z.jsonl'}:1: the devices' latest reports pass {3 * size} bytes in all: "
        "more devices than edgepack summarises")


@pytest.mark.parametrize("hostile", [
    {"sequence": 1, "outcome": ["failed"]},  # unhashable: TypeError out of the set test
    {"sequence": 1, "outcome": {"failed": 1}},
    {"sequence": True, "outcome": "failed"},  # true == 1
    {"sequence": 1.0, "outcome": "failed"},
])
def test_a_hostile_outcome_or_sequence_is_not_a_final_outcome(hostile: dict[str, object]) -> None:
    """Before: a report whose outcome was a list made `ota status` an internal error (exit 1)
    once the channel had a release; a sequence of true counted for release 1."""
    good = {"device_id": "a", "sequence": 1, "outcome": "committed"}
    reads = [reports_module.ReadReport(Path("r.jsonl"), n, 100, report)
             for n, report in enumerate([good, {"device_id": "b", **hostile}], 1)]
    health = summarize(reads, 1).health
    assert health is not None
    assert (health.devices, health.committed, health.failed) == (1, 1, 0)


def test_lines_are_taken_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: data.split(b"\\n") made every line an object at once: 1 MB of blank lines peaked
    at ~16x the file's size (2x now: read_bounded's buffer), 64 MiB of "{}" lines at gigabytes."""
    size = 1_000_000
    # read_bounded's buffer is the cap + 1 (allocated, not touched): keep it near the file's size.
    monkeypatch.setattr(reports_module, "MAX_REPORT_FILE_BYTES", 2 * size)
    (tmp_path / "device.jsonl").write_bytes(b"  \n" * (size // 3))  # blank lines, skipped
    tracemalloc.start()
    try:
        assert _read([tmp_path]) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * size


def test_many_tiny_reports_are_counted_at_what_they_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a device's kept report counted as its text alone, and a 21-byte line holds ~25
    times that as Python objects: 256 MiB of '{"device_id":N}' lines (a few files on a stick)
    held 6.6 GB. Now each device counts KEPT_ENTRY_BYTES more, so the cap stops the summary
    near the memory it names."""
    cap = 1024 * 1024
    monkeypatch.setattr(reports_module, "MAX_KEPT_BYTES", cap)
    text = "".join(f'{{"device_id":{n}}}\n' for n in range(60_000)).encode()
    monkeypatch.setattr(reports_module, "MAX_REPORT_FILE_BYTES", 2 * len(text))
    (tmp_path / "stick.jsonl").write_bytes(text)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="more devices than edgepack summarises"):
            summarize(read_reports([tmp_path]), 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # read_bounded's buffer (the file cap, 2x the text) and the text, plus what is kept.
    assert peak < 3 * len(text) + 2 * cap, peak  # old code: 23.6 MB
