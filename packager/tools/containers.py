"""Container engines on the build host (podman, docker) for ``edgepack run`` and the tests.

Building never needs an engine; only trying a bundle before flashing does.
"""

from __future__ import annotations

import json
import resource
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packager.errors import ToolFailedError, ToolMissingError
from packager.tools.base import Tool

PODMAN = Tool("podman", "podman", "podman")
DOCKER = Tool("docker", "docker", "docker.io")
RUNC = Tool("runc", "runc", "runc")


@dataclass(frozen=True)
class Engine:
    """A usable container engine and the flags this host needs for it."""

    tool: Tool
    run_flags: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.tool.name

    def load(self, archive: Path) -> str:
        """Load an image archive; return the engine's output naming what was loaded."""
        proc = self.tool.run(["load", "-i", archive], timeout=900)
        return proc.stdout.decode("utf-8", "replace").strip()

    def image_id(self, ref: str) -> str:
        proc = self.tool.run(["image", "inspect", "--format", "{{.Id}}", ref], timeout=60)
        return proc.stdout.decode().strip()

    def image_architecture(self, ref: str) -> str:
        proc = self.tool.run(["image", "inspect", "--format", "{{.Architecture}}", ref], timeout=60)
        return proc.stdout.decode().strip()

    def run_detached(
        self,
        ref: str,
        *,
        name: str,
        publish: Sequence[str] = (),
        volumes: Sequence[str] = (),
        platform: str | None = None,
        env: Sequence[tuple[str, str]] = (),
        extra: Sequence[str] = (),
    ) -> str:
        args: list[str] = ["run", "-d", "--name", name, *self.run_flags]
        if platform:
            args += ["--platform", platform]
        for spec in publish:
            args += ["-p", spec]
        for spec in volumes:
            args += ["-v", spec]
        for key, value in env:
            args += ["-e", f"{key}={value}"]
        args += [*extra, ref]
        proc = self.tool.run(args, timeout=300)
        return proc.stdout.decode().strip()

    def run_once(
        self,
        ref: str,
        args: Sequence[str],
        *,
        name: str,
        entrypoint: str,
        volumes: Sequence[str] = (),
        platform: str | None = None,
        env: Sequence[tuple[str, str]] = (),
        timeout: float = 900,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``entrypoint args`` in a new container of ``ref`` without a network and wait for
        it (``timeout`` seconds); the container is removed. The exit status is not checked."""
        argv: list[str] = ["run", "--rm", "--network", "none", "--name", name, *self.run_flags]
        if platform:
            argv += ["--platform", platform]
        for spec in volumes:
            argv += ["-v", spec]
        for key, value in env:
            argv += ["-e", f"{key}={value}"]
        argv += ["--entrypoint", entrypoint, ref, *args]
        try:
            return self.tool.run(argv, timeout=timeout, check=False)
        finally:
            self.remove(name)  # after a timeout the container may still run

    def logs(self, name: str, tail: int = 50) -> str:
        proc = self.tool.run(["logs", "--tail", str(tail), name], check=False, timeout=30)
        return (proc.stdout + proc.stderr).decode("utf-8", "replace")

    def follow_logs(self, name: str) -> subprocess.Popen[bytes]:
        return self.tool.popen(["logs", "-f", name], stdout=None, stderr=None)

    def is_running(self, name: str) -> bool:
        proc = self.tool.run(
            ["inspect", "--format", "{{.State.Running}}", name], check=False, timeout=30
        )
        return proc.returncode == 0 and proc.stdout.decode().strip() == "true"

    def remove(self, name: str) -> None:
        # Emulated containers may ignore SIGTERM: a short stop timeout, then a kill.
        args = ["rm", "-f", "-t", "2", name] if self.name == "podman" else ["rm", "-f", name]
        self.tool.run(args, check=False, timeout=60)

    def remove_image(self, ref: str) -> None:
        self.tool.run(["rmi", "-f", ref], check=False, timeout=120)


# Engines default to limits (nproc 4M, nofile 1M) that sandboxed hosts such as CI runners refuse
# to grant ("error setting rlimit type 6: operation not permitted"); measured here, nproc above a
# few thousand is refused even under this process's own hard limit. These caps are ample for one
# inference server.
_ULIMIT_CAPS = (("nofile", resource.RLIMIT_NOFILE, 65536), ("nproc", resource.RLIMIT_NPROC, 4096))


def _ulimit_flags() -> tuple[str, ...]:
    flags: list[str] = []
    for name, limit, cap in _ULIMIT_CAPS:
        _, hard = resource.getrlimit(limit)
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return tuple(flags)


def _podman_flags() -> tuple[str, ...]:
    flags = list(_ulimit_flags())
    proc = PODMAN.run(["info", "--format", "json"], check=False, timeout=60)
    if proc.returncode == 0:
        try:
            info = json.loads(proc.stdout)
        except json.JSONDecodeError:
            info = {}
        cgroups = str(info.get("host", {}).get("cgroupVersion", ""))
        # crun refuses hybrid cgroup v1 hierarchies; runc handles them.
        if cgroups == "v1" and RUNC.available():
            flags += ["--runtime", "runc"]
    return tuple(flags)


def _docker_usable() -> bool:
    if not DOCKER.available():
        return False
    proc = DOCKER.run(["info", "--format", "{{.ServerVersion}}"], check=False, timeout=20)
    return proc.returncode == 0


def find_engine(preferred: str | None = None) -> Engine:
    """podman, or docker when its daemon answers; ``preferred`` forces one."""
    if preferred in (None, "podman") and PODMAN.available():
        return Engine(PODMAN, _podman_flags())
    if preferred in (None, "docker") and _docker_usable():
        return Engine(DOCKER, _ulimit_flags())
    if preferred == "docker":
        raise ToolFailedError(
            "docker: no Docker daemon answers on this machine",
            hint="start dockerd, or install podman (apt-get install podman) and use it",
        )
    raise ToolMissingError(
        "no container engine found to run the bundle",
        hint="install one with: apt-get install podman runc",
    )
