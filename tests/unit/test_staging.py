"""packager.staging: a dead owner's staging directories go; nothing else beside --out does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from packager.staging import make_staging_dir, stale_staging_dirs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_new_staging_dir_names_its_owner_and_reaps_only_dead_owners(tmp_path: Path) -> None:
    out = tmp_path / "o_KILL_1.5"
    dead = _dead_pid()
    stale = tmp_path / f".o_KILL_1.5.{dead}.fmryc86p"
    stale.mkdir()
    (stale / "big").write_bytes(b"x" * 4096)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    link = tmp_path / f".o_KILL_1.5.{dead}.symlink_"  # the pattern's name, but a symlink
    link.symlink_to(victim)
    kept = [
        tmp_path / f".o_KILL_1.5.{os.getpid()}.alive123",  # a live build's
        tmp_path / f".o_KILL_1.{dead}.otherout",  # another output's
        tmp_path / ".o_KILL_1.5.old",  # not a staging name
    ]
    for folder in kept:
        folder.mkdir()
    assert stale_staging_dirs(out) == [stale]

    made = make_staging_dir(out)
    assert made.name.startswith(f".o_KILL_1.5.{os.getpid()}.") and made.is_dir()
    assert not stale.exists()
    assert link.is_symlink() and (victim / "keep").read_text() == "keep"
    assert all(folder.is_dir() for folder in kept)
    # Ours is alive: the next call keeps it.
    assert stale_staging_dirs(out) == []
