"""Offline metadata lasts as long as promised (issue 10, kind 6), through the real path: a real TUF
repository, `edgepack ota export --usb DIR --timestamp-days N` through the CLI entry point, and the
agent's own TUF client (tuf.ngclient, packager.agent.trust) reading the stick with the device's
clock moved forward.

The clock is moved through packager.agent.trust.now, the agent's named test seam: tuf's Updater
takes its reference time from it, and nothing else in tuf is touched. Day 31 of a 30-day stick
must be refused, which proves the moved clock reaches every expiry check.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, MetaFile, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from packager.agent import trust
from packager.agent.__main__ import main as agent_main
from packager.agent.agent import init_device
from packager.agent.fetch import Transport
from packager.agent.protocol import USB_SUBDIR
from packager.ota.repo import Expiry, Repository
from tests.cli_runner import run_cli as _edgepack
from tests.unit.agent.helpers import assert_complete, free_port
from tests.unit.ota.synth import make_bundle

DAY = timedelta(days=1)


def _export(
    repo: Path, stick: Path, days: int, capsys: pytest.CaptureFixture[str]
) -> tuple[str, str]:
    """`edgepack ota export` as a user runs it; returns (stdout, stderr)."""
    argv = ["ota", "export", "--repo", str(repo), "--usb", str(stick)]
    code, out, err = _edgepack([*argv, "--timestamp-days", str(days)], capsys)
    assert code == 0, out + err
    return out, err


def _export_json(
    repo: Path, stick: Path, days: int, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    argv = ["ota", "export", "--repo", str(repo), "--usb", str(stick)]
    code, out, err = _edgepack([*argv, "--timestamp-days", str(days), "--json"], capsys)
    assert code == 0, out + err
    document: dict[str, Any] = json.loads(out)
    return document


def _expires(document: dict[str, Any]) -> dict[str, datetime]:
    return {
        r["role"]: datetime.strptime(r["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        for r in document["roles"]
    }


def _clock(monkeypatch: pytest.MonkeyPatch, days: float) -> None:
    start = datetime.now(UTC)
    moved: Callable[[], datetime] = lambda: start + days * DAY  # noqa: E731
    monkeypatch.setattr(trust, "now", moved)


def _client_refresh(tmp: Path, repo: Repository, stick: Path, name: str) -> None:
    """The agent's TUF client alone (no install) on a fresh device trusting 1.root.json."""
    device = tmp / name
    init_device(device, repo.trusted_root)
    url = (stick / USB_SUBDIR).resolve().as_uri() + "/"
    trust.Repo(device / "tuf", url, Transport(timeout_s=5.0)).refresh()


def _agent_usb(
    tmp: Path, repo: Repository, stick: Path, engine: Path, name: str, capsys: Any
) -> tuple[int, dict[str, Any], Path, int]:
    """One cycle of the agent's CLI (`run --usb DIR --once`) on a fresh device."""
    device = tmp / name
    init_device(device, repo.trusted_root)
    port = free_port()
    code = agent_main(
        ["run", "--root", str(device), "--usb", str(stick), "--device-id", name,
         "--platform", "linux/amd64", "--engine", str(engine), "--port", str(port),
         "--trial", "0.2", "--poll", "0.1", "--ready-timeout", "5", "--once"]
    )  # fmt: skip
    return code, json.loads(capsys.readouterr().out.splitlines()[-1]), device, port


def test_usb_stick_exported_for_30_days_is_accepted_until_day_30(
    tmp_path: Path,
    repo: Repository,
    engine: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = random.Random(10)
    bundle = make_bundle(tmp_path / "bundle", model=rng.randbytes(4096), base=rng.randbytes(4096))
    repo.publish(bundle.path)
    stick = tmp_path / "usb"
    out, err = _export(repo.path, stick, 30, capsys)

    for day in (8, 29):
        _clock(monkeypatch, day)
        code, result, device, port = _agent_usb(tmp_path, repo, stick, engine, f"day-{day}", capsys)
        assert (code, result["outcome"]) == (0, "committed"), (day, result)
        assert_complete(device, 1, port)

    _clock(monkeypatch, 31)
    code, result, device, _ = _agent_usb(tmp_path, repo, stick, engine, "day-31", capsys)
    assert (code, result["outcome"]) == (3, "refused"), result
    assert "expired" in result["reason"], result
    assert not (device / "current").exists()

    for role in ("root", "targets", "snapshot", "timestamp"):  # each role's expiry is printed
        assert re.search(rf"{role}\s.*\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", out), out
    assert "valid until" in out and "warning" not in err, out + err

    # The same promise, machine-readable.
    before = datetime.now(UTC).replace(microsecond=0)
    document = _export_json(repo.path, tmp_path / "usb2", 30, capsys)
    expires = _expires(document)
    assert set(expires) == {"root", "targets", "snapshot", "timestamp"}
    for role, when in expires.items():
        assert when >= before + 30 * DAY, f"{role} expires {when}, before the 30 days promised"
    assert document["warnings"] == [] and document["valid_until"] == min(
        r["expires"] for r in document["roles"]
    )


@pytest.mark.parametrize("short", ["targets", "root"])
def test_roles_signed_shorter_are_resigned_for_the_period(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    short: str,
) -> None:
    """A repository whose targets (online key) or root (root keys still in keys/root) were
    signed for 10 days: the 30-day export signs them anew, and the client accepts on day 29."""
    repo = Repository.init(tmp_path / "repo", expiry=Expiry(**{short: 10 * DAY}))
    stick = tmp_path / "usb"
    out, err = _export(repo.path, stick, 30, capsys)
    _clock(monkeypatch, 29)
    _client_refresh(tmp_path, repo, stick, "day-29")
    assert re.search(rf"signed anew .*{short}", out) and "warning" not in err, out + err
    document = _export_json(repo.path, tmp_path / "usb2", 30, capsys)
    assert min(_expires(document).values()) >= datetime.now(UTC) + 29 * DAY


def test_root_keys_offline_short_root_is_warned_and_the_warning_is_true(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = Repository.init(tmp_path / "repo", expiry=Expiry(root=10 * DAY))
    shutil.move(repo.path / "keys" / "root", tmp_path / "offline-root-keys")
    stick = tmp_path / "usb"
    argv = ["ota", "export", "--repo", str(repo.path), "--usb", str(stick)]
    code, out, err = _edgepack([*argv, "--timestamp-days", "30"], capsys)
    assert code == 0, out + err
    assert "root metadata expires" in err and "keys/root" in err, err
    assert "root" in out and "valid until" in out, out
    document = _export_json(repo.path, stick, 30, capsys)
    assert [w.split()[0] for w in document["warnings"]] == ["root"]
    assert _expires(document)["root"] < datetime.now(UTC) + 11 * DAY
    _clock(monkeypatch, 9)
    _client_refresh(tmp_path, repo, stick, "day-9")
    _clock(monkeypatch, 11)
    with pytest.raises(trust.TrustError, match="expired"):
        _client_refresh(tmp_path, repo, stick, "day-11")


def test_delegated_role_signed_shorter_is_resigned_for_the_period(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A delegated targets role ('team', its key in keys/online) signed for 10 days: the client
    walks the delegation to find team/tool, so the 30-day export must sign it anew too."""
    repo = Repository.init(tmp_path / "repo")
    root, targets, snapshot, timestamp = repo._load()
    signer = CryptoSigner.generate_ed25519()
    pem = repo.path / "keys" / "online" / f"{signer.public_key.keyid}.pem"
    pem.write_bytes(signer.private_bytes)
    targets.signed.delegations = Delegations(
        keys={}, roles={"team": DelegatedRole("team", [], 1, False, paths=["team/*"])}
    )
    targets.signed.add_key(signer.public_key, "team")
    team = Metadata(Targets(expires=datetime.now(UTC).replace(microsecond=0) + 10 * DAY))
    team.signed.targets["team/tool"] = TargetFile(3, {"sha256": "ab" * 32}, "team/tool")
    team.sign(signer)
    team.to_file(str(repo.metadata_dir / "1.team.json"), JSONSerializer())
    snapshot.signed.meta["team.json"] = MetaFile(version=1)
    repo._commit(root, targets, snapshot, timestamp, new_targets=True)

    stick = tmp_path / "usb"
    out, err = _export(repo.path, stick, 30, capsys)
    _clock(monkeypatch, 29)
    device = tmp_path / "day-29"
    init_device(device, repo.trusted_root)
    url = (stick / USB_SUBDIR).resolve().as_uri() + "/"
    client = trust.Repo(device / "tuf", url, Transport(timeout_s=5.0))
    client.refresh()
    assert client.targetinfo("team/tool").length == 3
    assert re.search(r"team\s.*\d{4}-\d\d-\d\d", out) and re.search(r"signed anew.*: team", out), (
        out + err
    )
