"""The update state machine: check -> eligible -> download -> verify -> stage -> prepare ->
switch -> trial -> commit | rollback, persisted in ``ROOT/state.json`` after every step so that a
crash or power cut at any point resumes where it stopped.

Device root layout::

    state.json            the state machine (atomic rename + fsync)
    tuf/                  trusted TUF metadata (root.json installed by ``init``)
    store/objects/<hex>   verified blobs and files by sha256 (kept for layer-level deltas)
    store/partial/<hex>   resumable downloads
    store/releases/N.json verified release documents
    releases/N/           staged releases (image.tar + bundle files + release.json)

prepare: a bundle whose ``confinement.json`` declares a prepare step (packager.agent.confinement:
allow-listed, e.g. a Jetson bundle's TensorRT engine build) has it run in the new image, while the
installed version keeps serving, before the new version's container starts. It is idempotent
(the engine build skips a plan whose key exists), so a crash re-runs it; it is tried at most
MAX_PREPARE_ATTEMPTS times per release. A failed or timed-out step does not roll back: the release
starts and serves on its explicit fallback, and its report says "prepare: failed (...)".
    current, previous     symlinks to releases/N, switched with rename(2)
    outbox/               outcome reports not yet delivered
    reports.jsonl         delivered reports when no URL is configured (USB pickup)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tuf.api.exceptions import DownloadError, LengthOrHashMismatchError

from .confinement import ConfinementError, detached_args, prepare_argv
from .confinement import read as read_confinement
from .device import DeviceFacts, probe_facts, unmet
from .engine import Engine, EngineError, ready
from .fetch import Transport, download_resumable
from .paths import PathError, create_file, open_append
from .protocol import RELEASE_SCHEMA, REPORT_SCHEMA, ReleaseInfo, check_release, in_cohort
from .signature import SignatureError, check_release_bundle, public_key_from_pem
from .store import (
    fsync_dir,
    read_json,
    sha256_file,
    symlink_atomic,
    write_atomic,
    write_json,
    write_tar,
)
from .trust import Repo, TrustError

log = logging.getLogger("edgepack.agent")
STATE_SCHEMA = "edgepack.agent-state/v1"
# Fault injection for the crash tests: the agent SIGKILLs itself at the named checkpoint, which is
# what a power cut at that instant looks like to the next start. Unset in production.
CRASH_ENV = "EDGEPACK_AGENT_CRASH_AT"
# Phases in which the installed version's container is the one that should be running (the
# switch, trial, commit and rollback phases replace or restore it themselves).
_KEEP_INSTALLED_RUNNING = (None, "download", "verify", "stage", "prepare")
# Starts of one release's prepare step (a crash or power cut mid-step re-runs it): after this
# many the step is given up as failed, so a step that kills the device cannot loop forever.
MAX_PREPARE_ATTEMPTS = 3
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AgentConfig:
    """One device's agent settings (``--config`` JSON overridden by the command line).

    Durations are in seconds (``*_s``); ``port`` is the host port the container's 8080 is
    published on, and where its readiness is probed.
    """

    root: Path
    repo_url: str  # http(s)://host/repo/ or file:///media/usb/edgepack-ota/
    device_id: str
    platform: str  # "linux/amd64"
    device_class: str = "linux-container"
    channel: str = "stable"
    engine: str = "docker"
    engine_args: tuple[str, ...] = ()
    port: int = 8080
    report_url: str | None = None
    report_file: Path | None = None
    # The trusted directory report_file lies under: no component below it may be a symlink
    # (a USB stick's own directories are not trusted). Default: report_file's parent.
    report_root: Path | None = None
    ready_timeout_s: float = 120.0
    trial_s: float = 30.0
    poll_s: float = 1.0
    http_timeout_s: float = 30.0
    # A download must move at least min_window_bytes in every window_s seconds, or it is cut
    # (and resumes next cycle): a mirror that drips bytes cannot hold the agent. 32 KiB per
    # 30 s (about 1 KiB/s) is far below any working link, GPRS included.
    min_window_bytes: int = 32 * 1024
    window_s: float = 30.0
    # A release whose bytes fail their signed hashes this many times is reported as failed and
    # skipped until a newer sequence appears (a mirror corrupting one blob cannot pin it).
    max_verify_failures: int = 3
    # The bundle signer's Ed25519 public key (PEM): when set, a release is staged only if its
    # manifest.dsse.json verifies with it and the signed manifest.json matches what was staged
    # (signature.check_release_bundle), in addition to TUF. install.sh pins the key it checked.
    bundle_key: Path | None = None
    # The program that prints this device's facts for a release's compat.requires (packager.
    # agent.device): the bundle's own preflight, e.g. ("/usr/bin/python3", "/opt/edgepack/NAME/
    # jetson_preflight.py", "--facts"), written by install-container.sh for a Jetson bundle;
    # tests add "--root", FIXTURE. () (none): a release with requirements is skipped, unknown.
    facts_probe: tuple[str, ...] = ()
    # The longest the probe may run (seconds) before it is killed and the facts are unknown.
    facts_timeout_s: float = 30.0
    # The longest this device lets a release's prepare step run (seconds); the bundle's own
    # timeout_s (at most confinement.MAX_PREPARE_TIMEOUT_S) applies when it is shorter.
    prepare_max_s: float = 7200.0


@dataclass
class CycleResult:
    """What one cycle did (also the last line the CLI prints as JSON)."""

    outcome: str  # idle | committed | rolled-back | refused | failed | pending | not-eligible
    sequence: int | None = None
    reason: str = ""
    bytes_fetched: int = 0
    installed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "sequence": self.sequence,
            "reason": self.reason,
            "bytes_fetched": self.bytes_fetched,
            "installed": self.installed,
            **self.extra,
        }


class StepFailed(Exception):
    """A step could not finish this cycle; the pending update stays for the next one."""


def checkpoint(name: str) -> None:
    """SIGKILL this process when :data:`CRASH_ENV` names ``name`` (crash tests); else nothing."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


def init_device(root: Path, trusted_root: Path) -> None:
    """Install the repository's root.json as the device's anchor of trust (once)."""
    (root / "tuf").mkdir(parents=True, exist_ok=True)
    target = root / "tuf" / "root.json"
    if not target.exists():
        write_atomic(target, trusted_root.read_bytes())
    if not (root / "state.json").exists():
        write_json(root / "state.json", _empty_state())


def _empty_state() -> dict[str, Any]:
    return {
        "schema": STATE_SCHEMA,
        "installed": None,
        "previous": None,
        "pending": None,
        "highest_seen": 0,
        "failed": [],
        "skipped": {},
        "last_refusal": "",
    }


class Agent:
    """The update state machine of one device, over the persisted ``ROOT/state.json``.

    Construction creates the root's directories and loads the state (a missing file or another
    schema starts empty); :meth:`run_once` runs one cycle and returns its :class:`CycleResult`.
    """

    def __init__(self, config: AgentConfig, engine: Engine | None = None) -> None:
        self.cfg = config
        self.root = config.root
        self.engine = engine or Engine(config.engine, config.engine_args)
        self.transport = Transport(
            timeout_s=config.http_timeout_s,
            min_window_bytes=config.min_window_bytes,
            window_s=config.window_s,
        )
        self._repo: Repo | None = None
        # The device's facts, or why they are unknown: probed once per agent, when first needed.
        self._facts: DeviceFacts | str | None = None
        self._accounted = 0
        self.timings: dict[str, float] = {}  # seconds per phase in this cycle (benchmarks)
        for sub in ("store/objects", "store/partial", "store/releases", "releases", "outbox"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        state_path = self.root / "state.json"
        self.state: dict[str, Any] = read_json(state_path) if state_path.exists() else {}
        if self.state.get("schema") != STATE_SCHEMA:
            self.state = _empty_state()

    # --- persistence -------------------------------------------------------------------------

    def save(self) -> None:
        pending = self.state.get("pending")
        if pending is not None:
            pending["bytes_fetched"] = pending.get("bytes_fetched", 0) + (
                self.transport.bytes_fetched - self._accounted
            )
            self._accounted = self.transport.bytes_fetched
        write_json(self.root / "state.json", self.state)

    def repo(self) -> Repo:
        if self._repo is None:
            self._repo = Repo(self.root / "tuf", self.cfg.repo_url, self.transport)
        return self._repo

    # --- one cycle ---------------------------------------------------------------------------

    def run_once(self) -> CycleResult:
        self.collect_garbage()
        result = self._cycle()
        self.deliver_reports()
        installed = self.state.get("installed")
        result.installed = installed["sequence"] if installed else None
        return result

    def _cycle(self) -> CycleResult:
        pending = self.state.get("pending")
        if (pending or {}).get("phase") in _KEEP_INSTALLED_RUNNING:
            # Whatever an update is doing (or failing to do), the device keeps a runtime.
            self._ensure_running()
        if pending is None:
            result = self._check()
            if result is not None:
                return result
        try:
            return self._advance()
        except StepFailed as exc:
            pending = self.state.get("pending")
            if pending is None:  # the step gave the release up (skipped): say so
                self._last_result.extra["phase_s"] = dict(self.timings)
                return self._last_result
            return CycleResult(
                "pending",
                pending.get("sequence"),
                str(exc),
                pending.get("bytes_fetched", 0),
            )

    def _check(self) -> CycleResult | None:
        """Pick the release to install; None when one is now pending."""
        try:
            releases = self.repo().refresh()
        except TrustError as exc:
            return self._refuse(None, str(exc))
        mine = [
            r
            for r in releases
            if r.channel == self.cfg.channel
            and r.platform == self.cfg.platform
            and r.device_class == self.cfg.device_class
        ]
        if not mine:
            return CycleResult("idle", reason="no release for this device on the channel")
        installed = self.state.get("installed")
        installed_seq = installed["sequence"] if installed else 0
        latest = max(mine, key=lambda r: r.sequence)
        mine, unmet_by = self._meeting_requirements(mine, installed_seq)
        if latest.sequence in unmet_by and (
            not mine or max(r.sequence for r in mine) <= installed_seq
        ):
            # The newest release is not for this device, and nothing newer than what runs is.
            return CycleResult(
                "not-eligible",
                latest.sequence,
                f"release skipped here: {unmet_by[latest.sequence]}",
            )
        newest = max(mine, key=lambda r: r.sequence)
        seen = int(self.state.get("highest_seen", 0))
        if newest.sequence < installed_seq or newest.sequence < seen:
            return self._refuse(
                newest,
                f"release sequence {newest.sequence} is lower than installed {installed_seq}"
                f" or seen {seen}; refusing a rollback",
            )
        self.state["highest_seen"] = max(seen, newest.sequence)
        self.state["last_refusal"] = ""
        self.save()
        if newest.sequence == installed_seq:
            return CycleResult("idle", newest.sequence, "up to date")
        if newest.sequence in self.state["failed"]:
            return CycleResult("idle", newest.sequence, "release failed its trial here before")
        skipped = self.state.get("skipped", {}).get(str(newest.sequence))
        if skipped:
            return CycleResult("idle", newest.sequence, f"release skipped here: {skipped}")
        if newest.halted:
            return CycleResult("not-eligible", newest.sequence, "release is halted")
        if not in_cohort(self.cfg.device_id, newest.percent):
            return CycleResult(
                "not-eligible", newest.sequence, f"outside the {newest.percent}% rollout cohort"
            )
        self.state["pending"] = {
            "sequence": newest.sequence,
            "target": newest.target,
            "name": newest.name,
            "version": newest.version,
            "phase": "download",
            "bytes_fetched": 0,
            "verify_failures": 0,
        }
        self.save()
        log.info("release %d (%s) is eligible", newest.sequence, newest.version)
        return None

    def _unmet(self, release: ReleaseInfo) -> str:
        """'' when this device meets the release's ``requires`` (packager.agent.device), else
        why not. The facts probe (the bundle's preflight, ``cfg.facts_probe``) runs once per
        agent, and only when a release asks; when it fails the facts are unknown and every
        release with requirements is skipped with that one reason."""
        if not release.requires:
            return ""
        if self._facts is None:
            self._facts = probe_facts(self.cfg.facts_probe, self.cfg.facts_timeout_s)
            if isinstance(self._facts, str):
                log.warning("device facts unknown: %s", self._facts)
        return unmet(release.requires, self._facts)

    def _meeting_requirements(
        self, releases: list[ReleaseInfo], installed_seq: int
    ) -> tuple[list[ReleaseInfo], dict[int, str]]:
        """The releases this device meets, and why each other one is not for it. A release newer
        than the installed one that the device does not meet (or whose requirement it does not
        know) is skipped: recorded and reported once, never installed."""
        met: list[ReleaseInfo] = []
        unmet_by: dict[int, str] = {}
        for release in sorted(releases, key=lambda r: r.sequence):
            reason = self._unmet(release)
            if not reason:
                met.append(release)
                continue
            unmet_by[release.sequence] = reason
            skipped = self.state.setdefault("skipped", {})
            if release.sequence > installed_seq and str(release.sequence) not in skipped:
                log.warning("release %d is not for this device: %s", release.sequence, reason)
                skipped[str(release.sequence)] = reason
                self._queue_report("not-eligible", release.sequence, reason, 0)
                self.save()
        return met, unmet_by

    def _refuse(self, release: ReleaseInfo | None, reason: str) -> CycleResult:
        log.warning("refused: %s", reason)
        # Report a refusal once, not every cycle while the repository stays bad.
        if self.state.get("last_refusal") != reason:
            self.state["last_refusal"] = reason
            self._queue_report("refused", release.sequence if release else None, reason, 0)
            self.save()
        return CycleResult(
            "refused", release.sequence if release else None, reason, self.transport.bytes_fetched
        )

    def _advance(self) -> CycleResult:
        steps = {
            "download": self._download,
            "verify": self._verify,
            "stage": self._stage,
            "prepare": self._prepare,
            "switch": self._switch,
            "trial": self._trial,
            "commit": self._commit,
            "rollback": self._rollback,
        }
        while True:
            pending = self.state.get("pending")
            if pending is None:
                self._last_result.extra["phase_s"] = dict(self.timings)
                return self._last_result
            phase = pending["phase"]
            started = time.monotonic()
            steps[phase](pending)
            self.timings[phase] = self.timings.get(phase, 0.0) + time.monotonic() - started

    _last_result = CycleResult("idle")

    def _set_phase(self, pending: dict[str, Any], phase: str) -> None:
        pending["phase"] = phase
        self.save()

    # --- download / verify -------------------------------------------------------------------

    def _objects(self) -> Path:
        return self.root / "store" / "objects"

    def _download(self, pending: dict[str, Any]) -> None:
        repo = self.repo()
        try:
            releases = {r.target: r for r in repo.refresh()}
        except TrustError as exc:
            raise StepFailed(str(exc)) from exc
        release = releases.get(pending["target"])
        if (
            release is None
            or release.halted
            or not in_cohort(self.cfg.device_id, release.percent)
            or self._unmet(release)
        ):
            # Halted (or withdrawn) while we were downloading: stop; what we fetched stays cached.
            self.state["pending"] = None
            self.save()
            self._last_result = CycleResult(
                "not-eligible", pending["sequence"], "release was halted or withdrawn"
            )
            return
        doc_path = self.root / "store" / "releases" / f"{pending['sequence']}.json"
        doc_info = repo.targetinfo(pending["target"])
        self._fetch_verified(repo, pending["target"], doc_path, doc_info)
        doc = read_json(doc_path)
        if doc.get("schema") != RELEASE_SCHEMA or doc.get("sequence") != pending["sequence"]:
            raise StepFailed(f"{pending['target']}: not a {RELEASE_SCHEMA} document")
        try:
            check_release(doc)
        except PathError as exc:
            # Validly signed does not mean well-formed: never stage a path outside the release.
            self._skip(pending, "refused", f"{pending['target']}: {exc}")
            return
        if doc["name"] != pending["name"] or doc.get("version") != pending["version"]:
            self._skip(pending, "refused", f"{pending['target']}: name/version differ from targets")
            return
        objects: dict[str, dict[str, Any]] = {}
        for target in _release_targets(doc):
            info = repo.targetinfo(target)
            try:
                digest = _signed_sha256(info)
                if digest != target.rsplit("/", 1)[1]:
                    raise PathError(f"signed sha256 {digest[:16]}... is not the target's name")
            except PathError as exc:
                # Content-addressed: the name is the hash, and the hash names a store file.
                self._skip(pending, "refused", f"{target}: {exc}")
                return
            objects[target] = {"sha256": digest, "length": info.length}
        pending["objects"] = objects
        self.save()
        for target, want in sorted(objects.items()):
            final = self._objects() / want["sha256"]
            if not final.exists():
                self._fetch_verified(repo, target, final, repo.targetinfo(target))
                self.save()
        self._set_phase(pending, "verify")

    def _fetch_verified(self, repo: Repo, target: str, final: Path, info: Any) -> None:
        if final.exists():
            return
        try:
            digest = _signed_sha256(info)
        except PathError as exc:
            self._skip(self.state["pending"], "refused", f"{target}: {exc}")
            raise StepFailed(str(exc)) from exc
        part = self.root / "store" / "partial" / f"{digest}.part"
        try:
            download_resumable(self.transport, repo.url(target), part, info.length)
            with part.open("rb") as handle:
                info.verify_length_and_hashes(handle)
        except LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)
            self._count_verify_failure(f"{target}: does not match its signed hash")
            raise StepFailed(f"{target}: does not match its signed hash; discarded") from exc
        except DownloadError as exc:
            raise StepFailed(f"{target}: download interrupted ({exc}); will resume") from exc
        os.replace(part, final)
        fsync_dir(final.parent)

    def _verify(self, pending: dict[str, Any]) -> None:
        bad = [
            target
            for target, want in sorted(pending["objects"].items())
            if not _object_ok(self._objects() / want["sha256"], want)
        ]
        if not bad:
            self._set_phase(pending, "stage")
            return
        for target in bad:
            (self._objects() / pending["objects"][target]["sha256"]).unlink(missing_ok=True)
        if not self._count_verify_failure(f"{bad[0]}: corrupt"):
            self._set_phase(pending, "download")

    def _count_verify_failure(self, what: str) -> bool:
        """Count one failed verification of the pending release; True when that was the last
        one allowed and the release is now skipped (reported as failed)."""
        pending = self.state["pending"]
        pending["verify_failures"] = pending.get("verify_failures", 0) + 1
        self.save()
        limit = self.cfg.max_verify_failures
        if pending["verify_failures"] < limit:
            return False
        self._skip(pending, "failed", f"{what} ({limit} failed verifications)")
        return True

    def _skip(self, pending: dict[str, Any], outcome: str, reason: str) -> None:
        """Drop the pending release, report it once, and skip it until a newer sequence."""
        log.warning("release %d %s: %s", pending["sequence"], outcome, reason)
        self.state["pending"] = None
        skipped = self.state.setdefault("skipped", {})
        skipped[str(pending["sequence"])] = reason
        self._queue_report(outcome, pending["sequence"], reason, pending.get("bytes_fetched", 0))
        self.save()
        self._last_result = CycleResult(
            outcome, pending["sequence"], reason, pending.get("bytes_fetched", 0)
        )

    # --- stage / switch ----------------------------------------------------------------------

    def _release_doc(self, sequence: int) -> dict[str, Any]:
        doc: dict[str, Any] = read_json(self.root / "store" / "releases" / f"{sequence}.json")
        return doc

    def _stage(self, pending: dict[str, Any]) -> None:
        seq = pending["sequence"]
        doc = self._release_doc(seq)
        releases = self.root / "releases"
        final = releases / str(seq)
        if not final.is_dir():
            staging = releases / f".staging-{seq}"
            if staging.exists():
                shutil.rmtree(staging)  # a crash left it half-written
            staging.mkdir()
            objects = pending["objects"]
            members = [
                (m["name"], self._objects() / objects[m["target"]]["sha256"])
                for m in doc["image"]["members"]
            ]
            write_tar(staging / "image.tar", members)
            checkpoint("stage-partial")
            try:
                check_release(doc)  # checked at download; again here, where it is used
                for entry in doc["files"]:
                    # O_EXCL|O_NOFOLLOW under the fresh staging dir, one component at a time.
                    fd = create_file(staging, entry["path"], entry.get("mode", 0o644))
                    with (
                        os.fdopen(fd, "wb") as out,
                        open(self._objects() / objects[entry["target"]]["sha256"], "rb") as src,
                    ):
                        shutil.copyfileobj(src, out)
            except PathError as exc:
                shutil.rmtree(staging)
                self._skip(pending, "refused", f"{pending['target']}: {exc}")
                return
            write_json(staging / "release.json", doc)
            fsync_dir(staging)
            os.rename(staging, final)
            fsync_dir(releases)
        checkpoint("stage-renamed")
        if self.cfg.bundle_key is not None:
            try:
                key = public_key_from_pem(self.cfg.bundle_key.read_bytes(), "bundle_key")
                keyid = check_release_bundle(final, key, doc["files"])
            except (SignatureError, OSError, tarfile.TarError, KeyError) as exc:
                # Never loaded: a release the bundle key did not sign is dropped, not retried.
                shutil.rmtree(final, ignore_errors=True)
                self._skip(pending, "refused", f"{pending['target']}: bundle signature: {exc}")
                return
            log.info("release %d: bundle signature verified (key %s)", seq, keyid[:16])
        try:
            self.engine.load(final / "image.tar")
        except EngineError as exc:
            raise StepFailed(f"loading the image failed: {exc}") from exc
        checkpoint("stage-loaded")
        self._set_phase(pending, "prepare")

    def _prepare(self, pending: dict[str, Any]) -> None:
        """Run the release's prepare step, if it declares one; then switch. A confinement.json
        outside the allow-list is refused here, before anything of the release runs."""
        target = f"releases/{pending['sequence']}"
        try:
            confinement = read_confinement(self.root / target)
            # The bundle's device access as this engine gives it (docker: --runtime=nvidia,
            # podman: CDI): the engine is told by its file name, any other refused here.
            run_args = confinement.for_engine(self.engine.executable)
        except ConfinementError as exc:
            pending["reason"] = f"runtime not started: {exc}"
            self._set_phase(pending, "rollback")
            return
        step = confinement.prepare
        if step is None or "prepare" in pending:
            self._set_phase(pending, "switch")
            return
        attempts = int(pending.get("prepare_attempts", 0)) + 1
        if attempts > MAX_PREPARE_ATTEMPTS:
            pending["prepare"] = f"failed (interrupted {MAX_PREPARE_ATTEMPTS} times)"
            log.warning("release %d: prepare: %s", pending["sequence"], pending["prepare"])
            self._set_phase(pending, "switch")
            return
        pending["prepare_attempts"] = attempts
        self.save()
        name = f"{self._container(pending['name'])}-prepare"
        ref = self._release_doc(pending["sequence"])["image"]["ref"]
        timeout_s = min(float(step.timeout_s), self.cfg.prepare_max_s)
        log.info("release %d: prepare: %s (at most %.0f s)", pending["sequence"], step.module,
                 timeout_s)  # fmt: skip
        checkpoint("prepare-start")
        outcome = self.engine.run_foreground(
            name, prepare_argv(name, ref, run_args, step), timeout_s
        )
        checkpoint("prepare-ran")
        if outcome.ok:
            pending["prepare"] = "ok"
        else:
            # Not a rollback: the new version serves on its explicit fallback (its health report
            # says which), and the report says the step failed.
            pending["prepare"] = f"failed ({outcome.line})"
            log.warning("release %d: prepare: %s", pending["sequence"], pending["prepare"])
        self._set_phase(pending, "switch")

    def _container(self, name: str) -> str:
        return f"edgepack-{name}"

    def _start(self, name: str, ref: str, release_dir: str) -> None:
        """Start ``ref`` with the confinement its bundle's unit uses (``confinement.json``)."""
        try:
            confinement = detached_args(self.root / release_dir, self.engine.executable)
        except ConfinementError as exc:
            raise EngineError(str(exc)) from exc
        self.engine.start(name, ref, self.cfg.port, confinement)

    def _switch(self, pending: dict[str, Any]) -> None:
        target = f"releases/{pending['sequence']}"
        current = self.root / "current"
        now = os.readlink(current) if current.is_symlink() else None
        if now != target:
            if now is not None:
                symlink_atomic(self.root / "previous", now)
            checkpoint("switch-previous")
            symlink_atomic(current, target)
        checkpoint("switch-linked")
        installed = self.state.get("installed")
        if installed and installed["name"] != pending["name"]:
            self.engine.stop(self._container(installed["name"]))
        doc = self._release_doc(pending["sequence"])
        try:
            self._start(self._container(pending["name"]), doc["image"]["ref"], target)
        except EngineError as exc:
            pending["reason"] = f"runtime did not start: {exc}"
            self._set_phase(pending, "rollback")
            return
        checkpoint("switch-started")
        pending["trial_started"] = time.time()
        self._set_phase(pending, "trial")

    # --- trial / commit / rollback -----------------------------------------------------------

    def _trial(self, pending: dict[str, Any]) -> None:
        name = self._container(pending["name"])
        if not self.engine.running(name):
            # Power cut or crash during the trial: the trial starts over with a fresh container.
            doc = self._release_doc(pending["sequence"])
            try:
                self._start(name, doc["image"]["ref"], f"releases/{pending['sequence']}")
            except EngineError as exc:
                pending["reason"] = f"runtime did not start: {exc}"
                self._set_phase(pending, "rollback")
                return
        checkpoint("trial")
        reason = self._watch(name)
        if reason:
            pending["reason"] = reason
            self._set_phase(pending, "rollback")
        else:
            self._set_phase(pending, "commit")

    def _watch(self, name: str) -> str:
        """'' when the runtime became ready and stayed ready and running for the trial window."""
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while not ready(self.cfg.port):
            if time.monotonic() > deadline:
                return f"runtime not ready within {self.cfg.ready_timeout_s:.0f}s"
            if not self.engine.running(name):
                return "runtime container exited before becoming ready"
            time.sleep(self.cfg.poll_s)
        end = time.monotonic() + self.cfg.trial_s
        while time.monotonic() < end:
            time.sleep(min(self.cfg.poll_s, max(0.0, end - time.monotonic())))
            # The watchdog: the container must keep running and keep answering ready.
            if not self.engine.running(name):
                return "runtime container stopped during the trial window"
            if not ready(self.cfg.port):
                return "runtime stopped answering ready during the trial window"
        return ""

    def _wait_ready(self, name: str) -> bool:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while not ready(self.cfg.port):
            if time.monotonic() > deadline or not self.engine.running(name):
                return False
            time.sleep(self.cfg.poll_s)
        return True

    def _commit(self, pending: dict[str, Any]) -> None:
        doc = self._release_doc(pending["sequence"])
        record = {
            "sequence": pending["sequence"],
            "name": pending["name"],
            "version": pending["version"],
            "ref": doc["image"]["ref"],
            "dir": f"releases/{pending['sequence']}",
        }
        old = self.state.get("installed")
        # Committed, yet on the fallback: the report and the result say the prepare step failed.
        note = _prepare_failure(pending)
        self._queue_report(
            "committed", pending["sequence"], note, pending.get("bytes_fetched", 0), pending
        )
        checkpoint("commit-reported")
        if not old or old["sequence"] != pending["sequence"]:
            self.state["previous"] = old
        self.state["installed"] = record
        self.state["pending"] = None
        self.save()
        checkpoint("commit-saved")
        self._last_result = CycleResult(
            "committed", pending["sequence"], note, pending.get("bytes_fetched", 0)
        )
        self.collect_garbage()

    def _rollback(self, pending: dict[str, Any]) -> None:
        reason = pending.get("reason", "trial failed")
        failure = _prepare_failure(pending)
        if failure:
            reason += f"; {failure}"
        installed = self.state.get("installed")
        new_name = self._container(pending["name"])
        current = self.root / "current"
        if installed:
            symlink_atomic(current, installed["dir"])
            # The switch pointed 'previous' at the version it replaced; point it back at the one
            # the state keeps for rollback (or drop it when there is none).
            previous = self.state.get("previous")
            if previous:
                symlink_atomic(self.root / "previous", previous["dir"])
            elif (self.root / "previous").is_symlink():
                (self.root / "previous").unlink()
                fsync_dir(self.root)
            checkpoint("rollback-linked")
            if installed["name"] != pending["name"]:
                self.engine.stop(new_name)
            restored = self._container(installed["name"])
            try:
                self._start(restored, installed["ref"], installed["dir"])
            except EngineError as exc:
                reason += f"; restarting the previous version failed: {exc}"
            else:
                # Report only once the version rolled back to serves again (or say it does not).
                if not self._wait_ready(restored):
                    reason += (
                        f"; the previous version did not answer ready within"
                        f" {self.cfg.ready_timeout_s:.0f}s"
                    )
        else:
            self.engine.stop(new_name)
            if current.is_symlink():
                current.unlink()
                fsync_dir(self.root)
        self.state["failed"] = sorted({*self.state["failed"], pending["sequence"]})
        self.state["pending"] = None
        fetched = pending.get("bytes_fetched", 0)
        self._queue_report("rolled-back", pending["sequence"], reason, fetched)
        self.save()
        log.warning("release %d rolled back: %s", pending["sequence"], reason)
        self._last_result = CycleResult(
            "rolled-back", pending["sequence"], reason, pending.get("bytes_fetched", 0)
        )
        self.collect_garbage()

    def _ensure_running(self) -> None:
        installed = self.state.get("installed")
        if not installed:
            return
        name = self._container(installed["name"])
        try:
            if not self.engine.running(name):
                log.info("runtime %s not running; starting %s", name, installed["ref"])
                self._start(name, installed["ref"], installed["dir"])
        except EngineError as exc:
            log.error("could not start the installed runtime: %s", exc)

    # --- garbage collection ------------------------------------------------------------------

    def collect_garbage(self) -> None:
        """Drop releases and blobs that neither the installed, previous nor pending one needs."""
        keep: set[int] = set()
        for key in ("installed", "previous", "pending"):
            entry = self.state.get(key)
            if entry:
                keep.add(int(entry["sequence"]))
        releases = self.root / "releases"
        for path in releases.iterdir():
            if path.name.startswith(".staging-"):
                seq = int(path.name.removeprefix(".staging-"))
            elif path.name.isdigit():
                seq = int(path.name)
            else:
                continue
            if seq not in keep:
                shutil.rmtree(path)
        wanted: set[str] = set()
        for doc_path in (self.root / "store" / "releases").glob("*.json"):
            seq = int(doc_path.stem)
            if seq not in keep:
                doc_path.unlink()
                continue
            pending = self.state.get("pending")
            if pending and pending["sequence"] == seq and "objects" in pending:
                wanted |= {o["sha256"] for o in pending["objects"].values()}
            elif (releases / str(seq) / "release.json").exists():
                wanted |= _release_hashes(read_json(releases / str(seq) / "release.json"))
            else:
                wanted = {p.name for p in self._objects().iterdir()}  # unsure: keep all
                break
        for path in self._objects().iterdir():
            if path.name not in wanted:
                path.unlink()

    # --- reports -----------------------------------------------------------------------------

    def _queue_report(
        self,
        outcome: str,
        sequence: int | None,
        reason: str,
        bytes_fetched: int,
        pending: dict[str, Any] | None = None,
    ) -> None:
        installed = self.state.get("installed")
        report: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "id": f"{self.cfg.device_id}:{sequence}:{outcome}",
            "device_id": self.cfg.device_id,
            "channel": self.cfg.channel,
            "platform": self.cfg.platform,
            "sequence": sequence,
            "version": pending["version"] if pending else None,
            "outcome": outcome,
            "reason": reason,
            "bytes_fetched": bytes_fetched,
            "installed": installed["sequence"] if installed else None,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if pending and "prepare" in pending:  # only for a release with a prepare step
            report["prepare"] = pending["prepare"]
        name = f"{time.time_ns()}-{outcome}.json"
        write_json(self.root / "outbox" / name, report)

    def deliver_reports(self) -> None:
        """Send queued reports (at least once); keep them queued when the URL is unreachable."""
        for path in sorted((self.root / "outbox").glob("*.json")):
            body = path.read_bytes()
            if self.cfg.report_url:
                request = urllib.request.Request(
                    self.cfg.report_url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                try:
                    with urllib.request.urlopen(request, timeout=self.cfg.http_timeout_s):
                        pass
                except (urllib.error.URLError, OSError) as exc:
                    log.warning("report not delivered (%s); kept in %s", exc, path.parent)
                    return
            else:
                line = json.dumps(json.loads(body), sort_keys=True) + "\n"
                try:
                    self._append_report(line.encode())
                except (PathError, OSError) as exc:
                    log.warning("report not written (%s); kept in %s", exc, path.parent)
                    return
            path.unlink()

    def _append_report(self, line: bytes) -> None:
        """Append to the report file without following a link planted anywhere below its
        trusted root (a USB stick's directories and file are the stick owner's to choose)."""
        target = self.cfg.report_file or (self.root / "reports.jsonl")
        base = self.cfg.report_root or target.parent
        try:
            rel = target.relative_to(base).as_posix()
        except ValueError as exc:
            raise PathError(f"{target}: not under the report root {base}") from exc
        with os.fdopen(open_append(base, rel), "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def _prepare_failure(pending: dict[str, Any]) -> str:
    """``prepare: failed (...)`` when the release's prepare step failed, else ''."""
    prepared = str(pending.get("prepare", ""))
    return f"prepare: {prepared}" if prepared.startswith("failed") else ""


def _signed_sha256(info: Any) -> str:
    """The target's signed sha256, which names its file in the store: 64 hex digits or
    PathError (a signed 'hash' such as '../../x' must not become a path)."""
    digest = info.hashes.get("sha256") if isinstance(info.hashes, dict) else None
    if not isinstance(digest, str) or not _HEX.fullmatch(digest):
        raise PathError(f"signed sha256 {digest!r} is not 64 lower-case hex digits")
    return digest


def _release_targets(doc: dict[str, Any]) -> list[str]:
    return sorted(
        {m["target"] for m in doc["image"]["members"]} | {f["target"] for f in doc["files"]}
    )


def _release_hashes(doc: dict[str, Any]) -> set[str]:
    return {t.rsplit("/", 1)[-1] for t in _release_targets(doc)}


def _object_ok(path: Path, want: dict[str, Any]) -> bool:
    return (
        path.is_file()
        and path.stat().st_size == want["length"]
        and sha256_file(path) == want["sha256"]
    )
