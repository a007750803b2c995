"""Shared fixtures: where the repository and the external test data live."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import process_guard
from tests.process_guard import Processes

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


@pytest.fixture
def processes() -> Iterator[Processes]:
    """Owns the processes a test starts (``processes.own(Popen(...))``) and stops them after it."""
    owner = Processes()
    yield owner
    owner.stop_all()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def testdata() -> Path:
    """``../shared/testdata`` (README there): real models nobody on this project wrote."""
    if not TESTDATA.is_dir():
        pytest.skip(f"test data not found at {TESTDATA}")
    return TESTDATA


@pytest.fixture(scope="session")
def onnx_dir(testdata: Path) -> Path:
    return testdata / "onnx"


@pytest.fixture(scope="session", autouse=True)
def testdata_is_left_untouched() -> Iterator[None]:
    """No test may change the external test data (an optimizer once rewrote its input in place)."""
    import hashlib

    def digests() -> dict[Path, str]:
        if not TESTDATA.is_dir():
            return {}
        return {p: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(TESTDATA.rglob("*")) if p.is_file()}

    before = digests()
    yield
    changed = [str(p) for p, d in digests().items() if before.get(p) != d]
    assert not changed, f"tests modified the shared test data: {changed}"


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Nothing a test started may outlive the session (issue 17: a stand-in engine's server kept
    serving on loopback after the suite ended). At the end, every live process started under this
    session and every ``edgepack-*`` podman container it created (tests/process_guard.py says how
    both are found) is named in a failure, then stopped/removed so that the next run starts clean.
    """
    token = process_guard.new_token()
    previous = os.environ.get(process_guard.TOKEN_ENV)
    os.environ[process_guard.TOKEN_ENV] = token
    basetemp = tmp_path_factory.getbasetemp()
    before = set(process_guard.containers())
    yield
    if previous is None:
        os.environ.pop(process_guard.TOKEN_ENV, None)
    else:
        os.environ[process_guard.TOKEN_ENV] = previous
    # A finalizer's SIGKILL is delivered but the process may not be reaped yet: give it a bounded
    # moment to go before calling it left behind.
    for _ in range(50):
        left = process_guard.leftovers(token, os.getpid(), [basetemp])
        if not left:
            break
        time.sleep(0.1)
    containers = process_guard.session_containers(before, [basetemp])
    problems = [f"process left running: {p.line()}" for p in left]
    problems += [f"container left behind: {name}" for name in sorted(containers.values())]
    stuck = process_guard.stop(p.pid for p in left)
    process_guard.remove_containers(containers)
    problems += [f"pid {pid} survived SIGKILL" for pid in stuck]
    if problems:
        pytest.fail("the test session left behind:\n" + "\n".join(problems), pytrace=False)
