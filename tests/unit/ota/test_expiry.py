"""Role expiries through `edgepack ota refresh/status` (issue 10, kind 6): a refresh keeps every
role the timestamp depends on valid at least as long as the timestamp, says so, and refuses a
period that is not a positive number of days. Expiries are read back with tuf's Metadata API."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata

from packager.ota.repo import Expiry, Repository
from tests.cli_runner import run_cli as _cli

DAY = timedelta(days=1)


def _on_disk(repo: Repository) -> dict[str, datetime]:
    """Each top-level role's expiry as a client would load it (timestamp -> snapshot -> ...)."""
    meta = repo.metadata_dir
    timestamp = Metadata.from_file(str(meta / "timestamp.json"))
    snapshot = Metadata.from_file(
        str(meta / f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    )
    targets_version = snapshot.signed.meta["targets.json"].version
    targets = Metadata.from_file(str(meta / f"{targets_version}.targets.json"))
    root_version = max(int(p.name.split(".")[0]) for p in meta.glob("*.root.json"))
    root = Metadata.from_file(str(meta / f"{root_version}.root.json"))
    return {
        "root": root.signed.expires,
        "targets": targets.signed.expires,
        "snapshot": snapshot.signed.expires,
        "timestamp": timestamp.signed.expires,
    }


def _roles(document: dict[str, Any]) -> dict[str, str]:
    return {r["role"]: r["expires"] for r in document["roles"]}


def test_refresh_for_30_days_keeps_every_role_30_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repository.init(tmp_path / "r", expiry=Expiry(targets=5 * DAY))
    before = datetime.now(UTC).replace(microsecond=0)
    code, out, err = _cli(
        ["ota", "refresh", "--repo", str(repo.path), "--timestamp-days", "30", "--json"], capsys
    )
    assert code == 0, out + err
    for role, when in _on_disk(repo).items():
        assert when >= before + 30 * DAY, f"{role} expires {when}"
    document = json.loads(out)
    assert document["resigned"] == ["targets"] and document["warnings"] == []
    code, out, err = _cli(["ota", "status", "--repo", str(repo.path), "--json"], capsys)
    assert code == 0, out + err
    status = _roles(json.loads(out))
    assert status == _roles(document)
    assert status == {k: f"{v:%Y-%m-%dT%H:%M:%SZ}" for k, v in _on_disk(repo).items()}
    code, out, _ = _cli(["ota", "status", "--repo", str(repo.path)], capsys)
    assert code == 0 and all(role in out for role in status), out


def test_daily_refresh_renews_targets_before_they_expire(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Targets signed for 5 days, then the daily cron refresh (timestamp 1 day, snapshot 7):
    targets must outlive the snapshot that points at them, or devices refuse from day 5."""
    repo = Repository.init(tmp_path / "r", expiry=Expiry(targets=5 * DAY))
    code, out, err = _cli(["ota", "refresh", "--repo", str(repo.path)], capsys)
    assert code == 0, out + err
    expires = _on_disk(repo)
    assert expires["timestamp"] <= expires["snapshot"] <= expires["targets"] <= expires["root"]
    assert "signed anew" in out and "targets" in out, out


@pytest.mark.parametrize("days", ["0", "-1", "1e9", "nan"])
def test_bad_period_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], days: str
) -> None:
    repo = Repository.init(tmp_path / "r")
    before = sorted(p.name for p in repo.metadata_dir.iterdir())
    stick = tmp_path / "usb"
    for argv in (
        ["ota", "refresh", "--repo", str(repo.path), "--timestamp-days", days],
        ["ota", "export", "--repo", str(repo.path), "--usb", str(stick), "--timestamp-days", days],
    ):
        code, out, err = _cli(argv, capsys)
        assert code == 2, out + err
        assert "--timestamp-days" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == before
    assert not stick.exists()
