"""packager.resources.data_root: EDGEPACK_DATA_DIR is used as given or refused in one line; the
checkout's own data folders are found without it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import packager
from packager.cli import main
from packager.errors import ExitCode, UsageError
from packager.resources import data_root, targets_dir, templates_dir

CHECKOUT = Path(packager.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_lookup(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """data_root is computed once per process: clear it around each test, so no test sees
    another's answer and the rest of the session gets the real one back."""
    monkeypatch.delenv("EDGEPACK_DATA_DIR", raising=False)
    data_root.cache_clear()
    yield
    data_root.cache_clear()


def test_without_the_variable_the_checkout_is_found() -> None:
    assert data_root() == CHECKOUT
    assert (targets_dir() / "rpi4.toml").is_file()
    assert (templates_dir() / "linux" / "install.sh.jinja").is_file()


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEPACK_DATA_DIR", "")
    assert data_root() == CHECKOUT


def test_a_data_dir_holding_both_folders_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "targets").mkdir()
    (tmp_path / "templates").mkdir()
    monkeypatch.setenv("EDGEPACK_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path


@pytest.mark.parametrize(
    ("folders", "lacks"),
    [((), "no targets/ and templates/ folder"), (("targets",), "no templates/ folder"),
     (("templates",), "no targets/ folder")],
)
def test_a_data_dir_lacking_a_folder_is_one_usage_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folders: tuple[str, ...], lacks: str
) -> None:
    """It used to fall back to the checkout silently (or, outside one, fail later, obscurely)."""
    for name in folders:
        (tmp_path / name).mkdir()
    monkeypatch.setenv("EDGEPACK_DATA_DIR", str(tmp_path))
    with pytest.raises(UsageError) as refused:
        data_root()
    assert refused.value.one_line().startswith(f"EDGEPACK_DATA_DIR={tmp_path}: {lacks} there")


def test_the_cli_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEPACK_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit) as exited:
        main(["targets", "show", "rpi4", "--json"])
    assert exited.value.code == ExitCode.USAGE
    document = json.loads(capsys.readouterr().out)
    assert document["error"] == "usage"
    assert document["message"].startswith("EDGEPACK_DATA_DIR=")
