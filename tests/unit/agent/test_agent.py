"""The device agent's state machine against a real TUF repository on loopback HTTP or a USB
directory, with a fake container engine that really serves the readiness probe."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from packager.agent.agent import CRASH_ENV, Agent, init_device
from packager.ota.bundle import plan_release
from packager.ota.repo import Repository
from tests.unit.agent.helpers import (
    REPO_ROOT,
    Server,
    assert_complete,
    config,
    free_port,
    reports,
)
from tests.unit.ota.synth import make_bundle

MODEL_BYTES = 256 * 1024


def _bundle(tmp: Path, version: str, *, model_seed: int, ready: str = "yes") -> Path:
    rng = random.Random(model_seed)
    return make_bundle(
        tmp / f"bundle-{version}",
        version=version,
        model=rng.randbytes(MODEL_BYTES),
        base=random.Random(0).randbytes(128 * 1024),
        ready=ready,
    ).path


def _device(tmp: Path, repo: Repository) -> Path:
    root = tmp / "device"
    init_device(root, repo.trusted_root)
    return root


def _model_layer_size(bundle: Path) -> int:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return int(manifest["image"]["layers"][-1]["size"])


def test_install_update_keep_previous_and_roll_back(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    port = free_port()
    root = _device(tmp_path, repo)
    with Server(repo.path / "repository").running() as server:
        cfg = config(root, server.url, engine, port, report_url=server.url + "reports")
        repo.publish(_bundle(tmp_path, "1.0.0", model_seed=1))
        first = Agent(cfg).run_once()
        assert (first.outcome, first.sequence) == ("committed", 1)
        assert_complete(root, 1, port)

        v2 = _bundle(tmp_path, "2.0.0", model_seed=2)
        repo.publish(v2)
        second = Agent(cfg).run_once()
        assert (second.outcome, second.sequence) == ("committed", 2)
        assert_complete(root, 2, port)
        assert os.readlink(root / "previous") == "releases/1"
        assert (root / "releases" / "1" / "image.tar").is_file()
        # A model-only update moves about the new model layer, metadata included.
        assert second.bytes_fetched <= 1.1 * _model_layer_size(v2)
        v1_layers = json.loads((root / "releases/1/release.json").read_text())["bundle"]["image"]
        assert first.bytes_fetched >= sum(layer["size"] for layer in v1_layers["layers"])

        repo.publish(_bundle(tmp_path, "3.0.0", model_seed=3, ready="never"))
        quick = config(
            root, server.url, engine, port, report_url=server.url + "reports", ready_timeout_s=1.0
        )
        third = Agent(quick).run_once()
        assert (third.outcome, third.sequence) == ("rolled-back", 3)
        assert_complete(root, 2, port)
        assert json.loads((root / "state.json").read_text())["failed"] == [3]
        assert os.readlink(root / "previous") == "releases/1"  # still the one kept for rollback
        # Never retried.
        again = Agent(cfg).run_once()
        assert again.outcome == "idle" and again.installed == 2
        outcomes = [(r["sequence"], r["outcome"]) for r in server.reports]
        assert outcomes == [(1, "committed"), (2, "committed"), (3, "rolled-back")]
        assert not (root / "releases" / "3").exists()


def test_download_cut_at_random_byte_resumes(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    port = free_port()
    root = _device(tmp_path, repo)
    bundle = _bundle(tmp_path, "1.0.0", model_seed=1)
    plan = repo.publish(bundle)
    biggest = max(plan.objects, key=lambda o: o.size)
    cut = random.Random().randrange(1, biggest.size - 1)
    with Server(repo.path / "repository").running() as server:
        server.cut[biggest.sha256] = cut
        cfg = config(root, server.url, engine, port)
        first = Agent(cfg).run_once()
        assert first.outcome == "pending", first
        part = root / "store" / "partial" / f"{biggest.sha256}.part"
        assert part.stat().st_size == cut
        second = Agent(cfg).run_once()
        assert second.outcome == "committed", second
        ranges = [r for p, r in server.requests if p.endswith(biggest.sha256)]
        assert ranges == [None, f"bytes={cut}-"]
    assert_complete(root, 1, port)


def _installed_v1(tmp_path: Path, repo: Repository, engine: Path, port: int) -> Path:
    root = _device(tmp_path, repo)
    repo.publish(_bundle(tmp_path, "1.0.0", model_seed=1))
    usb = repo.path / "repository"
    assert Agent(config(root, usb.as_uri(), engine, port)).run_once().outcome == "committed"
    return root


def test_flipped_blob_byte_is_discarded(tmp_path: Path, repo: Repository, engine: Path) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    plan = repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2))
    blob = repo.targets_dir / max(plan.objects, key=lambda o: o.size).target
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    result = Agent(cfg).run_once()
    assert result.outcome == "pending" and "signed hash" in result.reason
    assert not list((root / "store" / "partial").iterdir())
    assert_complete(root, 1, port, pending_ok=True)
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    assert Agent(cfg).run_once().outcome == "committed"
    assert_complete(root, 2, port)


def _refused(root: Path, repo: Repository, engine: Path, port: int, expect: str) -> None:
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    result = Agent(cfg).run_once()
    assert result.outcome == "refused", result
    assert expect in result.reason
    assert_complete(root, 1, port)
    assert reports(root)[-1]["outcome"] == "refused"


def test_metadata_edited_without_resigning(tmp_path: Path, repo: Repository, engine: Path) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2), percent=0)
    meta = repo.metadata_dir
    latest = max(meta.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    latest.write_text(latest.read_text().replace('"percent": 0,', '"percent": 100,'))
    _refused(root, repo, engine, port, "targets")


def test_expired_timestamp(tmp_path: Path, repo: Repository, engine: Path) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2))
    repo.refresh(timestamp_expiry=timedelta(seconds=-60))
    _refused(root, repo, engine, port, "Expired")


def test_replayed_old_timestamp(tmp_path: Path, repo: Repository, engine: Path) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    old = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.refresh()
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    assert Agent(cfg).run_once().outcome == "idle"  # the device now trusts the newer timestamp
    (repo.metadata_dir / "timestamp.json").write_bytes(old)
    _refused(root, repo, engine, port, "version")


def test_validly_signed_lower_sequence(tmp_path: Path, repo: Repository, engine: Path) -> None:
    port = free_port()
    root = _device(tmp_path, repo)
    repo.publish(_bundle(tmp_path, "1.0.0", model_seed=1))
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2))
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    assert Agent(cfg).run_once().sequence == 2
    # An attacker with the targets key (or a confused publisher) re-signs the channel with an
    # older-numbered release: the signatures are valid, the sequence is not.
    lower = plan_release(
        _bundle(tmp_path, "9.0.0", model_seed=9), sequence=1, channel="stable", percent=100
    )
    with pytest.raises(Exception, match="must be above"):
        repo.apply(lower)
    repo.apply_unchecked(lower, replace_channel=True)
    result = Agent(cfg).run_once()
    assert result.outcome == "refused" and "lower" in result.reason
    assert_complete(root, 2, port)


def test_halted_release_is_not_installed(tmp_path: Path, repo: Repository, engine: Path) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2))
    repo.set_release("stable", halted=True)
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    result = Agent(cfg).run_once()
    assert (result.outcome, result.sequence) == ("not-eligible", 2)
    assert_complete(root, 1, port)
    repo.set_release("stable", halted=False)
    assert Agent(cfg).run_once().outcome == "committed"
    assert_complete(root, 2, port)


def test_rollout_percentage_uses_stable_cohort(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2), percent=0)
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    assert Agent(cfg).run_once().outcome == "not-eligible"
    repo.set_release("stable", percent=100)
    assert Agent(cfg).run_once().outcome == "committed"


def test_usb_export_installs_and_collects_reports(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    port = free_port()
    root = _device(tmp_path, repo)
    repo.publish(_bundle(tmp_path, "1.0.0", model_seed=1))
    stick = tmp_path / "usb"
    stick.mkdir()
    repo.export(stick, timestamp_expiry=timedelta(days=30))
    proc = subprocess.run(
        [sys.executable, "-m", "packager.agent", "run", "--root", str(root), "--usb", str(stick),
         "--device-id", "dev-usb", "--platform", "linux/amd64", "--engine", str(engine),
         "--port", str(port), "--trial", "0.2", "--poll", "0.1", "--once"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["outcome"] == "committed"
    assert_complete(root, 1, port)
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
def test_sigkill_at_each_step_then_restart(
    tmp_path: Path, repo: Repository, engine: Path, step: str
) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2))
    argv = [
        sys.executable, "-m", "packager.agent", "run", "--root", str(root),
        "--repo", (repo.path / "repository").as_uri(), "--device-id", "device-0001",
        "--platform", "linux/amd64", "--engine", str(engine), "--port", str(port),
        "--trial", "0.2", "--poll", "0.1", "--ready-timeout", "5", "--once",
    ]  # fmt: skip
    killed = subprocess.run(
        argv, cwd=REPO_ROOT, env={**os.environ, CRASH_ENV: step}, capture_output=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr
    state = json.loads((root / "state.json").read_text())
    assert state["installed"]["sequence"] == (2 if step == "commit-saved" else 1)
    resumed = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert_complete(root, 2, port)
    assert [r["sequence"] for r in reports(root) if r["outcome"] == "committed"][-1] == 2
    assert not [p for p in (root / "releases").iterdir() if p.name.startswith(".")]


def test_sigkill_during_rollback_then_restart(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    repo.publish(_bundle(tmp_path, "2.0.0", model_seed=2, ready="never"))
    argv = [
        sys.executable, "-m", "packager.agent", "run", "--root", str(root),
        "--repo", (repo.path / "repository").as_uri(), "--device-id", "device-0001",
        "--platform", "linux/amd64", "--engine", str(engine), "--port", str(port),
        "--trial", "0.2", "--poll", "0.1", "--ready-timeout", "0.5", "--once",
    ]  # fmt: skip
    env = {**os.environ, CRASH_ENV: "rollback-linked"}
    assert subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True).returncode == -9
    resumed = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert json.loads(resumed.stdout.splitlines()[-1])["outcome"] == "rolled-back"
    assert_complete(root, 1, port)


def test_power_cut_restarts_the_installed_runtime(
    tmp_path: Path, repo: Repository, engine: Path
) -> None:
    from tests.process_guard import listeners, pids_with_env, stop

    port = free_port()
    root = _installed_v1(tmp_path, repo, engine, port)
    state = engine.parent
    # A power cut: every process dies (the runtime too), and the engine lost its containers.
    assert not stop(pids_with_env("FAKE_ENGINE_STATE", str(state)), kill=True)
    shutil.rmtree(state / "containers")
    (state / "containers").mkdir()
    cfg = config(root, (repo.path / "repository").as_uri(), engine, port)
    assert Agent(cfg).run_once().outcome == "idle"
    assert_complete(root, 1, port)
    # Exactly one runtime serves: the installed one's container, and no other runtime is alive.
    records = [json.loads(p.read_text()) for p in (state / "containers").glob("*.json")]
    assert [r["pid"] for r in records] == pids_with_env("FAKE_ENGINE_STATE", str(state))
    assert [r["pid"] for r in records] == listeners(port)
    assert len(records) == 1 and records[0]["ref"].endswith(":1.0.0")
