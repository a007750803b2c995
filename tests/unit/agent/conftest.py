from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from packager.agent.agent import init_device
from packager.ota.repo import Repository
from tests.process_guard import pids_with_env, stop
from tests.unit.agent.helpers import Device, free_port, kill_containers, make_engine


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state = tmp_path / "engine"
    monkeypatch.setenv("FAKE_ENGINE_STATE", str(state))
    exe = make_engine(state)
    yield exe
    kill_containers(state)
    # Every runtime this engine started, recorded or not (a test may wipe the records, as a
    # reboot does): each carries FAKE_ENGINE_STATE in its environment.
    survivors = stop(pids_with_env("FAKE_ENGINE_STATE", str(state)), grace_s=2.0)
    assert not survivors, f"fake engine runtimes survived SIGKILL: {survivors}"


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo")


@pytest.fixture
def bundle_confinement() -> bytes | None:
    """The confinement.json the bundles of ``device`` carry (a module overrides it)."""
    return None


@pytest.fixture
def device(
    tmp_path: Path, repo: Repository, engine: Path, bundle_confinement: bytes | None
) -> Device:
    """A device initialised to trust ``repo``, nothing installed yet."""
    root = tmp_path / "device"
    init_device(root, repo.trusted_root)
    return Device(tmp_path, repo, engine, root, free_port(), bundle_confinement)


@pytest.fixture
def installed(device: Device) -> Device:
    """``device`` with release 1 (version 1.0.0) installed from the repository directory."""
    device.install_v1()
    return device
