"""A private Docker engine for the tests (issue 13): Debian trixie's dockerd, containerd, buildx
and tini as unpacked by ``.ci/docker-tools.sh`` (``make setup``) into ``.ci/docker-tools``.

The daemon is the test session's own, never the machine's: a temporary data root, exec root,
socket and pid file; the containerd image store (``docker load`` keeps an OCI image's manifest
digest as its image ID); ``--iptables=false --ip-masq=false --bridge=none`` so that the host's
firewall and its ``docker0`` are never touched: containers that publish ports join one bridge
network of this daemon (:attr:`Dockerd.network`), whose interface goes with it. It is started and
stopped by pid, and what it leaves (mounts under its root, processes naming its root, its bridge,
the empty ``/run/docker/plugins`` and ``/run/containerd/s`` it creates) is removed.

Every container step has a hard timeout, and every container is named ``edgepack-test-...`` and
removed by name (:meth:`Dockerd.container`): an emulated guest that crashes with qemu as PID 1
never exits by itself.

Measured here (2 cores): dockerd answers ``/_ping`` about 1.2 s after it starts; stopping it,
containers removed, takes about 3 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from packager.errors import ToolFailedError
from packager.tools.base import Tool
from tests.ports import free_port_in

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".ci" / "docker-tools"
CONTAINER_PREFIX = "edgepack-test-"
# Created by dockerd/containerd at fixed places whatever their roots are (plugin sockets, shim
# sockets); removed again when empty and not there before.
FIXED_DIRS = (
    Path("/run/docker/plugins"),
    Path("/run/docker"),
    Path("/run/containerd/s"),
    Path("/run/containerd"),
)
_NAME = re.compile(re.escape(CONTAINER_PREFIX) + r"[a-z0-9][a-z0-9_.-]{0,100}")
_READY_TIMEOUT_S = 60.0
_STOP_GRACE_S = 20.0


# The private daemon's CLI, run through edgepack's one process wrapper.
DOCKER = Tool("docker", str(TOOLS / "bin" / "docker"), "make setup (.ci/docker-tools.sh)")


def _text(data: bytes) -> str:
    """Output as ``subprocess.run(text=True)`` gives it: decoded, universal newlines."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


class DockerError(AssertionError):
    """A docker command failed or ran past its timeout (the test fails with its output)."""


@dataclass
class Dockerd:
    """A running private dockerd: its pid, its folders, and a ``docker`` CLI bound to it."""

    process: subprocess.Popen[bytes] = field(repr=False)
    root: Path
    network: str
    bridge: str
    cgroup: str  # the --cgroup-parent of its containers
    fixed_dirs_before: frozenset[Path] = field(repr=False)
    ready_s: float
    env: dict[str, str] = field(repr=False)
    log: Path = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def socket(self) -> Path:
        return self.root / "docker.sock"

    def docker(
        self,
        *args: str | Path,
        timeout: float,
        check: bool = True,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` against this daemon (in ``cwd``, with ``env`` added to the daemon's
        client environment, which replaces this process's), killed after ``timeout`` seconds;
        its output decoded as text."""
        words = [str(a) for a in args]
        try:
            ran = DOCKER.run(words, cwd=cwd, env={**self.env, **(env or {})}, inherit_env=False,
                             timeout=timeout, check=False)
        except ToolFailedError as exc:  # Tool.run's timeout
            raise DockerError(f"docker {' '.join(words)}: no answer within {timeout:.0f}s") from exc
        proc = subprocess.CompletedProcess(ran.args, ran.returncode, _text(ran.stdout),
                                           _text(ran.stderr))
        if check and proc.returncode != 0:
            raise DockerError(
                f"docker {' '.join(words)} failed ({proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}\n--- dockerd log tail ---\n{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def image(self, ref: str) -> dict[str, Any]:
        """``docker image inspect REF`` as a dict (Id, Architecture, Variant, RepoTags, ...)."""
        found: list[dict[str, Any]] = json.loads(
            self.docker("image", "inspect", ref, timeout=60).stdout
        )
        return found[0]

    def remove(self, name: str) -> None:
        """``docker rm -f NAME``: SIGKILL, whatever runs as the container's PID 1."""
        self.docker("rm", "-f", name, timeout=60, check=False)

    @contextmanager
    def container(
        self, name: str, image: str, *, run_args: Sequence[str] = (), timeout: float = 120
    ) -> Iterator[str]:
        """``docker run -d --name NAME RUN_ARGS IMAGE`` (``--network`` this daemon's bridge),
        yielding NAME; removed by name afterwards, even when the run itself timed out."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"container names start with {CONTAINER_PREFIX!r}: {name!r}")
        self.remove(name)
        try:
            self.docker(
                "run",
                "-d",
                "--name",
                name,
                "--network",
                self.network,
                *run_args,
                image,
                timeout=timeout,
            )
            yield name
        finally:
            self.remove(name)

    def running(self, name: str) -> bool:
        proc = self.docker(
            "inspect", "--format", "{{.State.Running}}", name, timeout=30, check=False
        )
        return proc.returncode == 0 and proc.stdout.strip() == "true"

    def logs(self, name: str, tail: int = 20) -> str:
        proc = self.docker("logs", "--tail", str(tail), name, timeout=30, check=False)
        return proc.stdout + proc.stderr


def tools_missing() -> str | None:
    """Why the unpacked engine cannot be used here, or None."""
    for tool in (
        "docker",
        "dockerd",
        "containerd",
        "containerd-shim-runc-v2",
        "docker-init",
        "docker-registry",
    ):
        if not os.access(TOOLS / "bin" / tool, os.X_OK):
            return f"{TOOLS / 'bin' / tool} is missing: run `make setup` (.ci/docker-tools.sh)"
    if shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        return "runc is missing: run `make setup` (apt-get install runc)"
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    return None


def _ping(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(2)
            client.connect(str(sock))
            client.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = client.recv(4096)
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.") and answer.rstrip().endswith(b"OK")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _processes_naming(root: Path) -> list[int]:
    """Live pids whose command line or cwd is inside ``root`` (containerd, its shims)."""
    found = []
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            line = (entry / "cmdline").read_bytes()
            where = os.readlink(entry / "cwd")
        except OSError:
            continue
        if needle in line or where == str(root) or where.startswith(f"{root}/"):
            found.append(int(entry.name))
    return [pid for pid in found if _alive(pid)]


def _in_cgroup(name: str) -> list[int]:
    """Live pids in a cgroup at or below /NAME in any hierarchy (/proc/PID/cgroup)."""
    found = []
    pattern = re.compile(rf"^[^:]*:[^:]*:/{re.escape(name)}(/|$)", re.M)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "cgroup").read_text()
        except OSError:
            continue
        if pattern.search(text):
            found.append(int(entry.name))
    return [pid for pid in found if _alive(pid)]


def _remove_cgroups(name: str) -> list[str]:
    """rmdir /sys/fs/cgroup/[HIERARCHY/]NAME and what is below it, deepest first; returns the
    directories that could not be removed (a process still in them)."""
    tops = [Path("/sys/fs/cgroup") / name, *Path("/sys/fs/cgroup").glob(f"*/{name}")]
    left = []
    for top in tops:
        if not top.is_dir() or top.is_symlink():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                path.rmdir()
            except OSError:
                left.append(str(path))
        try:
            top.rmdir()
        except OSError:
            left.append(str(top))
    return left


def shim_sockets(daemon: Dockerd) -> list[Path]:
    """The containerd shim sockets of this daemon's containers: containerd 1.7 puts them at
    /run/containerd/s/sha256(ADDRESS/NAMESPACE/ID) whatever its roots are (runtime/v2/shim/
    util_unix.go, SocketAddress); a shim that is killed leaves its socket there."""
    address = daemon.root / "exec" / "containerd" / "containerd.sock"
    found = []
    for container in sorted((daemon.root / "data" / "containers").glob("*")):
        key = hashlib.sha256(f"{address}/moby/{container.name}".encode()).hexdigest()
        found.append(Path("/run/containerd/s") / key)
    return found


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (/proc/self/mountinfo, octal-escaped)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def start_dockerd(root: Path) -> Dockerd:
    """Start dockerd with everything under ``root`` (a short path: unix sockets go there) and
    wait for its API; fails the test with the log tail when it does not answer."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "daemon.json").write_text(json.dumps({"features": {"containerd-snapshotter": True}}))
    config = root / "config"  # the CLI's: buildx is found as a plugin there
    config.mkdir()
    (config / "cli-plugins").symlink_to(TOOLS / "cli-plugins")
    path = f"{TOOLS / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"  # runc is the host's
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
    env.update(PATH=path, DOCKER_HOST=f"unix://{root / 'docker.sock'}", DOCKER_CONFIG=str(config))
    log = root / "dockerd.log"
    existed = frozenset(d for d in FIXED_DIRS if d.exists())
    tag = secrets.token_hex(3)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(TOOLS / "bin" / "dockerd"),
                "--config-file",
                str(root / "daemon.json"),
                "--data-root",
                str(root / "data"),
                "--exec-root",
                str(root / "exec"),
                "--pidfile",
                str(root / "dockerd.pid"),
                "--host",
                f"unix://{root / 'docker.sock'}",
                "--iptables=false",
                "--ip-masq=false",
                "--ip6tables=false",
                "--bridge=none",
                # Its containers' cgroups under one name of its own: found and killed by it.
                f"--cgroup-parent=/{CONTAINER_PREFIX}{tag}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C to pytest must not kill it before the teardown
        )
    daemon = Dockerd(
        process=proc,
        root=root,
        network=f"{CONTAINER_PREFIX}net-{tag}",
        bridge=f"ep-test-{tag}",
        cgroup=f"{CONTAINER_PREFIX}{tag}",
        fixed_dirs_before=existed,
        ready_s=0.0,
        env=env,
        log=log,
    )
    deadline = started + _READY_TIMEOUT_S
    while not _ping(daemon.socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_dockerd(daemon)
            pytest.fail(
                f"dockerd did not answer within {_READY_TIMEOUT_S:.0f}s:\n{daemon.log_tail()}",
                pytrace=False,
            )
        time.sleep(0.05)
    daemon.ready_s = time.monotonic() - started
    daemon.docker(
        "network",
        "create",
        "--driver",
        "bridge",
        "--opt",
        f"com.docker.network.bridge.name={daemon.bridge}",
        daemon.network,
        timeout=60,
    )
    return daemon


def _kill_all(pids: list[int], problem: str) -> list[str]:
    """SIGKILL each of ``pids`` (one already gone is fine): ``problem`` said of each."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [problem.format(pid) for pid in pids]


def stop_dockerd(daemon: Dockerd) -> list[str]:
    """Remove every container and the bridge network, stop dockerd (SIGTERM, SIGKILL after
    20 s), then kill what still names its root, unmount what is mounted under it and delete it.
    Returns what had to be cleaned up by force or could not be (empty: a clean stop)."""
    problems: list[str] = []
    if _alive(daemon.pid):
        try:
            ids = daemon.docker("ps", "-aq", timeout=30).stdout.split()
            if ids:
                daemon.docker("rm", "-f", *ids, timeout=120, check=False)
            daemon.docker("network", "rm", daemon.network, timeout=60, check=False)
        except DockerError as exc:
            problems.append(f"containers not removed: {exc}")
        os.kill(daemon.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        while _alive(daemon.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(daemon.pid):
            problems.append(f"dockerd {daemon.pid} ignored SIGTERM for {_STOP_GRACE_S:.0f}s")
            os.kill(daemon.pid, signal.SIGKILL)
    daemon.process.wait(timeout=30)  # reaped: SIGKILL cannot be ignored
    problems += _kill_all(_processes_naming(daemon.root), "pid {} outlived dockerd: killed")
    problems += _kill_all(
        _in_cgroup(daemon.cgroup), "pid {} of a container outlived dockerd: killed"
    )
    deadline = time.monotonic() + 10
    while (_in_cgroup(daemon.cgroup) or _processes_naming(daemon.root)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    problems += [f"cgroup {path} could not be removed" for path in _remove_cgroups(daemon.cgroup)]
    for sock in shim_sockets(daemon):
        if sock.is_socket():
            problems.append(f"shim socket {sock} was left: deleted")
            sock.unlink()
    # libnetwork bind-mounts the host's network namespace at EXEC_ROOT/netns/default for the
    # first `--network host` container or build step and never unmounts it, even on a clean
    # stop: expected, not a leftover (issue 13: Dockerfile.builder builds and runs online).
    default_netns = daemon.root / "exec" / "netns" / "default"
    if str(default_netns) in mounts_under(daemon.root):
        subprocess.run(["umount", str(default_netns)], capture_output=True, timeout=30, check=False)
    for point in mounts_under(daemon.root):
        problems.append(f"{point} was still mounted: unmounted")
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30, check=False)
    if Path(f"/sys/class/net/{daemon.bridge}").exists():
        problems.append(f"bridge {daemon.bridge} was left: deleted")
        subprocess.run(
            ["ip", "link", "delete", daemon.bridge], capture_output=True, timeout=30, check=False
        )
    for leftover in FIXED_DIRS:
        if leftover not in daemon.fixed_dirs_before:
            try:
                leftover.rmdir()  # only when empty: another daemon may be using it
            except OSError:
                pass
    left = mounts_under(daemon.root)
    if left:
        problems.append(f"could not unmount {left}")
    else:
        # rm(1): ten times faster than shutil.rmtree on two unpacked images (1.5 s vs 14 s here).
        subprocess.run(
            ["rm", "-rf", "--one-file-system", str(daemon.root)], timeout=300, check=False
        )
    return problems


@contextmanager
def private_dockerd(base: Path) -> Iterator[Dockerd]:
    """A private dockerd under a new folder in ``base``; stopped and cleaned up on exit. The
    exit fails (AssertionError) when anything had to be removed by force: a clean stop leaves no
    process, mount or interface behind."""
    missing = tools_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    daemon = start_dockerd(Path(os.path.realpath(base)) / f"dockerd-{secrets.token_hex(3)}")
    try:
        yield daemon
    finally:
        problems = stop_dockerd(daemon)
    assert not problems, "the private dockerd left:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """One private dockerd for the session (see the module docstring)."""
    base = tmp_path_factory.getbasetemp()
    # containerd's socket (exec/containerd/containerd.sock) must fit a 108-byte sun_path.
    if len(str(base)) > 60:
        base = Path("/tmp")
    with private_dockerd(base) as daemon:
        yield daemon


@dataclass
class Registry:
    """Debian's distribution registry (docker-registry 2.8) on loopback, plain HTTP, storing
    under a temporary folder. ``env`` points skopeo (and podman) at a registries.conf that marks
    it insecure, so that edgepack's default TLS setting applies to it as to any HTTP registry."""

    process: subprocess.Popen[bytes] = field(repr=False)
    host: str  # "127.0.0.1:18920"
    root: Path
    env: dict[str, str] = field(repr=False)

    def ref(self, repository: str) -> str:
        return f"docker://{self.host}/{repository}"


def start_registry(root: Path, ports: range) -> Registry:
    """Start docker-registry on the first free port of ``ports``; fails the test with its log
    when it does not answer /v2/ within 30 s."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port_in(ports)
    host = f"127.0.0.1:{port}"
    # A YAML subset that is also JSON; the registry reads it with its YAML parser.
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": host},
    }
    (root / "config.yml").write_text(json.dumps(config))
    (root / "registries.conf").write_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    log = root / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(TOOLS / "bin" / "docker-registry"), "serve", str(root / "config.yml")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf")}
    registry = Registry(process=proc, host=host, root=root, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
                client.sendall(b"GET /v2/ HTTP/1.0\r\n\r\n")
                if client.recv(64).startswith(b"HTTP/1.0 200"):
                    return registry
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_registry(registry)
            pytest.fail(
                f"docker-registry did not answer on {host}:\n"
                f"{log.read_text(errors='replace')[-2000:]}",
                pytrace=False,
            )
        time.sleep(0.05)


def stop_registry(registry: Registry) -> None:
    """SIGTERM, SIGKILL after 10 s; its storage goes with it."""
    registry.process.terminate()
    try:
        registry.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        registry.process.kill()
        registry.process.wait(timeout=30)
    subprocess.run(["rm", "-rf", "--one-file-system", str(registry.root)], timeout=300, check=False)


@contextmanager
def running_registry(root: Path, ports: range) -> Iterator[Registry]:
    """docker-registry under ``root`` on the first free loopback port of ``ports``, stopped (and
    its data deleted) afterwards; fails the test when the Docker tools are missing."""
    missing = tools_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    registry = start_registry(root, ports)
    try:
        yield registry
    finally:
        stop_registry(registry)


@pytest.fixture(scope="session")
def loopback_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One docker-registry for the session on a loopback port in 18920-18939."""
    with running_registry(tmp_path_factory.mktemp("registry"), range(18920, 18940)) as registry:
        yield registry
