"""Device outcome reports: reading them and deciding whether a rollout must halt (pure)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.bounded import read_bounded
from packager.errors import InputError

FAILED_OUTCOMES = frozenset({"rolled-back", "failed"})


@dataclass(frozen=True)
class ReleaseHealth:
    """How release ``sequence`` fares: devices with a final outcome, of them how many committed
    and how many rolled back or failed; ``failure_rate`` is failed / devices (0.0 with none)."""

    sequence: int
    devices: int  # devices that reported a final outcome for this release
    committed: int
    failed: int

    @property
    def failure_rate(self) -> float:
        return self.failed / self.devices if self.devices else 0.0


# A device appends one line of a few hundred bytes per update attempt (packager.agent.agent
# _queue_report): a file of this size is tens of thousands of attempts, a line of this size far
# more than any report the agent writes; anything larger was not written by the agent.
MAX_REPORT_FILE_BYTES = 64 * 1024 * 1024
MAX_REPORT_LINE_BYTES = 64 * 1024
# What a summary keeps: the latest report of each device, counted as the text it was read from
# plus KEPT_ENTRY_BYTES (parsed, a report takes a few times its text, and every device's entry
# a floor of Python objects: measured with CPython 3.11, ~500 bytes for the 21-byte line
# '{"device_id":123456}', ~2,000 for an agent's ~300-byte report). 256 MiB is ~330,000 devices
# of ~300 bytes in ~650 MB; a repository's own reports/ growing with every release does not grow
# this, new devices do. Without the floor, 256 MiB of 21-byte lines held 6.6 GB.
MAX_KEPT_BYTES = 256 * 1024 * 1024
KEPT_ENTRY_BYTES = 512


def _report_files(directory: Path) -> list[Path]:
    """The ``*.jsonl`` entries below ``directory``, sorted; iterative (a stick's tree may nest
    deeper than Python's recursion limit, which ``Path.rglob`` hits), never into a symlinked
    directory. Names starting with a dot are passed over (macOS writes ``._NAME`` resource forks
    beside every file on a FAT stick; the agent never writes such a name). A directory this user
    may not list (an ext4 stick's lost+found) is skipped, as ``rglob`` did; any other listing
    error is an InputError naming the directory."""
    found: list[Path] = []
    pending = [directory]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                    elif entry.name.endswith(".jsonl"):
                        found.append(Path(entry.path))
        except PermissionError:
            if current == directory:
                raise InputError(f"{current}: cannot be read: permission denied") from None
        except OSError as exc:
            raise InputError(f"{current}: cannot be read: {exc.strerror or exc}") from exc
    return sorted(found)


@dataclass(frozen=True)
class ReadReport:
    """One report as read: where it stands (``file``, 1-based ``line``), its text's ``size`` in
    bytes and the JSON object itself."""

    file: Path
    line: int
    size: int
    report: dict[str, Any]


def read_reports(paths: Iterable[Path]) -> Iterator[ReadReport]:
    """Every report (a JSON object a line) in the given .jsonl files or directories of them
    (searched below, symlinks never followed: reports come from USB sticks), in file order.
    One file is held at a time, and one line parsed at a time.

    InputError naming ``file:line`` for a line that is not a JSON object, not UTF-8 or longer
    than :data:`MAX_REPORT_LINE_BYTES`, and naming the file for one that is a symlink inside a
    searched directory, not a regular file (a FIFO is never waited on) or larger than
    :data:`MAX_REPORT_FILE_BYTES`."""
    for path in paths:
        files = _report_files(path) if path.is_dir() else [path]
        for file in files:
            data = read_bounded(file, MAX_REPORT_FILE_BYTES, follow_symlinks=not path.is_dir(),
                                what="not a device report file")
            # One line at a time (not data.split(): 64 MiB of "\n" is 67 million objects).
            for number, line in enumerate(io.BytesIO(data), 1):
                if not line.strip():
                    continue
                if len(line) > MAX_REPORT_LINE_BYTES:
                    raise InputError(f"{file}:{number}: longer than {MAX_REPORT_LINE_BYTES} "
                                     "bytes: not a device report")
                yield ReadReport(file, number, len(line), _parse(file, number, line))


def _parse(file: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        report = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}:{number}: not UTF-8 text") from exc
    except ValueError as exc:  # JSONDecodeError, an int too long to convert
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InputError(f"{file}:{number}: not a JSON report ({reason})") from exc
    except RecursionError as exc:
        raise InputError(f"{file}:{number}: not a JSON report (nested too deeply)") from exc
    if not isinstance(report, dict):
        raise InputError(
            f"{file}:{number}: a report is a JSON object, found {type(report).__name__}"
        )
    return report


def _final_outcome(report: dict[str, Any], sequence: int) -> str | None:
    """The report's outcome when it is a final one (committed, rolled back, failed) of release
    ``sequence``; else None. Reports are untrusted: an outcome that is not a string (a list is
    unhashable) or a sequence that is not an int (true == 1) is not a final outcome."""
    seq, outcome = report.get("sequence"), report.get("outcome")
    if type(seq) is int and seq == sequence and isinstance(outcome, str) and outcome in (
        FAILED_OUTCOMES | {"committed"}
    ):
        return outcome
    return None


def _health(sequence: int, outcomes: Iterable[str]) -> ReleaseHealth:
    listed = list(outcomes)
    failed = sum(1 for outcome in listed if outcome in FAILED_OUTCOMES)
    return ReleaseHealth(sequence, len(listed), len(listed) - failed, failed)


@dataclass(frozen=True)
class ReportSummary:
    """What ``ota status`` shows: each device's latest report (by device id) and, for release
    ``sequence``, how many devices committed it or rolled it back (None without a release)."""

    devices: dict[str, dict[str, Any]]
    health: ReleaseHealth | None


def summarize(reports: Iterable[ReadReport], sequence: int | None) -> ReportSummary:
    """One pass over ``reports`` in any order, keeping only each device's latest report (by its
    ``time``; of two with the same time, the one read last) and its latest final outcome for
    release ``sequence``: memory grows with the devices, not with the reports.

    InputError naming ``file:line`` when the kept reports pass :data:`MAX_KEPT_BYTES`."""
    latest: dict[str, tuple[str, int, dict[str, Any]]] = {}
    final: dict[str, tuple[str, str]] = {}
    kept = 0
    for read in reports:
        report = read.report
        device, when = str(report.get("device_id")), str(report.get("time", ""))
        old = latest.get(device)
        if old is None or when >= old[0]:
            kept += (read.size - old[1]) if old else (read.size + KEPT_ENTRY_BYTES)
            if kept > MAX_KEPT_BYTES:
                raise InputError(
                    f"{read.file}:{read.line}: the devices' latest reports pass "
                    f"{MAX_KEPT_BYTES} bytes in all: more devices than edgepack summarises",
                    hint="read the reports of fewer devices at a time",
                )
            latest[device] = (when, read.size, report)
        outcome = _final_outcome(report, sequence) if sequence is not None else None
        if outcome is not None and (device not in final or when >= final[device][0]):
            final[device] = (when, outcome)
    return ReportSummary(
        devices={device: latest[device][2] for device in sorted(latest)},
        health=None if sequence is None else _health(sequence, (o for _, o in final.values())),
    )


def should_halt(health: ReleaseHealth, threshold: float) -> bool:
    """Whether the rollout must halt: some device reported a final outcome and the failure rate
    is above ``threshold`` (a fraction from 0 to 1: ``ota status --halt-if``)."""
    return health.devices > 0 and health.failure_rate > threshold
