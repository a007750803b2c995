"""Device outcome reports: reading them and deciding whether a rollout must halt (pure)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packager.errors import InputError

FAILED_OUTCOMES = frozenset({"rolled-back", "failed"})


@dataclass(frozen=True)
class ReleaseHealth:
    sequence: int
    devices: int  # devices that reported a final outcome for this release
    committed: int
    failed: int

    @property
    def failure_rate(self) -> float:
        return self.failed / self.devices if self.devices else 0.0


def read_reports(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every report in the given .jsonl files or directories of them, oldest first."""
    reports: list[dict[str, Any]] = []
    for path in paths:
        files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    reports.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{file}:{number}: not a JSON report ({exc.msg})") from exc
    return sorted(reports, key=lambda r: str(r.get("time", "")))


def latest_by_device(reports: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for report in reports:
        latest[str(report.get("device_id"))] = report
    return dict(sorted(latest.items()))


def release_health(reports: Iterable[dict[str, Any]], sequence: int) -> ReleaseHealth:
    """Each device counts once, with its last final outcome for the release."""
    final: dict[str, str] = {}
    for report in reports:
        if report.get("sequence") == sequence and report.get("outcome") in (
            FAILED_OUTCOMES | {"committed"}
        ):
            final[str(report.get("device_id"))] = str(report["outcome"])
    failed = sum(1 for outcome in final.values() if outcome in FAILED_OUTCOMES)
    return ReleaseHealth(sequence, len(final), len(final) - failed, failed)


def should_halt(health: ReleaseHealth, threshold: float) -> bool:
    return health.devices > 0 and health.failure_rate > threshold
