"""The session guard of tests/conftest.py (issue 17): a pytest session, run here in a subprocess
with the real guard, fails and names a process or container that one of its tests leaked."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import process_guard

REPO_ROOT = Path(__file__).resolve().parents[2]

SLEEPER = "import time; time.sleep(600)"
# A daemon: forks, the parent exits, the child leaves the session and is re-parented to init.
DAEMON = (
    "import os, sys, time\n"
    "if os.fork():\n    os._exit(0)\n"
    "os.setsid()\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(600)\n"
)
PREAMBLE = f"""
import os, subprocess, sys, time
from pathlib import Path
PID_FILE = Path(os.environ["GUARD_PID_FILE"])
SLEEPER = {SLEEPER!r}
DAEMON = {DAEMON!r}

def wait_for_pid_file():
    for _ in range(200):
        if PID_FILE.exists():
            return
        time.sleep(0.05)
    raise AssertionError("the daemon never wrote its pid")
"""

TESTS = {
    "child": """
def test_leaks_a_child():
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER])
    PID_FILE.write_text(str(proc.pid))
""",
    "daemon": """
def test_leaks_a_daemon():
    subprocess.run([sys.executable, "-c", DAEMON, str(PID_FILE)], check=True)
    wait_for_pid_file()
""",
    "daemon-with-fresh-env-in-tmp": """
def test_leaks_a_daemon_without_the_token(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", DAEMON, str(PID_FILE)], env=env, cwd=tmp_path,
                   check=True)
    wait_for_pid_file()
""",
}

CLEAN = """
def test_stops_what_it_starts():
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER])
    PID_FILE.write_text(str(proc.pid))
    proc.terminate()
    proc.wait(30)
"""


def _session(
    tmp_path: Path, body: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run ``body`` as the only test of a pytest session that uses the suite's guard."""
    session = tmp_path / "session"
    session.mkdir()
    (session / "pytest.ini").write_text("[pytest]\n")
    (session / "conftest.py").write_text(
        "from tests.conftest import no_process_outlives_the_session  # noqa: F401\n"
    )
    (session / "test_inner.py").write_text(PREAMBLE + body)
    pid_file = tmp_path / "leaked.pid"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(session / "pytest.ini"), "--rootdir", str(session),
         "--basetemp", str(tmp_path / "basetemp"), str(session / "test_inner.py")],
        cwd=session, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "GUARD_PID_FILE": str(pid_file), **env},
    )  # fmt: skip
    return proc, pid_file


@pytest.fixture
def leaked() -> Iterator[list[int]]:
    """Pids a deliberately leaking inner session started: killed here whatever the guard did."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if process_guard.alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("kind", sorted(TESTS))
def test_a_leaked_process_fails_the_session_and_is_named(
    tmp_path: Path, leaked: list[int], kind: str
) -> None:
    proc, pid_file = _session(tmp_path, TESTS[kind])
    pid = int(pid_file.read_text())
    leaked.append(pid)
    output = proc.stdout + proc.stderr
    # The test itself passed; the session's end failed it, and pytest exits non-zero.
    summary = output.strip().splitlines()[-1]
    assert "1 passed" in summary and "1 error" in summary, output
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert "the test session left behind" in output
    assert f"process left running: pid {pid} " in output, output
    assert not process_guard.alive(pid), "the guard names the process, then stops it"


def test_a_session_that_stops_its_processes_passes(tmp_path: Path, leaked: list[int]) -> None:
    proc, pid_file = _session(tmp_path, CLEAN)
    leaked.append(int(pid_file.read_text()))
    assert proc.returncode == pytest.ExitCode.OK, proc.stdout + proc.stderr
    assert "left behind" not in proc.stdout + proc.stderr


@pytest.fixture
def container_name() -> Iterator[str]:
    """A fresh suite-style container name; whatever holds it is removed afterwards."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    name = f"{process_guard.CONTAINER_PREFIX}guard-test-{secrets.token_hex(4)}"
    yield name
    subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, check=False)


@pytest.fixture
def empty_image(tmp_path: Path) -> Iterator[str]:
    """A real podman image with nothing in it: enough to create (not run) a container offline."""
    archive = tmp_path / "empty.tar"
    with tarfile.open(archive, "w"):
        pass
    ref = f"localhost/edgepack-guard-test:{secrets.token_hex(4)}"
    subprocess.run(["podman", "import", "-q", str(archive), ref], check=True, capture_output=True)
    yield ref
    subprocess.run(["podman", "rmi", "-f", ref], capture_output=True, check=False)


def test_a_declared_container_left_behind_fails_the_session_and_is_removed(
    tmp_path: Path, container_name: str, empty_image: str
) -> None:
    body = f"""
from tests.process_guard import suite_container

def test_leaks_a_container():
    subprocess.run(["podman", "create", "--name", suite_container({container_name!r}),
                    {empty_image!r}, "/none"], check=True, capture_output=True)
"""
    proc, _ = _session(tmp_path, body)
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert f"container left behind: {container_name}" in output, output
    assert container_name not in process_guard.containers().values()


def test_a_running_container_started_in_the_session_tmp_fails_it(
    tmp_path: Path, container_name: str
) -> None:
    """Not declared: found by its conmon, which runs in the directory `podman run` ran in (the
    host's root, overlaid, as the container's root: a runnable container without any image)."""
    from packager.tools.containers import find_engine

    argv = ["podman", "run", "-d", "--name", container_name,
            *find_engine("podman").run_flags, "--rootfs", "/:O", "/bin/sleep", "600"]  # fmt: skip
    body = f"""
def test_leaks_a_running_container(tmp_path):
    subprocess.run({argv!r}, cwd=tmp_path, check=True, capture_output=True)
"""
    proc, _ = _session(tmp_path, body)
    output = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert f"container left behind: {container_name}" in output, output
    assert "process left running" in output and "conmon" in output, output  # its conmon too
    assert container_name not in process_guard.containers().values()


def test_another_sessions_container_is_neither_blamed_nor_removed(
    tmp_path: Path, container_name: str, empty_image: str
) -> None:
    """Created during the session, but neither declared nor run from its directories: another
    session's (helpers and developers share hosts), so not this session's to fail or remove."""
    body = f"""
def test_someone_else_creates_a_container():
    subprocess.run(["podman", "create", "--name", {container_name!r}, {empty_image!r}, "/none"],
                   cwd="/", check=True, capture_output=True)
"""
    proc, _ = _session(tmp_path, body)
    assert proc.returncode == pytest.ExitCode.OK, proc.stdout + proc.stderr
    assert container_name in process_guard.containers().values()
