from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from packager.ota.repo import Repository
from tests.unit.agent.helpers import kill_containers, make_engine


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "engine"
    monkeypatch.setenv("FAKE_ENGINE_STATE", str(state))
    exe = make_engine(state)
    yield exe
    kill_containers(state)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")
