"""``edgepack ota``: publish bundles to a signed static update repository and steer rollouts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from packager.console import Table, console
from packager.errors import UsageError
from packager.ota.bundle import check_channel
from packager.ota.repo import ROOT_KEYS, ROOT_THRESHOLD, Renewal, Repository, RoleExpiry
from packager.ota.reports import read_reports, should_halt, summarize

_repo_option = click.option(
    "--repo", "repo_path", type=click.Path(path_type=Path), required=True, help="repository dir"
)
# Checked where it is parsed, for every command (status only filters by it, but a channel no
# release can have is a typo worth one line, not an empty table).
_channel_option = click.option(
    "--channel",
    default="stable",
    show_default=True,
    callback=lambda _ctx, _param, value: check_channel(value),
    help="release channel: lower-case letters, digits, '.', '_', '-' (at most 63)",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="print a JSON document")
# A stick or timestamp valid longer than ten years is a typo, and beyond it datetime overflows.
_MAX_DAYS = 3650


def _days(option: str, days: float) -> timedelta:
    if not 0 < days <= _MAX_DAYS:
        raise UsageError(f"{option} {days}: give a number of days above 0 and at most {_MAX_DAYS}")
    return timedelta(days=days)


def _expiry_table(roles: tuple[RoleExpiry, ...]) -> Table:
    table = Table("role", "version", "expires (UTC)")
    for role in roles:
        table.add_row(role.role, str(role.version), f"{role.expires:%Y-%m-%d %H:%M:%S}")
    return table


def _report_renewal(renewal: Renewal) -> None:
    """Human output of a refresh/export: every role's expiry, what was signed anew, warnings."""
    console.table(_expiry_table(renewal.roles))
    if renewal.resigned:
        console.result(f"signed anew to last the period: {', '.join(renewal.resigned)}")
    for warning in renewal.warnings:
        console.warn(warning)
    console.result(f"valid until {renewal.valid_until:%Y-%m-%d %H:%M:%S}Z (first role to expire)")


@click.group("ota")
def ota_group() -> None:
    """Over-the-air updates for Linux devices: a TUF-signed static repository."""


@ota_group.command("init")
@click.argument("repo_path", type=click.Path(path_type=Path))
@click.option("--root-keys", default=ROOT_KEYS, show_default=True)
@click.option("--root-threshold", default=ROOT_THRESHOLD, show_default=True)
def init_cmd(repo_path: Path, root_keys: int, root_threshold: int) -> None:
    """Create REPO with one key per role (root keys belong offline afterwards)."""
    repo = Repository.init(repo_path, root_keys=root_keys, root_threshold=root_threshold)
    console.result(f"repository: {repo.path / 'repository'} (serve this directory)")
    console.result(f"device trust anchor: {repo.trusted_root}")
    console.warn(f"move {repo.path / 'keys' / 'root'} offline; it is only needed to rotate keys")


@ota_group.command("publish")
@click.argument("bundle", type=click.Path(path_type=Path))
@_repo_option
@_channel_option
@click.option("--percent", default=100, show_default=True, help="rollout percentage (0-100)")
@_json_option
def publish_cmd(bundle: Path, repo_path: Path, channel: str, percent: int, as_json: bool) -> None:
    """Verify BUNDLE and publish it as the channel's next release."""
    console.configure(quiet=as_json)
    plan = Repository(repo_path).publish(bundle, channel=channel, percent=percent)
    document = {
        "sequence": plan.sequence,
        "channel": plan.channel,
        "name": plan.name,
        "version": plan.version,
        "platform": plan.platform,
        "percent": plan.percent,
        "objects": len(plan.objects),
        "bytes": sum(o.size for o in plan.objects),
    }
    if as_json:
        console.json(document)
    else:
        console.result(
            f"published {plan.name} {plan.version} as sequence {plan.sequence} on {channel}"
            f" ({percent}%)"
        )


@ota_group.command("rollout")
@_repo_option
@_channel_option
@click.option("--percent", type=int, required=True)
@click.option("--sequence", type=int, default=None, help="default: the channel's latest")
def rollout_cmd(repo_path: Path, channel: str, percent: int, sequence: int | None) -> None:
    """Change the rollout percentage (devices already in keep their place: cohorts are stable)."""
    release = Repository(repo_path).set_release(channel, sequence, percent=percent)
    console.result(f"sequence {release.sequence} on {channel}: {release.percent}%")


@ota_group.command("halt")
@_repo_option
@_channel_option
@click.option("--sequence", type=int, default=None, help="default: the channel's latest")
@click.option("--resume", is_flag=True, help="clear the halted flag instead")
def halt_cmd(repo_path: Path, channel: str, sequence: int | None, resume: bool) -> None:
    """Stop (or resume) a rollout: devices that have not started it will not."""
    release = Repository(repo_path).set_release(channel, sequence, halted=not resume)
    console.result(f"sequence {release.sequence} on {channel}: halted={release.halted}")


@ota_group.command("status")
@_repo_option
@_channel_option
@click.option(
    "--reports",
    "report_paths",
    multiple=True,
    type=click.Path(path_type=Path, exists=True),
    help="extra report files/dirs (USB pickup); REPO/reports is always read",
)
@click.option("--halt-if", type=float, default=None, help="halt when failure rate exceeds this")
@_json_option
def status_cmd(
    repo_path: Path,
    channel: str,
    report_paths: tuple[Path, ...],
    halt_if: float | None,
    as_json: bool,
) -> None:
    """Releases, what each device last reported, and the latest release's failure rate."""
    console.configure(quiet=as_json)
    if halt_if is not None and not 0 <= halt_if <= 1:
        raise UsageError(f"--halt-if {halt_if}: give a failure rate between 0 and 1")
    repo = Repository(repo_path)
    releases = [r for r in repo.releases() if r.channel == channel]
    summary = summarize(read_reports([repo.path / "reports", *report_paths]),
                        releases[-1].sequence if releases else None)
    devices, health = summary.devices, summary.health
    halted = False
    if health and halt_if is not None and should_halt(health, halt_if) and not releases[-1].halted:
        repo.set_release(channel, health.sequence, halted=True)
        halted = True
    roles = repo.expiries()
    if as_json:
        console.json(
            {
                "roles": [r.to_json() for r in roles],
                "releases": [r.to_json() for r in releases],
                "devices": devices,
                "latest": None
                if health is None
                else {
                    "sequence": health.sequence,
                    "devices": health.devices,
                    "committed": health.committed,
                    "failed": health.failed,
                    "failure_rate": health.failure_rate,
                },
                "halted_now": halted,
            }
        )
        return
    table = Table("device", "sequence", "outcome", "reason", "time")
    for device, report in devices.items():
        table.add_row(
            device,
            str(report.get("sequence")),
            str(report.get("outcome")),
            str(report.get("reason", ""))[:60],
            str(report.get("time", "")),
        )
    console.table(table)
    console.table(_expiry_table(roles))
    if health:
        console.result(
            f"sequence {health.sequence}: {health.committed} committed, {health.failed} failed"
            f" of {health.devices} ({health.failure_rate:.0%})" + (" -> HALTED" if halted else "")
        )


@ota_group.command("refresh")
@_repo_option
@click.option("--timestamp-days", type=float, default=None, help="default: 1 day")
@_json_option
def refresh_cmd(repo_path: Path, timestamp_days: float | None, as_json: bool) -> None:
    """Re-sign snapshot and timestamp, and any role that would expire before them (run daily,
    e.g. from cron, or devices refuse updates)."""
    console.configure(quiet=as_json)
    expiry = _days("--timestamp-days", timestamp_days) if timestamp_days is not None else None
    renewal = Repository(repo_path).refresh(timestamp_expiry=expiry)
    if as_json:
        console.json(renewal.to_json())
        return
    console.result(f"timestamp version {renewal.timestamp_version}")
    _report_renewal(renewal)


@ota_group.command("export")
@_repo_option
@click.option("--usb", "usb_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option(
    "--timestamp-days",
    type=float,
    default=30,
    show_default=True,
    help="days the stick stays valid: every role on it is signed to last at least this long",
)
@_json_option
def export_cmd(repo_path: Path, usb_dir: Path, timestamp_days: float, as_json: bool) -> None:
    """Write the repository to a USB directory for offline devices (agent --usb DIR)."""
    console.configure(quiet=as_json)
    expiry = _days("--timestamp-days", timestamp_days)
    repo = Repository(repo_path)
    usb_dir.mkdir(parents=True, exist_ok=True)
    dest, renewal = repo.export(usb_dir, timestamp_expiry=expiry)
    if as_json:
        console.json({"path": str(dest), **renewal.to_json()})
        return
    console.result(f"exported to {dest}; devices leave reports in {dest / 'reports'}")
    _report_renewal(renewal)
