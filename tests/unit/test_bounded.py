"""packager.bounded.read_bounded: the one reader of untrusted files, on real files, FIFOs and
symlinks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from packager.bounded import read_bounded
from packager.errors import ExitCode, InputError, TargetError, VerifyError


def test_reads_a_file_up_to_and_including_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "doc.json"
    path.write_bytes(b"x" * 10)
    assert read_bounded(path, 10) == b"x" * 10
    assert read_bounded(tmp_path / "doc.json", 10, follow_symlinks=False) == b"x" * 10


def test_one_byte_over_the_limit_is_refused_with_what_it_is_not(tmp_path: Path) -> None:
    path = tmp_path / "board.toml"
    path.write_bytes(b"x" * 11)
    with pytest.raises(TargetError) as raised:
        read_bounded(path, 10, error=TargetError, shown="board.toml", what="not a target file")
    assert raised.value.message == "board.toml: larger than 10 bytes: not a target file"
    assert raised.value.exit_code == ExitCode.TARGET


def test_a_file_that_grows_after_a_size_check_still_cannot_pass(tmp_path: Path) -> None:
    """At most limit + 1 bytes are read, whatever the file holds by then."""
    path = tmp_path / "big"
    with path.open("wb") as handle:
        handle.truncate(1 << 30)  # sparse: 1 GiB that takes no disk
    with pytest.raises(InputError, match=r"big: larger than 4096 bytes$"):
        read_bounded(path, 4096)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "device.jsonl"
    os.mkfifo(fifo)
    done = threading.Event()
    problems: list[str] = []

    def read() -> None:
        try:
            read_bounded(fifo, 100)
        except InputError as exc:
            problems.append(exc.message)
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(30):
        # Unblock the reader (a writer opening the FIFO) so the test process can end.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_bounded waited on a FIFO")
    assert problems == [f"{fifo}: not a regular file"]


def test_a_directory_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match="not a regular file"):
        read_bounded(tmp_path, 100, error=VerifyError)


def test_a_symlink_is_refused_only_where_the_caller_says(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"{}")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert read_bounded(tmp_path / "link", 100) == b"{}"
    with pytest.raises(InputError) as raised:
        read_bounded(tmp_path / "link", 100, follow_symlinks=False)
    assert raised.value.message == f"{tmp_path / 'link'}: is a symbolic link"


def test_a_missing_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothing: cannot be read: No such file or directory$"):
        read_bounded(tmp_path / "nothing", 100)


@pytest.mark.parametrize("kind", ["fifo", "character device"])
def test_a_special_file_is_refused_before_it_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Opening a device node runs its driver (a watchdog, a tape) and opening a FIFO releases a
    writer blocked on it, so a special file is refused on its stat, unopened (os.open observed).
    Before: read_bounded opened it (O_NONBLOCK) and only then checked fstat."""
    if kind == "fifo":
        special = tmp_path / "device.jsonl"
        os.mkfifo(special)
    else:
        special = Path("/dev/null")
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: str | os.PathLike[str], flags: int, *args: int, **kw: int) -> int:
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", recording_open)
    for follow in (True, False):
        with pytest.raises(InputError) as raised:
            read_bounded(special, 100, follow_symlinks=follow)
        assert raised.value.message == f"{special}: not a regular file"
    assert opened == []
