"""TUF verification of the repository through tuf.ngclient: nothing is used before it passes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

# tuf documents tuf.api.metadata as the public home of these classes but declares no __all__.
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from .fetch import Transport, TufFetcher
from .protocol import METADATA_DIR, RELEASE_PREFIX, TARGETS_DIR, ReleaseInfo


def system_now() -> datetime:
    """The device's clock (UTC), which tuf itself would read."""
    return datetime.now(UTC)


# The clock every expiry check of this module uses. A named test seam: tests that move the
# device's clock (tests/unit/agent/test_offline_expiry.py) rebind it; production never does.
now: Callable[[], datetime] = system_now


class TrustError(Exception):
    """Repository metadata failed TUF verification (signature, expiry, rollback, hashes)."""


class Repo:
    """A verified view of one repository (HTTP base URL or ``file://`` USB directory)."""

    def __init__(self, metadata_dir: Path, base_url: str, transport: Transport) -> None:
        if not (metadata_dir / "root.json").is_file():
            raise TrustError(
                f"{metadata_dir / 'root.json'}: no trusted root; run the agent's 'init' with the"
                " repository's root.json first"
            )
        base = base_url if base_url.endswith("/") else base_url + "/"
        self.targets_url = base + TARGETS_DIR + "/"
        self._dir = metadata_dir
        self._releases: list[ReleaseInfo] | None = None
        self._updater = Updater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=base + METADATA_DIR + "/",
            target_base_url=self.targets_url,
            fetcher=TufFetcher(transport),
            # Targets are content-addressed or immutable by name, so no hash prefix is needed.
            config=UpdaterConfig(prefix_targets_with_hash=False),
            bootstrap=None,
        )
        if now is not system_now:
            # tuf's Updater reads the clock once, here, as the reference time of every expiry
            # check in refresh(); a moved clock replaces exactly that value. Fail loudly if tuf
            # stops keeping it there, so a moved clock can never silently be ignored.
            trusted = getattr(self._updater, "_trusted_set", None)
            if trusted is None or not hasattr(trusted, "reference_time"):
                raise RuntimeError("trust.now was moved but tuf's Updater keeps no reference_time")
            trusted.reference_time = now()

    def refresh(self) -> list[ReleaseInfo]:
        """Update the top-level metadata (root, timestamp, snapshot, targets); list releases.

        Raises TrustError for anything tuf rejects: a bad signature, expired metadata, a version
        lower than one already trusted (replay / freeze), a hash or length mismatch. One
        refresh per process (ngclient's rule): later calls return the same verified listing.
        """
        if self._releases is not None:
            return self._releases
        try:
            self._updater.refresh()
        except Exception as exc:  # tuf raises several unrelated families; all mean "do not use"
            raise TrustError(f"repository metadata rejected: {type(exc).__name__}: {exc}") from exc
        # ngclient persisted targets.json only after verifying it in this refresh; the listing
        # gives names, and every fact used comes from get_targetinfo on the trusted set.
        listing: Metadata[Targets] = Metadata.from_file(str(self._dir / "targets.json"))
        releases: list[ReleaseInfo] = []
        for name in sorted(listing.signed.targets):
            if not name.startswith(RELEASE_PREFIX):
                continue
            info = self.targetinfo(name)
            release = ReleaseInfo.from_custom(name, info.custom)
            if release is not None:
                releases.append(release)
        self._releases = releases
        return releases

    def targetinfo(self, name: str) -> TargetFile:
        info = self._updater.get_targetinfo(name)
        if info is None:
            raise TrustError(f"{name}: not listed in the signed targets metadata")
        return info

    def url(self, name: str) -> str:
        return self.targets_url + name
