"""The agent against hostile repositories, mirrors and USB sticks (issue 9), through the real path:
a real TUF repository (packager.ota.repo), served on loopback HTTP or as a USB directory, and the
fake engine that really serves the readiness probe (the one stand-in: no container engine runs
inside unit tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from packager.agent import confinement
from packager.agent.engine import ready
from packager.agent.protocol import FILE_PREFIX
from packager.errors import VerifyError
from packager.ota.bundle import ObjectSource, plan_release
from tests.ports import raw_listener
from tests.unit.agent.helpers import Device, Server, flip_middle_byte, largest_blob
from tests.unit.ota.synth import make_bundle

CONFINEMENT = confinement.from_target(300, 50)


@pytest.fixture
def bundle_confinement() -> bytes | None:
    """Every bundle of these tests carries a confinement.json (the agent must apply it)."""
    return confinement.to_bytes(CONFINEMENT)


def _runs(engine: Path) -> list[list[str]]:
    lines = (engine.parent / "calls.log").read_text().splitlines()
    return [line.split(" ") for line in lines if line.startswith("run ")]


def _kill_runtime(engine: Path) -> None:
    for path in (engine.parent / "containers").glob("*.json"):
        os.kill(json.loads(path.read_text())["pid"], 9)
    deadline = time.monotonic() + 10
    while any(
        Path(f"/proc/{json.loads(p.read_text())['pid']}").exists()
        and Path(f"/proc/{json.loads(p.read_text())['pid']}/stat").read_text().split()[2] != "Z"
        for p in (engine.parent / "containers").glob("*.json")
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- a validly signed release that names paths outside its place -------------------------------


def _hostile(plan: Any, path: str, mode: int) -> Any:
    doc = json.loads(plan.document)
    entry = doc["files"][0]
    entry["path"], entry["mode"] = path, mode
    return dataclasses.replace(plan, document=(json.dumps(doc, sort_keys=True) + "\n").encode())


@pytest.mark.parametrize("kind", ["traversal", "absolute", "setuid", "reserved"])
def test_signed_release_with_bad_path_or_mode_is_refused(
    tmp_path: Path, installed: Device, kind: str
) -> None:
    root, repo = installed.root, installed.repo
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    path, mode = {
        "traversal": ("../../../victim/pwned", 0o755),
        "absolute": (str(victim_dir / "pwned"), 0o755),
        "setuid": ("bin/su", 0o4755),
        "reserved": ("release.json", 0o644),
    }[kind]
    v2 = installed.bundle("2.0.0", seed=2)
    plan = plan_release(v2, sequence=2, channel="stable", percent=100)
    # Signed with the repository's real targets key: TUF accepts it; the path policy must not.
    repo.apply(_hostile(plan, path, mode))
    result = installed.run_once()
    assert (result.outcome, result.sequence) == ("refused", 2), result
    assert repr(path) in result.reason
    assert list(victim_dir.iterdir()) == []
    setuid = [
        p for p in root.rglob("*") if p.is_file() and p.stat().st_mode & (stat.S_ISUID | 0o2000)
    ]
    assert setuid == []
    installed.assert_on(1)
    reports = [json.loads(line) for line in (root / "reports.jsonl").read_text().splitlines()]
    assert (reports[-1]["sequence"], reports[-1]["outcome"]) == (2, "refused")
    # Skipped (not re-downloaded, not re-reported) until a newer sequence appears.
    again = installed.run_once()
    assert (again.outcome, again.sequence) == ("idle", 2) and "skipped" in again.reason
    assert len((root / "reports.jsonl").read_text().splitlines()) == len(reports)
    repo.publish(installed.bundle("3.0.0", seed=3))
    assert installed.run_once().outcome == "committed"
    installed.assert_on(3)


def test_signed_hash_that_is_a_path_never_names_a_file(tmp_path: Path, installed: Device) -> None:
    repo = installed.repo
    plan = repo.publish(installed.bundle("2.0.0", seed=2))
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    (victim_dir / "keep").write_text("keep")
    # Re-sign targets with the real key so that one object's 'sha256' is a relative path.
    root_md, targets, snapshot, timestamp = repo._load()
    biggest = max(plan.objects, key=lambda o: o.size)
    targets.signed.targets[biggest.target] = TargetFile(
        biggest.size, {"sha256": "../../../victim/keep"}, biggest.target
    )
    repo._commit(root_md, targets, snapshot, timestamp, new_targets=True)
    result = installed.run_once()
    assert (result.outcome, result.sequence) == ("refused", 2), result
    assert "victim/keep" in result.reason
    assert sorted(p.name for p in victim_dir.iterdir()) == ["keep"]
    assert (victim_dir / "keep").read_text() == "keep"
    installed.assert_on(1)


# --- the report file -----------------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["file", "directory"])
def test_symlinked_report_file_on_usb_is_not_followed(
    tmp_path: Path, device: Device, planted: str
) -> None:
    device.repo.publish(device.bundle("1.0.0", seed=1))
    stick = device.export_usb()
    victim = tmp_path / "etc" / "dev-usb.jsonl"
    victim.parent.mkdir()
    victim.write_text("root:x:0:0\n")
    reports = stick / "edgepack-ota" / "reports"
    reports.mkdir(exist_ok=True)
    if planted == "file":
        (reports / "dev-usb.jsonl").symlink_to(victim)
    else:
        reports.rmdir()
        reports.symlink_to(victim.parent)
    proc = device.run_cli(device.cli_argv("--usb", str(stick), device_id="dev-usb"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["outcome"] == "committed"
    assert victim.read_text() == "root:x:0:0\n"
    assert "report not written" in proc.stderr
    assert len(list((device.root / "outbox").glob("*.json"))) == 1  # kept for a later pickup
    device.assert_on(1)


# --- confinement ---------------------------------------------------------------------------------


def test_agent_started_containers_carry_the_bundle_confinement(installed: Device) -> None:
    staged = json.loads((installed.root / "releases" / "1" / confinement.FILE).read_text())
    assert staged["run_args"] == list(CONFINEMENT)
    _kill_runtime(installed.engine)  # the next cycle restarts it: every start path is confined
    assert installed.run_once().outcome == "idle"
    runs = _runs(installed.engine)
    assert len(runs) == 2
    for argv in runs:
        flags = argv[:-1]  # everything before the image reference
        for flag in (*CONFINEMENT, "--restart=unless-stopped"):
            assert flag in flags, (flag, argv)
        assert "--memory=300m" in flags and "--pids-limit=256" in flags
        assert "--cap-drop=ALL" in flags and "--read-only" in flags
        assert "--security-opt=no-new-privileges" in flags
    installed.assert_on(1)


def test_signed_confinement_cannot_loosen_the_floor(tmp_path: Path, installed: Device) -> None:
    repo = installed.repo
    loose = tmp_path / "loose.json"
    loose.write_text(
        json.dumps({"schema": confinement.SCHEMA, "run_args": ["--privileged"], "restart": "no"})
    )
    hostile = make_bundle(tmp_path / "hostile", version="2.0.0", confinement=loose.read_bytes())
    with pytest.raises(VerifyError, match="--privileged"):  # the publisher refuses it...
        repo.publish(hostile.path)
    # ... and a release signed anyway (the targets key is online) is never run unconfined.
    bundle = installed.bundle("2.0.0", seed=2)
    plan = plan_release(bundle, sequence=2, channel="stable", percent=100)
    digest = hashlib.sha256(loose.read_bytes()).hexdigest()
    doc = json.loads(plan.document)
    for entry in doc["files"]:
        if entry["path"] == confinement.FILE:
            entry["target"] = FILE_PREFIX + digest
    swapped = ObjectSource(FILE_PREFIX + digest, digest, loose.stat().st_size, loose)
    repo.apply(
        dataclasses.replace(
            plan,
            objects=(*plan.objects, swapped),
            document=(json.dumps(doc, sort_keys=True) + "\n").encode(),
        )
    )
    result = installed.run_once()
    assert result.outcome == "rolled-back" and "--privileged" in result.reason, result
    assert not any("--privileged" in argv for argv in _runs(installed.engine))
    installed.assert_on(1)


# --- the running version stays alive -------------------------------------------------------------


def test_dead_runtime_is_restarted_while_an_update_stays_pending(installed: Device) -> None:
    plan = installed.repo.publish(installed.bundle("2.0.0", seed=2))
    # The mirror corrupts one blob: v2 stays pending (3 failed verifications allowed).
    flip_middle_byte(largest_blob(installed.repo, plan))
    first = installed.run_once()
    assert (first.outcome, first.sequence) == ("pending", 2), first
    _kill_runtime(installed.engine)
    assert not ready(installed.port)
    result = installed.run_once()
    assert (result.outcome, result.sequence) == ("pending", 2), result
    assert ready(installed.port), "the installed runtime was left dead while v2 is pending"
    installed.assert_on(1, pending_ok=True)


def test_release_failing_verification_n_times_is_skipped_until_newer(installed: Device) -> None:
    blob = largest_blob(installed.repo, installed.repo.publish(installed.bundle("2.0.0", seed=2)))
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    # The default: 3 failed verifications.
    outcomes = [installed.run_once().outcome for _ in range(3)]
    assert outcomes == ["pending", "pending", "failed"]
    blob.write_bytes(good)  # even repaired, the same sequence is not tried again
    after = installed.run_once()
    assert (after.outcome, after.sequence) == ("idle", 2) and "skipped" in after.reason
    lines = (installed.root / "reports.jsonl").read_text().splitlines()
    assert [(r["sequence"], r["outcome"]) for r in map(json.loads, lines)][-1] == (2, "failed")
    installed.assert_on(1)
    installed.repo.publish(installed.bundle("3.0.0", seed=3))
    assert installed.run_once().outcome == "committed"
    installed.assert_on(3)


# --- a dripping mirror ---------------------------------------------------------------------------


@contextmanager
def _dripping(
    upstream: str, drip_suffix: str, interval_s: float
) -> Iterator[tuple[str, dict[str, int]]]:
    """A loopback proxy in front of ``upstream`` that passes every response through, except
    that a response whose path ends in ``drip_suffix`` is sent one byte per ``interval_s``."""
    host, port = upstream.removeprefix("http://").rstrip("/").split(":")
    sent = {"drip_bytes": 0}

    def serve(client: socket.socket, stop: threading.Event) -> None:
        with client:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(65536)
                if not chunk:
                    return
                request += chunk
            path = request.split(b" ", 2)[1].decode()
            with socket.create_connection((host, int(port))) as up:
                up.sendall(request.replace(b"keep-alive", b"close"))
                response = b""
                while chunk := up.recv(65536):
                    response += chunk
            try:
                if not path.endswith(drip_suffix):
                    client.sendall(response)
                    return
                for byte in response:
                    if stop.is_set():
                        return
                    client.sendall(bytes([byte]))
                    sent["drip_bytes"] += 1
                    time.sleep(interval_s)
            except OSError:
                return

    with raw_listener(serve) as (proxy_port, _):
        yield f"http://127.0.0.1:{proxy_port}/", sent


@pytest.mark.timeout(120)  # bounded either way: a drip of the whole blob would take 40 min
@pytest.mark.parametrize("drip", ["body", "headers"])
def test_dripping_mirror_is_cut_and_resumed(device: Device, drip: str) -> None:
    plan = device.repo.publish(device.bundle("1.0.0", seed=1))
    biggest = max(plan.objects, key=lambda o: o.size)
    with Server(device.repo.path / "repository").running() as server:
        with _dripping(server.url, biggest.sha256, 0.01) as (url, sent):
            # A window of 1 s needing 4 KiB (the drip moves about 100 B/s); for headers, a
            # deadline of 1 s on connect + header block (the drip needs several seconds).
            overrides: dict[str, Any] = (
                {"window_s": 1.0, "min_window_bytes": 4096, "http_timeout_s": 5.0}
                if drip == "body"
                else {"http_timeout_s": 1.0, "window_s": 60.0}
            )
            result = device.run_once(url, **overrides)
            assert (result.outcome, result.sequence) == ("pending", 1), result
            assert biggest.target in result.reason
            # Cut after a bounded number of bytes: not the blob (which would take hours).
            assert sent["drip_bytes"] < biggest.size // 10, sent
        # The same device resumes from a mirror that behaves.
        resumed = device.run_once(server.url)
        assert resumed.outcome == "committed", resumed
    device.assert_on(1)
