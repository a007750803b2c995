"""The runtime container's confinement: one list of engine flags for every way it is started.

The build computes it once from the target (:func:`from_target`) and puts it in three places:
``confinement.json`` in the bundle (read by this agent for the releases it starts), the
supervisor ``supervise.py`` that the systemd unit runs, and install.sh's ``--no-systemd`` path.
So a container started by the unit, by install.sh or by the OTA agent gets the same flags:
read-only root, a small tmpfs /tmp, no capabilities, no new privileges, the target's memory
(and CPU) limit, a pids limit; detached starts (agent, install.sh) add the restart policy, which
under systemd is the unit's own ``Restart=always``. Standard library only (runs on devices).

Every flag is one ``--name=value`` token from a whole-string allow-list (:data:`FLAGS`): a
document, even in a validly signed release, cannot add ``--privileged``, a volume, a device or
a capability, and cannot drop the floor (:data:`REQUIRED`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILE = "confinement.json"
SCHEMA = "edgepack.confinement/v1"
# Docker's and podman's names; "unless-stopped": an engine restart (reboot) or a crash brings the
# runtime back, an explicit stop (the agent replacing a version) does not.
RESTART_POLICY = "unless-stopped"
# Enough for the runtime's threads (onnxruntime's pool, the HTTP server); a fork bomb stops here.
PIDS_LIMIT = 256
TMPFS = "/tmp:rw,size=64m,mode=1777"
REQUIRED: tuple[str, ...] = (
    "--read-only",
    f"--tmpfs={TMPFS}",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)
FLAGS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        r"--read-only",
        r"--tmpfs=/tmp:rw,size=[1-9][0-9]{0,5}m,mode=1777",
        r"--cap-drop=ALL",
        r"--security-opt=no-new-privileges",
        r"--memory=[1-9][0-9]{0,6}m",
        r"--memory-swap=[1-9][0-9]{0,6}m",
        r"--cpus=[0-9]{1,3}\.[0-9]{2}",
        r"--pids-limit=[1-9][0-9]{0,5}",
    )
)
RESTART = re.compile(r"no|always|unless-stopped|on-failure(:[1-9][0-9]{0,2})?")


class ConfinementError(ValueError):
    """A confinement document or flag outside the allow-list; the message names it."""


def from_target(
    memory_max_mb: int | None, cpu_quota_percent: int | None, *, pids_limit: int = PIDS_LIMIT
) -> tuple[str, ...]:
    """The run flags for a target's ``[service]`` limits (MiB, percent of one CPU)."""
    args = list(REQUIRED)
    if memory_max_mb:
        # Swap equal to memory: the limit is on RAM+swap, so the runtime cannot swap past it.
        args += [f"--memory={memory_max_mb}m", f"--memory-swap={memory_max_mb}m"]
    if cpu_quota_percent:
        args.append(f"--cpus={cpu_quota_percent / 100:.2f}")
    args.append(f"--pids-limit={pids_limit}")
    return check_args(args)


def check_args(args: Sequence[object]) -> tuple[str, ...]:
    """``args`` when every one is an allowed flag and the floor (:data:`REQUIRED`) is there."""
    checked: list[str] = []
    for arg in args:
        if not isinstance(arg, str) or not any(f.fullmatch(arg) for f in FLAGS):
            raise ConfinementError(f"run flag {arg!r} is not an allowed confinement flag")
        checked.append(arg)
    missing = [flag for flag in REQUIRED if flag not in checked]
    if missing:
        raise ConfinementError(f"run flags lack {', '.join(missing)}")
    return tuple(checked)


def document(args: Sequence[str], restart: str = RESTART_POLICY) -> dict[str, Any]:
    return {"schema": SCHEMA, "run_args": list(check_args(args)), "restart": _restart(restart)}


def to_bytes(args: Sequence[str], restart: str = RESTART_POLICY) -> bytes:
    """``confinement.json`` as the build writes it (byte-identical for the same flags)."""
    return (json.dumps(document(args, restart), indent=2, sort_keys=True) + "\n").encode()


def _restart(value: object) -> str:
    if not isinstance(value, str) or not RESTART.fullmatch(value):
        raise ConfinementError(
            f"restart policy {value!r} is not one of no, always, unless-stopped, on-failure[:N]"
        )
    return value


def detached_args(release_dir: Path) -> tuple[str, ...]:
    """The flags for a detached start of the release staged in ``release_dir``: its
    ``confinement.json`` (checked), or the floor when the bundle predates the file."""
    path = release_dir / FILE
    if not path.exists():
        return (*from_target(None, None), f"--restart={RESTART_POLICY}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfinementError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ConfinementError(f"{path}: schema: expected {SCHEMA!r}")
    try:
        args = check_args(doc.get("run_args") or [])
        return (*args, f"--restart={_restart(doc.get('restart'))}")
    except ConfinementError as exc:
        raise ConfinementError(f"{path}: {exc}") from exc
