"""The static TUF repository: keys per role, metadata written with tuf's Metadata API.

On disk (``REPO``)::

    keys/root/<keyid>.pem        root keys: move them OFFLINE after 'ota init' (only needed to
                                 rotate keys); threshold ROOT_THRESHOLD of ROOT_KEYS
    keys/online/<keyid>.pem      targets, snapshot, timestamp keys (threshold 1 each): the
                                 publisher signs releases, rollouts and refreshes with them
    repository/metadata/         1.root.json, N.targets.json, N.snapshot.json, timestamp.json
    repository/targets/          releases/<channel>/<seq>.json, blobs/sha256/<hex>, files/...
    reports/*.jsonl              device outcome reports (HTTP collector or USB pickup)

Serve ``repository/`` with any static web server (Range support makes downloads resumable).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# securesystemslib documents securesystemslib.signer as public but declares no __all__.
from securesystemslib.signer import CryptoSigner, Signer  # type: ignore[attr-defined]

# tuf documents tuf.api.metadata as the public home of these classes but declares no __all__.
from tuf.api.metadata import (  # type: ignore[attr-defined]
    DelegatedRole,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from packager.agent.protocol import (
    CUSTOM_KEY,
    METADATA_DIR,
    TARGETS_DIR,
    USB_SUBDIR,
    ReleaseInfo,
    release_target,
)
from packager.errors import InputError, UsageError, VerifyError
from packager.ota.bundle import ReleasePlan, check_channel, check_percent, plan_release
from packager.staging import staged_dir, staged_file, write_bytes

ROOT_KEYS = 2
ROOT_THRESHOLD = 2
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid when it is signed.

    A client checks every role it loads (TUF specification 5.3-5.6), so metadata is only as
    valid as its shortest-lived role: each signing keeps the chain ordered, timestamp <=
    snapshot <= targets, delegated roles and root (see :meth:`Repository._commit`).
    """

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)


@dataclass(frozen=True)
class RoleExpiry:
    """One role's signed metadata: its version and when clients stop accepting it (UTC)."""

    role: str  # root | targets | snapshot | timestamp | a delegated role's name
    version: int
    expires: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "version": self.version,
            "expires": self.expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


@dataclass(frozen=True)
class Renewal:
    """What a refresh or an export signed: every role's expiry, the roles signed anew, and
    warnings for roles that expire before the promised time and could not be re-signed."""

    timestamp_version: int
    roles: tuple[RoleExpiry, ...]
    resigned: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def valid_until(self) -> datetime:
        """When the first role expires: a client refuses the metadata from then on."""
        return min(r.expires for r in self.roles)

    def to_json(self) -> dict[str, Any]:
        return {
            "timestamp_version": self.timestamp_version,
            "roles": [r.to_json() for r in self.roles],
            "valid_until": self.valid_until.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "resigned": list(self.resigned),
            "warnings": list(self.warnings),
        }


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _resign(md: Metadata[Any], expires: datetime, signers: list[Signer]) -> None:
    """The next version of ``md``, valid until ``expires``, signed by ``signers`` alone."""
    md.signed.version += 1
    md.signed.expires = expires
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def _serialize(md: Metadata[Any]) -> bytes:
    return JSONSerializer(compact=False).serialize(md)


class Repository:
    """An OTA repository on disk (``REPO``, laid out as above): keys, TUF metadata, release
    targets. A path with no ``repository/metadata/1.root.json`` is an InputError (exit 3)."""

    def __init__(self, path: Path, *, expiry: Expiry | None = None) -> None:
        self.path = path
        self.expiry = expiry or Expiry()
        self.metadata_dir = path / "repository" / METADATA_DIR
        self.targets_dir = path / "repository" / TARGETS_DIR
        if not (self.metadata_dir / "1.root.json").is_file():
            raise InputError(
                f"{path}: not an OTA repository (no repository/metadata/1.root.json)",
                hint="create one with 'edgepack ota init REPO'",
            )

    # --- creation ----------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        root_keys: int = ROOT_KEYS,
        root_threshold: int = ROOT_THRESHOLD,
        expiry: Expiry | None = None,
    ) -> Repository:
        if not 1 <= root_threshold <= root_keys:
            raise UsageError(
                f"--root-threshold {root_threshold}: must be between 1 and --root-keys {root_keys}"
            )
        if path.exists() and any(path.iterdir()):
            raise InputError(f"{path}: exists and is not empty", hint="pick a new directory")
        expiry = expiry or Expiry()
        now = _now()
        # Build everything in a sibling staging dir and move it into place: no half-made repo.
        # 0700: the repository holds the private keys.
        with staged_dir(path, mode=0o700) as staging:
            signers: dict[str, list[Signer]] = {}
            root = Root(expires=now + expiry.root, consistent_snapshot=True)
            for role, count, threshold in [
                ("root", root_keys, root_threshold),
                *((r, 1, 1) for r in ONLINE_ROLES),
            ]:
                folder = staging / "keys" / ("root" if role == "root" else "online")
                folder.mkdir(parents=True, exist_ok=True)
                for _ in range(count):
                    signer = CryptoSigner.generate_ed25519()
                    key = signer.public_key
                    root.add_key(key, role)
                    pem = folder / f"{key.keyid}.pem"
                    pem.write_bytes(signer.private_bytes)
                    pem.chmod(0o600)
                    signers.setdefault(role, []).append(signer)
                root.roles[role].threshold = threshold
            meta = staging / "repository" / METADATA_DIR
            root_md = Metadata(root)
            for root_signer in signers["root"]:
                root_md.sign(root_signer, append=True)
            write_bytes(meta / "1.root.json", _serialize(root_md))
            write_bytes(meta / "root.json", _serialize(root_md))
            targets = Metadata(Targets(expires=now + expiry.targets))
            snapshot = Metadata(Snapshot(expires=now + expiry.snapshot))
            timestamp = Metadata(Timestamp(expires=now + expiry.timestamp))
            for md, role in (
                (targets, "targets"),
                (snapshot, "snapshot"),
                (timestamp, "timestamp"),
            ):
                md.sign(signers[role][0])
            write_bytes(meta / "1.targets.json", _serialize(targets))
            write_bytes(meta / "1.snapshot.json", _serialize(snapshot))
            write_bytes(meta / "timestamp.json", _serialize(timestamp))
            (staging / "repository" / TARGETS_DIR).mkdir(parents=True)
            (staging / "reports").mkdir()
        return cls(path, expiry=expiry)

    # --- reading -----------------------------------------------------------------------------

    def _load(
        self,
    ) -> tuple[Metadata[Root], Metadata[Targets], Metadata[Snapshot], Metadata[Timestamp]]:
        timestamp: Metadata[Timestamp] = Metadata.from_file(
            str(self.metadata_dir / "timestamp.json")
        )
        snap_version = timestamp.signed.snapshot_meta.version
        snapshot: Metadata[Snapshot] = Metadata.from_file(
            str(self.metadata_dir / f"{snap_version}.snapshot.json")
        )
        targets_version = snapshot.signed.meta["targets.json"].version
        targets: Metadata[Targets] = Metadata.from_file(
            str(self.metadata_dir / f"{targets_version}.targets.json")
        )
        root_version = max(int(p.name.split(".")[0]) for p in self.metadata_dir.glob("*.root.json"))
        root: Metadata[Root] = Metadata.from_file(
            str(self.metadata_dir / f"{root_version}.root.json")
        )
        return root, targets, snapshot, timestamp

    def _signer(self, root: Metadata[Root], role: str) -> Signer:
        signers = self._signers("online", root.signed.roles[role].keyids, root.signed.keys, 1)
        if not signers:
            raise InputError(
                f"{self.path / 'keys' / 'online'}: no private key for the {role} role",
                hint="restore the online keys that 'ota init' wrote",
            )
        return signers[0]

    def _signers(
        self, folder: str, keyids: list[str], keys: dict[str, Any], count: int
    ) -> list[Signer]:
        """Up to ``count`` signers for ``keyids`` whose private keys are in keys/<folder>."""
        found: list[Signer] = []
        for keyid in keyids:
            pem = self.path / "keys" / folder / f"{keyid}.pem"
            if len(found) < count and pem.is_file():
                found.append(CryptoSigner.from_priv_key_uri(f"file2:{pem}", keys[keyid]))
        return found

    def _delegated(
        self, targets: Metadata[Targets], snapshot: Metadata[Snapshot]
    ) -> dict[str, tuple[DelegatedRole, dict[str, Any], Metadata[Targets]]]:
        """The delegated targets roles the snapshot lists, by name, in delegation order: the
        delegation (keyids, threshold), the delegator's keys, the role's current metadata."""
        delegations = targets.signed.delegations
        if delegations is None or not delegations.roles:
            return {}
        found: dict[str, tuple[DelegatedRole, dict[str, Any], Metadata[Targets]]] = {}
        for name, role in delegations.roles.items():
            meta = snapshot.signed.meta.get(f"{name}.json")
            if meta is not None:
                path = self.metadata_dir / f"{meta.version}.{name}.json"
                found[name] = (role, delegations.keys, Metadata.from_file(str(path)))
        return found

    def expiries(self) -> tuple[RoleExpiry, ...]:
        """Every role's current version and expiry: root, targets, delegated roles, snapshot,
        timestamp (what a client loads, in the order it loads them, timestamp aside)."""
        root, targets, snapshot, timestamp = self._load()
        roles: list[tuple[str, Metadata[Any]]] = [("root", root), ("targets", targets)]
        roles += [(name, md) for name, (_, _, md) in self._delegated(targets, snapshot).items()]
        roles += [("snapshot", snapshot), ("timestamp", timestamp)]
        return tuple(
            RoleExpiry(name, int(md.signed.version), md.signed.expires) for name, md in roles
        )

    def releases(self) -> list[ReleaseInfo]:
        _, targets, _, _ = self._load()
        return sorted(
            (r for r in (_release(n, t) for n, t in targets.signed.targets.items()) if r),
            key=lambda r: r.sequence,
        )

    def release(self, channel: str, sequence: int | None) -> ReleaseInfo:
        mine = [r for r in self.releases() if r.channel == channel]
        if sequence is not None:
            mine = [r for r in mine if r.sequence == sequence]
        if not mine:
            which = f"sequence {sequence}" if sequence is not None else "release"
            raise InputError(f"{self.path}: channel {channel!r} has no {which}")
        return mine[-1]

    # --- writing -----------------------------------------------------------------------------

    def _commit(
        self,
        root: Metadata[Root],
        targets: Metadata[Targets],
        snapshot: Metadata[Snapshot],
        timestamp: Metadata[Timestamp],
        *,
        new_targets: bool,
        timestamp_expiry: timedelta | None = None,
    ) -> Renewal:
        """Sign and write snapshot and timestamp, and every role that would expire first.

        A client refuses the metadata as soon as any role it loads has expired, so a timestamp
        valid N days promises nothing unless every role behind it lasts as long. The snapshot
        lives at least as long as the timestamp; targets, delegated roles and root at least as
        long as the snapshot. A role that would expire sooner is signed anew (targets and
        delegated roles with the online keys; root with the root keys, when keys/root still
        holds a threshold of them) or, where its keys are absent, named in the warnings.
        timestamp.json goes last, atomically, so a client never sees a timestamp that points at
        metadata not yet written.
        """
        now = _now()
        stamp_expires = now + (timestamp_expiry or self.expiry.timestamp)
        floor = max(now + self.expiry.snapshot, stamp_expires)
        resigned: list[str] = []
        warnings: list[str] = []
        self._keep_root(root, floor, now, resigned, warnings)
        for name, (role, keys, md) in self._delegated(targets, snapshot).items():
            if md.signed.expires >= floor:
                continue
            signers = self._signers("online", role.keyids, keys, role.threshold)
            if len(signers) < role.threshold:
                warnings.append(_short(name, md.signed.expires, floor, "keys/online"))
                continue
            _resign(md, max(now + self.expiry.targets, floor), signers)
            write_bytes(self.metadata_dir / f"{md.signed.version}.{name}.json", _serialize(md))
            snapshot.signed.meta[f"{name}.json"] = MetaFile(version=md.signed.version)
            resigned.append(name)
        if new_targets or targets.signed.expires < floor:
            if not new_targets:
                resigned.append("targets")
            _resign(targets, max(now + self.expiry.targets, floor), [self._signer(root, "targets")])
            write_bytes(
                self.metadata_dir / f"{targets.signed.version}.targets.json", _serialize(targets)
            )
            snapshot.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        _resign(snapshot, floor, [self._signer(root, "snapshot")])
        write_bytes(
            self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", _serialize(snapshot)
        )
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        _resign(timestamp, stamp_expires, [self._signer(root, "timestamp")])
        write_bytes(self.metadata_dir / "timestamp.json", _serialize(timestamp))
        return Renewal(
            timestamp_version=int(timestamp.signed.version),
            roles=self.expiries(),
            resigned=tuple(resigned),
            warnings=tuple(warnings),
        )

    def _keep_root(
        self,
        root: Metadata[Root],
        floor: datetime,
        now: datetime,
        resigned: list[str],
        warnings: list[str],
    ) -> None:
        """Sign root anew (version + 1, same keys) when it expires before ``floor`` and
        keys/root still holds a threshold of its keys; otherwise add a warning. Clients accept
        the new version because the keys and threshold they already trust signed it (TUF
        specification 5.3.4)."""
        if root.signed.expires >= floor:
            return
        role = root.signed.roles["root"]
        signers = self._signers("root", role.keyids, root.signed.keys, role.threshold)
        if len(signers) < role.threshold:
            warnings.append(_short("root", root.signed.expires, floor, "keys/root"))
            return
        _resign(root, max(now + self.expiry.root, floor), signers)
        data = _serialize(root)
        write_bytes(self.metadata_dir / f"{root.signed.version}.root.json", data)
        write_bytes(self.metadata_dir / "root.json", data)
        resigned.append("root")

    def next_sequence(self) -> int:
        return max((r.sequence for r in self.releases()), default=0) + 1

    def plan(self, bundle: Path, *, channel: str = "stable", percent: float = 100.0) -> ReleasePlan:
        return plan_release(bundle, sequence=self.next_sequence(), channel=channel, percent=percent)

    def publish(
        self, bundle: Path, *, channel: str = "stable", percent: float = 100.0
    ) -> ReleasePlan:
        plan = self.plan(bundle, channel=channel, percent=percent)
        self.apply(plan)
        return plan

    def apply(self, plan: ReleasePlan) -> None:
        """Store the plan's objects and sign it into the metadata.

        Refuses a sequence that is not above every published one; a test that needs a validly
        signed lower sequence (to check that devices refuse it) calls :meth:`apply_unchecked`.
        """
        current = max((r.sequence for r in self.releases()), default=0)
        if plan.sequence <= current:
            raise UsageError(
                f"sequence {plan.sequence}: must be above the latest published ({current})"
            )
        self.apply_unchecked(plan)

    def apply_unchecked(self, plan: ReleasePlan, *, replace_channel: bool = False) -> None:
        for source in plan.objects:
            self._store(
                source.target, source.sha256, source.size, source.bundle_file, source.tar_member
            )
        doc_target = release_target(plan.channel, plan.sequence)
        write_bytes(self.targets_dir / doc_target, plan.document)
        root, targets, snapshot, timestamp = self._load()
        if replace_channel:
            for name in [n for n, t in targets.signed.targets.items() if _release(n, t)]:
                release = _release(name, targets.signed.targets[name])
                if release is not None and release.channel == plan.channel:
                    del targets.signed.targets[name]
        for source in plan.objects:
            targets.signed.targets[source.target] = TargetFile(
                source.size, {"sha256": source.sha256}, source.target
            )
        targets.signed.targets[doc_target] = TargetFile(
            len(plan.document),
            {"sha256": hashlib.sha256(plan.document).hexdigest()},
            doc_target,
            unrecognized_fields={"custom": plan.custom},
        )
        self._commit(root, targets, snapshot, timestamp, new_targets=True)

    def _store(
        self, target: str, sha256: str, size: int, bundle_file: Path, member: str | None
    ) -> None:
        dest = self.targets_dir / target
        if dest.is_file() and dest.stat().st_size == size:
            return  # content-addressed: already there from an earlier release
        with staged_file(dest) as tmp:
            digest = hashlib.sha256()
            with _open_source(bundle_file, member) as src, tmp.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha256:
                where = f"{bundle_file}:{member}" if member else str(bundle_file)
                raise VerifyError(
                    f"{where}: content does not match its digest sha256:{sha256[:16]}..."
                )

    def set_release(
        self,
        channel: str,
        sequence: int | None = None,
        *,
        percent: int | None = None,
        halted: bool | None = None,
    ) -> ReleaseInfo:
        """Change a release's rollout percentage or halted flag (re-signs targets).

        ``channel`` and ``percent`` are the command line's (``--channel``, ``--percent``):
        UsageError (exit 2) when malformed, before the repository is read; InputError (exit 3)
        when the channel has no such release."""
        check_channel(channel)
        if percent is not None:
            percent = check_percent(percent)
        release = self.release(channel, sequence)
        root, targets, snapshot, timestamp = self._load()
        info = targets.signed.targets[release.target]
        new = replace(
            release,
            percent=percent if percent is not None else release.percent,
            halted=halted if halted is not None else release.halted,
        )
        data = dict(info.unrecognized_fields["custom"][CUSTOM_KEY])
        data.update({"percent": new.percent, "halted": new.halted})
        info.unrecognized_fields["custom"] = {CUSTOM_KEY: data}
        self._commit(root, targets, snapshot, timestamp, new_targets=True)
        return new

    def refresh(self, *, timestamp_expiry: timedelta | None = None) -> Renewal:
        """Re-sign snapshot and timestamp with fresh expiry (timestamp: ``timestamp_expiry``,
        default ``expiry.timestamp``), and every role that would expire before them (see
        :meth:`_commit`)."""
        root, targets, snapshot, timestamp = self._load()
        return self._commit(
            root, targets, snapshot, timestamp, new_targets=False, timestamp_expiry=timestamp_expiry
        )

    def export(
        self, usb_dir: Path, *, timestamp_expiry: timedelta | None = None
    ) -> tuple[Path, Renewal]:
        """Copy the repository to ``usb_dir/edgepack-ota`` for devices without a network, after a
        :meth:`refresh` that keeps every role valid for at least ``timestamp_expiry``.

        Returns the stick's repository directory and what the refresh signed."""
        renewal = self.refresh(timestamp_expiry=timestamp_expiry)
        dest = usb_dir / USB_SUBDIR
        with staged_dir(dest) as staging:
            shutil.copytree(self.path / "repository", staging, dirs_exist_ok=True)
            (staging / "reports").mkdir(exist_ok=True)
            reports = dest / "reports"
            if reports.is_dir() and not reports.is_symlink():  # keep what devices left there
                shutil.copytree(reports, staging / "reports", dirs_exist_ok=True)
        return dest, renewal

    @property
    def trusted_root(self) -> Path:
        """The file a device needs once (``agent init --trusted-root``)."""
        return self.metadata_dir / "1.root.json"


@contextmanager
def _open_source(bundle_file: Path, member: str | None) -> Iterator[Any]:
    if member is None:
        with bundle_file.open("rb") as handle:
            yield handle
        return
    with tarfile.open(bundle_file, "r:") as tar:
        extracted = tar.extractfile(member)
        if extracted is None:
            raise VerifyError(f"{bundle_file}: {member} is not a regular file")
        with extracted:
            yield extracted


def _short(role: str, expires: datetime, until: datetime, folder: str) -> str:
    return (
        f"{role} metadata expires {expires:%Y-%m-%d %H:%M}Z, before {until:%Y-%m-%d %H:%M}Z:"
        f" clients refuse this repository from then; put the {role} keys back in {folder} and"
        " run this again to re-sign it"
    )


def _release(name: str, info: TargetFile) -> ReleaseInfo | None:
    return ReleaseInfo.from_custom(name, info.custom)
