"""The device agent's state machine against a real TUF repository on loopback HTTP or a USB
directory, with a fake container engine that really serves the readiness probe."""

from __future__ import annotations

import json
import os
import random
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from packager.agent.agent import CRASH_ENV, Agent
from packager.ota.bundle import plan_release
from tests.unit.agent.helpers import (
    Device,
    Server,
    flip_middle_byte,
    largest_blob,
    reports,
)


def _model_layer_size(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return int(manifest["image"]["layers"][-1]["size"])


def test_install_update_keep_previous_and_roll_back(device: Device) -> None:
    root, repo = device.root, device.repo
    with Server(repo.path / "repository").running() as server:
        cfg = device.config(server.url, report_url=server.url + "reports")
        repo.publish(device.bundle("1.0.0", seed=1))
        first = Agent(cfg).run_once()
        assert (first.outcome, first.sequence) == ("committed", 1)
        device.assert_on(1)

        v2 = device.bundle("2.0.0", seed=2)
        repo.publish(v2)
        second = Agent(cfg).run_once()
        assert (second.outcome, second.sequence) == ("committed", 2)
        device.assert_on(2)
        assert os.readlink(root / "previous") == "releases/1"
        assert (root / "releases" / "1" / "image.tar").is_file()
        # A model-only update moves about the new model layer, metadata included.
        assert second.bytes_fetched <= 1.1 * _model_layer_size(v2)
        v1_layers = json.loads((root / "releases/1/release.json").read_text())["bundle"]["image"]
        assert first.bytes_fetched >= sum(layer["size"] for layer in v1_layers["layers"])

        repo.publish(device.bundle("3.0.0", seed=3, ready="never"))
        third = device.run_once(
            server.url, report_url=server.url + "reports", ready_timeout_s=1.0
        )
        assert (third.outcome, third.sequence) == ("rolled-back", 3)
        device.assert_on(2)
        assert json.loads((root / "state.json").read_text())["failed"] == [3]
        assert os.readlink(root / "previous") == "releases/1"  # still the one kept for rollback
        # Never retried.
        again = Agent(cfg).run_once()
        assert again.outcome == "idle" and again.installed == 2
        outcomes = [(r["sequence"], r["outcome"]) for r in server.reports]
        assert outcomes == [(1, "committed"), (2, "committed"), (3, "rolled-back")]
        assert not (root / "releases" / "3").exists()


def test_download_cut_at_random_byte_resumes(device: Device) -> None:
    plan = device.repo.publish(device.bundle("1.0.0", seed=1))
    biggest = max(plan.objects, key=lambda o: o.size)
    cut = random.Random().randrange(1, biggest.size - 1)
    with Server(device.repo.path / "repository").running() as server:
        server.cut[biggest.sha256] = cut
        cfg = device.config(server.url)
        first = Agent(cfg).run_once()
        assert first.outcome == "pending", first
        part = device.root / "store" / "partial" / f"{biggest.sha256}.part"
        assert part.stat().st_size == cut
        second = Agent(cfg).run_once()
        assert second.outcome == "committed", second
        ranges = [r for p, r in server.requests if p.endswith(biggest.sha256)]
        assert ranges == [None, f"bytes={cut}-"]
    device.assert_on(1)


def test_flipped_blob_byte_is_discarded(installed: Device) -> None:
    blob = largest_blob(installed.repo, installed.repo.publish(installed.bundle("2.0.0", seed=2)))
    flip_middle_byte(blob)
    result = installed.run_once()
    assert result.outcome == "pending" and "signed hash" in result.reason
    assert not list((installed.root / "store" / "partial").iterdir())
    installed.assert_on(1, pending_ok=True)
    flip_middle_byte(blob)
    assert installed.run_once().outcome == "committed"
    installed.assert_on(2)


def _refused(device: Device, expect: str) -> None:
    result = device.run_once()
    assert result.outcome == "refused", result
    assert expect in result.reason
    device.assert_on(1)
    assert reports(device.root)[-1]["outcome"] == "refused"


def test_metadata_edited_without_resigning(installed: Device) -> None:
    installed.repo.publish(installed.bundle("2.0.0", seed=2), percent=0)
    meta = installed.repo.metadata_dir
    latest = max(meta.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    latest.write_text(latest.read_text().replace('"percent": 0,', '"percent": 100,'))
    _refused(installed, "targets")


def test_expired_timestamp(installed: Device) -> None:
    installed.repo.publish(installed.bundle("2.0.0", seed=2))
    installed.repo.refresh(timestamp_expiry=timedelta(seconds=-60))
    _refused(installed, "Expired")


def test_replayed_old_timestamp(installed: Device) -> None:
    old = (installed.repo.metadata_dir / "timestamp.json").read_bytes()
    installed.repo.refresh()
    assert installed.run_once().outcome == "idle"  # the device now trusts the newer timestamp
    (installed.repo.metadata_dir / "timestamp.json").write_bytes(old)
    _refused(installed, "version")


def test_validly_signed_lower_sequence(device: Device) -> None:
    repo = device.repo
    repo.publish(device.bundle("1.0.0", seed=1))
    repo.publish(device.bundle("2.0.0", seed=2))
    assert device.run_once().sequence == 2
    # An attacker with the targets key (or a confused publisher) re-signs the channel with an
    # older-numbered release: the signatures are valid, the sequence is not.
    lower = plan_release(device.bundle("9.0.0", seed=9), sequence=1, channel="stable", percent=100)
    with pytest.raises(Exception, match="must be above"):
        repo.apply(lower)
    repo.apply_unchecked(lower, replace_channel=True)
    result = device.run_once()
    assert result.outcome == "refused" and "lower" in result.reason
    device.assert_on(2)


def test_halted_release_is_not_installed(installed: Device) -> None:
    installed.repo.publish(installed.bundle("2.0.0", seed=2))
    installed.repo.set_release("stable", halted=True)
    result = installed.run_once()
    assert (result.outcome, result.sequence) == ("not-eligible", 2)
    installed.assert_on(1)
    installed.repo.set_release("stable", halted=False)
    assert installed.run_once().outcome == "committed"
    installed.assert_on(2)


def test_rollout_percentage_uses_stable_cohort(installed: Device) -> None:
    installed.repo.publish(installed.bundle("2.0.0", seed=2), percent=0)
    assert installed.run_once().outcome == "not-eligible"
    installed.repo.set_release("stable", percent=100)
    assert installed.run_once().outcome == "committed"


def test_usb_export_installs_and_collects_reports(device: Device) -> None:
    device.repo.publish(device.bundle("1.0.0", seed=1))
    stick = device.export_usb()
    proc = device.run_cli(device.cli_argv("--usb", str(stick), device_id="dev-usb"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["outcome"] == "committed"
    device.assert_on(1)
    picked = (stick / "edgepack-ota" / "reports" / "dev-usb.jsonl").read_text().splitlines()
    assert [json.loads(line)["outcome"] for line in picked] == ["committed"]


STEPS = [
    "stage-partial",
    "stage-renamed",
    "stage-loaded",
    "switch-previous",
    "switch-linked",
    "switch-started",
    "trial",
    "commit-reported",
    "commit-saved",
]


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_then_restart(installed: Device, step: str) -> None:
    installed.repo.publish(installed.bundle("2.0.0", seed=2))
    argv = installed.cli_argv("--repo", installed.usb_uri, extra=("--ready-timeout", "5"))
    killed = installed.run_cli(argv, env={CRASH_ENV: step})
    assert killed.returncode == -9, killed.stderr
    state = json.loads((installed.root / "state.json").read_text())
    assert state["installed"]["sequence"] == (2 if step == "commit-saved" else 1)
    resumed = installed.run_cli(argv)
    assert resumed.returncode == 0, resumed.stderr
    installed.assert_on(2)
    committed = [r["sequence"] for r in reports(installed.root) if r["outcome"] == "committed"]
    assert committed[-1] == 2
    assert not [p for p in (installed.root / "releases").iterdir() if p.name.startswith(".")]


def test_sigkill_during_rollback_then_restart(installed: Device) -> None:
    installed.repo.publish(installed.bundle("2.0.0", seed=2, ready="never"))
    argv = installed.cli_argv("--repo", installed.usb_uri, extra=("--ready-timeout", "0.5"))
    assert installed.run_cli(argv, env={CRASH_ENV: "rollback-linked"}).returncode == -9
    resumed = installed.run_cli(argv)
    assert json.loads(resumed.stdout.splitlines()[-1])["outcome"] == "rolled-back"
    installed.assert_on(1)


def test_power_cut_restarts_the_installed_runtime(installed: Device) -> None:
    from tests.process_guard import listeners, pids_with_env, stop

    state = installed.engine.parent
    # A power cut: every process dies (the runtime too), and the engine lost its containers.
    assert not stop(pids_with_env("FAKE_ENGINE_STATE", str(state)), kill=True)
    shutil.rmtree(state / "containers")
    (state / "containers").mkdir()
    assert installed.run_once().outcome == "idle"
    installed.assert_on(1)
    # Exactly one runtime serves: the installed one's container, and no other runtime is alive.
    records = [json.loads(p.read_text()) for p in (state / "containers").glob("*.json")]
    assert [r["pid"] for r in records] == pids_with_env("FAKE_ENGINE_STATE", str(state))
    assert [r["pid"] for r in records] == listeners(installed.port)
    assert len(records) == 1 and records[0]["ref"].endswith(":1.0.0")
