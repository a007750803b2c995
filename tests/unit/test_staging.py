"""packager.staging: a dead owner's staging directories go; nothing else beside --out does; a
directory or file is replaced whole or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from packager.staging import (
    make_staging_dir,
    replace_dir,
    staged_dir,
    staged_file,
    stale_staging_dirs,
    write_bytes,
)


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


def test_an_old_output_a_killed_replace_had_moved_aside_goes_with_its_dead_owner(
    tmp_path: Path,
) -> None:
    """replace_dir moves the old ``out`` to ``.{OUT}.old-{PID}`` before removing it; a process
    killed during that removal left it there, and nothing but the next run for ``out`` clears it
    (a whole old bundle or image tree: gigabytes)."""
    out = tmp_path / "bundle"
    dead = _dead_pid()
    aside = tmp_path / f".bundle.old-{dead}"
    aside.mkdir()
    (aside / "image.tar").write_bytes(b"x" * 4096)
    kept = [
        tmp_path / f".bundle.old-{os.getpid()}",  # a live process's, mid-replace
        tmp_path / f".other.old-{dead}",  # another output's
        tmp_path / f".bundle.old-{dead}x",  # not the name replace_dir gives
    ]
    for folder in kept:
        folder.mkdir()
    link = tmp_path / f".bundle.old-{_dead_pid()}"
    link.symlink_to(kept[1])
    assert stale_staging_dirs(out) == [aside]
    make_staging_dir(out)
    assert not aside.exists()
    assert all(folder.is_dir() for folder in kept) and link.is_symlink()


def test_replace_dir_swaps_a_whole_directory_and_leaves_nothing_beside(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old-only").write_text("old")
    staging = make_staging_dir(out)
    (staging / "new").write_text("new")
    replace_dir(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    # A file or a symlink where the directory goes is replaced too; the link's target stays.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    for existing in ("file", "link"):
        target = tmp_path / existing
        if existing == "file":
            target.write_text("x")
        else:
            target.symlink_to(victim)
        staging = make_staging_dir(target)
        replace_dir(staging, target)
        assert target.is_dir() and not target.is_symlink()
    assert (victim / "keep").read_text() == "keep"


def test_staged_dir_removes_its_staging_on_failure_and_keeps_the_old(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    with staged_dir(out, mode=0o700) as staging:
        (staging / "a").write_text("1")
    assert (out / "a").read_text() == "1" and out.stat().st_mode & 0o777 == 0o700
    with pytest.raises(RuntimeError), staged_dir(out) as staging:
        (staging / "b").write_text("2")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_staged_file_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "meta.json"
    write_bytes(path, b"one", mode=0o600)
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError), staged_file(path) as tmp:
        tmp.write_bytes(b"tw")
        raise ValueError("interrupted")
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in path.parent.iterdir()) == ["meta.json"]
    write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o644
