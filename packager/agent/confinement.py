"""The runtime container's confinement: one list of engine flags for every way it is started.

The build computes it once from the target (:func:`from_target`) and puts it in three places:
``confinement.json`` in the bundle (read by this agent for the releases it starts), the
supervisor ``supervise.py`` that the systemd unit runs, and install.sh's ``--no-systemd`` path.
So a container started by the unit, by install.sh or by the OTA agent gets the same flags:
read-only root, a small tmpfs /tmp, no capabilities, no new privileges, the target's memory
(and CPU) limit, a pids limit; detached starts (agent, install.sh) add the restart policy, which
under systemd is the unit's own ``Restart=always``. Standard library only (runs on devices).

Every flag is one ``--name=value`` token from a whole-string allow-list (:data:`FLAGS`): a
document, even in a validly signed release, cannot add ``--privileged``, a volume, a device or
a capability, and cannot drop the floor (:data:`REQUIRED`).

The only device access a bundle may ask for is :data:`NVIDIA_JETSON`, each flag as one exact
string (no other runtime, CDI device, group or bind, and the bind read-only). How a container
gets the GPU depends on the engine that starts it (:data:`GPU`: docker's NVIDIA runtime,
podman's CDI device), so device access is per engine: ``device_args`` of a
``edgepack.confinement/v2`` document, one list per engine of :data:`ENGINES`, each checked
against that engine's own flags (podman given docker's ``--runtime=nvidia`` is refused). Every
starter picks the list by the engine's file name (:func:`engine_name`): the agent here
(:meth:`Confinement.for_engine`), and the supervisor and install-container.sh, rendered with the
same lists (their ``device_access`` context). A document without device access (every Linux
bundle) is ``edgepack.confinement/v1`` exactly as before; both are read.

A bundle may also declare a ``prepare`` step (:class:`Prepare`): one command the OTA agent runs in
the release's image before it starts the release's serving container, e.g. a Jetson bundle's
TensorRT engine build for the exact device. It is equally closed: an allow-listed module, its
exact arguments, exactly the engines directory bound read-write, the image's interpreter by
pattern and a bounded timeout (:func:`check_prepare`); the agent builds the command line itself
(:func:`prepare_argv`), with the floor, the bundle's own GPU flags and no network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE = "confinement.json"
# A document without device access (every Linux bundle): unchanged since v1.
SCHEMA = "edgepack.confinement/v1"
# v1 plus "device_args": the device access per container engine (a Jetson bundle).
SCHEMA_DEVICE = "edgepack.confinement/v2"
# Docker's and podman's names; "unless-stopped": an engine restart (reboot) or a crash brings the
# runtime back, an explicit stop (the agent replacing a version) does not.
RESTART_POLICY = "unless-stopped"
# Enough for the runtime's threads (onnxruntime's pool, the HTTP server); a fork bomb stops here.
PIDS_LIMIT = 256
TMPFS = "/tmp:rw,size=64m,mode=1777"
REQUIRED: tuple[str, ...] = (
    "--read-only",
    f"--tmpfs={TMPFS}",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)
# Where a Jetson's first-boot unit writes the TensorRT plans the runtime loads
# (/work/brief/jetson.md; packager.backends.jetson.backend.ENGINES_DIR is this value).
ENGINES_DIR = "/var/lib/edgepack/engines"
# The engines a bundle's device access is written for, known by their file name.
ENGINES = ("docker", "podman")
# How each engine gives a container the Jetson's GPU: the ONE table every starter's flags come
# from. docker: the NVIDIA container runtime (nvidia-container-toolkit registers it as "nvidia";
# it mounts the GPU's devices and, on JetPack 4, the host's CUDA/TensorRT). podman: CDI, the spec
# `nvidia-ctk cdi generate` writes for nvidia.com/gpu (what packager/runtime/jetson_preflight.py
# checks for); podman has no "nvidia" OCI runtime ("default OCI runtime nvidia not found").
# The engine unit (templates/jetson/engine-build.service.jinja) is rendered from this table too
# (packager.backends.jetson.backend.UNIT_GPU_ARGS).
GPU: dict[str, str] = {
    "docker": "--runtime=nvidia",
    "podman": "--device=nvidia.com/gpu=all",
}
# A Jetson runtime's GPU access with each engine: its GPU flag, the video group that owns
# /dev/nvhost-* and /dev/nvmap, and the engines directory READ-ONLY (the container loads plans,
# never writes them).
NVIDIA_JETSON: dict[str, tuple[str, ...]] = {
    engine: (gpu, "--group-add=video", f"--volume={ENGINES_DIR}:{ENGINES_DIR}:ro")
    for engine, gpu in GPU.items()
}
# The flags every engine takes alike (device access is not among them: it is per engine).
FLAGS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        r"--read-only",
        r"--tmpfs=/tmp:rw,size=[1-9][0-9]{0,5}m,mode=1777",
        r"--cap-drop=ALL",
        r"--security-opt=no-new-privileges",
        r"--memory=[1-9][0-9]{0,6}m",
        r"--memory-swap=[1-9][0-9]{0,6}m",
        r"--cpus=[0-9]{1,3}\.[0-9]{2}",
        r"--pids-limit=[1-9][0-9]{0,5}",
    )
)
RESTART = re.compile(r"no|always|unless-stopped|on-failure(:[1-9][0-9]{0,2})?")

# --- the prepare step ---------------------------------------------------------------------------
# The runtime's configuration in every edgepack image (packager.backends.linux.backend.MODEL_DIR).
RUNTIME_CONFIG = "/opt/edgepack/model/runtime.json"
# module -> the one argument list it may be given. edgepack_runtime.engine_build --from-config
# reads the engine key and the model from the image's own runtime.json (packager/runtime/
# engine_build.py): no value reaches the build from outside the image.
PREPARE_MODULES: dict[str, tuple[str, ...]] = {
    "edgepack_runtime.engine_build": ("--from-config", RUNTIME_CONFIG),
}
# The one bind a prepare step may (and must) ask for: the engines directory, read-WRITE (the
# serving container binds it read-only).
PREPARE_BINDS: tuple[str, ...] = (f"{ENGINES_DIR}:{ENGINES_DIR}:rw",)
# The image's CPython (the JetPack containers' /usr/bin/python3.8, /usr/bin/python3.10; edgepack's
# Debian base /usr/bin/python3.11).
PREPARE_PYTHON = re.compile(r"/usr/bin/python3\.[0-9]{1,2}")
# Seconds the agent waits for it: an engine build takes minutes (about 9.5 min on an Orin in one
# NVIDIA/TensorRT report, longer on a Nano); the Jetson bundle asks for its build's own limit
# (3600 s) + 900 s, as its first-boot unit's TimeoutStartSec. Two hours at most.
MAX_PREPARE_TIMEOUT_S = 7200
PREPARE_KEYS = ("args", "binds", "module", "python", "timeout_s")
# The GPU access a prepare container gets: the bundle's own device flags for the engine minus
# their read-only bind of the engines directory (PREPARE_BINDS replaces it).
PREPARE_DEVICE_FLAGS = tuple(dict.fromkeys(
    flag for flags in NVIDIA_JETSON.values() for flag in flags if not flag.startswith("--volume=")
))
# Root in the container (the image's user 10001 cannot write the root-owned engines directory),
# with every capability dropped and no new privileges (the floor, REQUIRED).
PREPARE_USER = "--user=0:0"
_DOCUMENT_KEYS = ("prepare", "restart", "run_args", "schema")
_DEVICE_KEY = "device_args"


class ConfinementError(ValueError):
    """A confinement document or flag outside the allow-list; the message names it."""


@dataclass(frozen=True)
class Prepare:
    """A bundle's prepare step, checked (:func:`check_prepare`): run ``python -m module *args`` in
    the release's image with ``binds``, for at most ``timeout_s`` seconds."""

    module: str
    args: tuple[str, ...]
    binds: tuple[str, ...]
    python: str
    timeout_s: int

    def to_json(self) -> dict[str, Any]:
        return {"args": list(self.args), "binds": list(self.binds), "module": self.module,
                "python": self.python, "timeout_s": self.timeout_s}


@dataclass(frozen=True)
class Confinement:
    """A release's ``confinement.json``, checked: the flags every engine starts it with (floor
    and limits), its restart policy, the prepare step, if any, and its device access per engine
    (``(engine, flags)`` pairs in :data:`ENGINES` order; () for none)."""

    run_args: tuple[str, ...]
    restart: str
    prepare: Prepare | None
    device_args: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def for_engine(self, engine: str) -> tuple[str, ...]:
        """The detached start's flags with ``engine`` (its path or file name): the shared flags,
        the engine's device flags, the restart policy last. ConfinementError (one line) when
        the bundle has device access and ``engine`` is neither docker nor podman
        (:func:`engine_name`); without device access every engine gets the same flags."""
        device: tuple[str, ...] = ()
        if self.device_args:
            device = dict(self.device_args)[engine_name(engine)]
        return (*self.run_args, *device, f"--restart={self.restart}")


def engine_name(engine: str) -> str:
    """``engine``'s name among :data:`ENGINES`: the file name of its path (``/usr/bin/podman``
    -> ``podman``), as install-container.sh and the supervisor tell it. ConfinementError for any
    other (a wrapper's name says nothing about how it gives a container the GPU)."""
    name = engine.rstrip("/").rsplit("/", 1)[-1]
    if name not in ENGINES:
        raise ConfinementError(
            f"container engine {engine!r}: this bundle's device access is set for "
            f"{' or '.join(ENGINES)} (the engine's file name), not {name!r}"
        )
    return name


def engine_build_step(python: str, timeout_s: int) -> Prepare:
    """The TensorRT engine build as a prepare step (what the Jetson backend declares)."""
    module = "edgepack_runtime.engine_build"
    return check_prepare({"module": module, "args": list(PREPARE_MODULES[module]),
                          "binds": list(PREPARE_BINDS), "python": python, "timeout_s": timeout_s})


def check_prepare(value: object) -> Prepare:
    """``value`` as a :class:`Prepare`, when it is exactly an allowed step: the keys
    :data:`PREPARE_KEYS`, a module of :data:`PREPARE_MODULES` with exactly its arguments,
    exactly :data:`PREPARE_BINDS`, an interpreter matching :data:`PREPARE_PYTHON`, a timeout of
    1..:data:`MAX_PREPARE_TIMEOUT_S` s. ConfinementError naming the field otherwise."""
    if not isinstance(value, dict):
        raise ConfinementError("prepare: expected a JSON object")
    keys = sorted(value)
    if keys != sorted(PREPARE_KEYS):
        extra = sorted(set(keys) - set(PREPARE_KEYS))
        raise ConfinementError(
            f"prepare: unknown key {extra[0]!r}" if extra
            else f"prepare: missing key {sorted(set(PREPARE_KEYS) - set(keys))[0]!r}"
        )
    module = value["module"]
    if not isinstance(module, str) or module not in PREPARE_MODULES:
        raise ConfinementError(
            f"prepare.module {module!r} is not one of {', '.join(sorted(PREPARE_MODULES))}"
        )
    args = value["args"]
    if not isinstance(args, list) or tuple(args) != PREPARE_MODULES[module]:
        raise ConfinementError(
            f"prepare.args {args!r} are not {list(PREPARE_MODULES[module])!r} "
            f"(the only arguments {module} takes here)"
        )
    binds = value["binds"]
    if not isinstance(binds, list) or tuple(binds) != PREPARE_BINDS:
        raise ConfinementError(f"prepare.binds {binds!r} are not {list(PREPARE_BINDS)!r}")
    python = value["python"]
    if not isinstance(python, str) or not PREPARE_PYTHON.fullmatch(python):
        raise ConfinementError(f"prepare.python {python!r} is not /usr/bin/python3.N")
    timeout = value["timeout_s"]
    if (
        not isinstance(timeout, int)
        or isinstance(timeout, bool)
        or not 1 <= timeout <= MAX_PREPARE_TIMEOUT_S
    ):
        raise ConfinementError(
            f"prepare.timeout_s {timeout!r} is not a whole number of seconds from 1 to "
            f"{MAX_PREPARE_TIMEOUT_S}"
        )
    return Prepare(module, tuple(args), tuple(binds), python, timeout)


def prepare_argv(name: str, ref: str, run_args: Sequence[str], step: Prepare) -> tuple[str, ...]:
    """The engine's arguments (after ``docker``/``podman``) that run ``step`` in ``ref`` as the
    foreground container ``name``, removed when it ends: root without capabilities (the floor),
    read-only root filesystem, the GPU flags found in the bundle's ``run_args`` for this engine
    (:meth:`Confinement.for_engine`; :data:`PREPARE_DEVICE_FLAGS`, in their order there), no
    network, the step's binds, the image's interpreter."""
    device = [flag for flag in run_args if flag in PREPARE_DEVICE_FLAGS]
    volumes = [f"--volume={bind}" for bind in step.binds]
    return (
        "run", "--rm", "--name", name, PREPARE_USER, *REQUIRED, *device, "--network=none",
        *volumes, f"--entrypoint={step.python}", ref, "-m", step.module, *step.args,
    )  # fmt: skip


def from_target(
    memory_max_mb: int | None, cpu_quota_percent: int | None, *, pids_limit: int = PIDS_LIMIT
) -> tuple[str, ...]:
    """The run flags every engine gets for a target's ``[service]`` limits (MiB, percent of one
    CPU); a device class's device access is per engine (``device`` of :func:`document`).
    ConfinementError for a flag outside the allow-list."""
    args = list(REQUIRED)
    if memory_max_mb:
        # Swap equal to memory: the limit is on RAM+swap, so the runtime cannot swap past it.
        args += [f"--memory={memory_max_mb}m", f"--memory-swap={memory_max_mb}m"]
    if cpu_quota_percent:
        args.append(f"--cpus={cpu_quota_percent / 100:.2f}")
    args.append(f"--pids-limit={pids_limit}")
    return check_args(args)


def check_args(args: Sequence[object]) -> tuple[str, ...]:
    """``args`` when every one is an allowed flag and the floor (:data:`REQUIRED`) is there."""
    checked: list[str] = []
    device = {flag for flags in NVIDIA_JETSON.values() for flag in flags}
    for arg in args:
        if isinstance(arg, str) and arg in device:
            # A v1 document of a Jetson bundle built before device access was per engine.
            raise ConfinementError(
                f"run flag {arg!r} is device access, which depends on the engine: it belongs in "
                f"{_DEVICE_KEY} ({SCHEMA_DEVICE}); rebuild the bundle with this edgepack"
            )
        if not isinstance(arg, str) or not any(f.fullmatch(arg) for f in FLAGS):
            raise ConfinementError(f"run flag {arg!r} is not an allowed confinement flag")
        checked.append(arg)
    missing = [flag for flag in REQUIRED if flag not in checked]
    if missing:
        raise ConfinementError(f"run flags lack {', '.join(missing)}")
    return tuple(checked)


def check_device(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``device_args`` checked: an object with exactly the keys :data:`ENGINES`, each a list of
    that engine's flags of :data:`NVIDIA_JETSON` (exact strings, once each), the lists the same
    access (equal but for each engine's own :data:`GPU` flag). ``(engine, flags)`` pairs in
    :data:`ENGINES` order; ConfinementError naming the engine and the flag otherwise."""
    if not isinstance(value, dict) or sorted(value) != sorted(ENGINES):
        raise ConfinementError(
            f"{_DEVICE_KEY}: expected an object with exactly the keys {', '.join(ENGINES)}"
        )
    checked: list[tuple[str, tuple[str, ...]]] = []
    for engine in ENGINES:
        flags = value[engine]
        if not isinstance(flags, list):
            raise ConfinementError(f"{_DEVICE_KEY}.{engine}: expected a list of flags")
        for flag in flags:
            others = [other for other in ENGINES if other != engine and flag == GPU[other]]
            if others:
                raise ConfinementError(
                    f"{_DEVICE_KEY}.{engine}: {flag!r} is {others[0]}'s GPU flag; {engine} "
                    f"takes {GPU[engine]!r}"
                )
            if not isinstance(flag, str) or flag not in NVIDIA_JETSON[engine]:
                raise ConfinementError(
                    f"{_DEVICE_KEY}.{engine}: {flag!r} is not an allowed device flag for {engine}"
                )
        if len(set(flags)) != len(flags):
            raise ConfinementError(f"{_DEVICE_KEY}.{engine}: a flag is repeated")
        checked.append((engine, tuple(flags)))
    shapes = {tuple("GPU" if f == GPU[e] else f for f in flags) for e, flags in checked}
    if len(shapes) > 1:
        raise ConfinementError(
            f"{_DEVICE_KEY}: the engines' lists differ beyond their GPU flag: "
            + "; ".join(f"{engine} {list(flags)}" for engine, flags in checked)
        )
    return tuple(checked)


def document(
    args: Sequence[str],
    restart: str = RESTART_POLICY,
    prepare: Prepare | None = None,
    device: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The document; ``prepare`` only when there is one, and ``device`` (engine -> flags, e.g.
    :data:`NVIDIA_JETSON`) only when there is device access: then the schema is
    :data:`SCHEMA_DEVICE`. A bundle with neither is the v1 document of before, byte for byte."""
    doc: dict[str, Any] = {
        "schema": SCHEMA, "run_args": list(check_args(args)), "restart": _restart(restart)
    }
    if prepare is not None:
        doc["prepare"] = check_prepare(prepare.to_json()).to_json()
    if device:
        checked = check_device({engine: list(flags) for engine, flags in device.items()})
        doc["schema"] = SCHEMA_DEVICE
        doc[_DEVICE_KEY] = {engine: list(flags) for engine, flags in checked}
    return doc


def to_bytes(
    args: Sequence[str],
    restart: str = RESTART_POLICY,
    prepare: Prepare | None = None,
    device: Mapping[str, Sequence[str]] | None = None,
) -> bytes:
    """``confinement.json`` as the build writes it (byte-identical for the same flags)."""
    return (
        json.dumps(document(args, restart, prepare, device), indent=2, sort_keys=True) + "\n"
    ).encode()


def _restart(value: object) -> str:
    if not isinstance(value, str) or not RESTART.fullmatch(value):
        raise ConfinementError(
            f"restart policy {value!r} is not one of no, always, unless-stopped, on-failure[:N]"
        )
    return value


def read(release_dir: Path) -> Confinement:
    """The ``confinement.json`` of the release (or bundle) in ``release_dir``, every part
    checked (v1: no device access; v2: ``device_args`` for every engine, :func:`check_device`);
    the floor and no prepare step when the bundle predates the file. ConfinementError naming
    the file and the first problem (an unknown schema, e.g. a newer edgepack's, included)."""
    path = release_dir / FILE
    if not path.exists():
        return Confinement(from_target(None, None), RESTART_POLICY, None)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfinementError(f"{path}: not readable JSON ({exc})") from exc
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema not in (SCHEMA, SCHEMA_DEVICE):
        raise ConfinementError(f"{path}: schema: expected {SCHEMA!r} or {SCHEMA_DEVICE!r}")
    assert isinstance(doc, dict)
    try:
        keys = (*_DOCUMENT_KEYS, _DEVICE_KEY) if schema == SCHEMA_DEVICE else _DOCUMENT_KEYS
        unknown = sorted(set(doc) - set(keys))
        if unknown:
            raise ConfinementError(f"unknown key {unknown[0]!r}")
        if schema == SCHEMA_DEVICE and _DEVICE_KEY not in doc:
            raise ConfinementError(f"missing key {_DEVICE_KEY!r} ({SCHEMA_DEVICE})")
        args = check_args(doc.get("run_args") or [])
        prepare = check_prepare(doc["prepare"]) if "prepare" in doc else None
        device = check_device(doc[_DEVICE_KEY]) if schema == SCHEMA_DEVICE else ()
        return Confinement(args, _restart(doc.get("restart")), prepare, device)
    except ConfinementError as exc:
        raise ConfinementError(f"{path}: {exc}") from exc


def detached_args(release_dir: Path, engine: str | None = None) -> tuple[str, ...]:
    """The flags for a detached start with ``engine`` (its path or file name) of the release
    staged in ``release_dir``: its ``confinement.json`` (checked whole, prepare step and every
    engine's device access included, :func:`read`; :meth:`Confinement.for_engine`), or the
    floor when the bundle predates the file. ``engine`` None: the check alone (``edgepack
    verify``, the publisher), returning the flags every engine shares (no device access)."""
    confinement = read(release_dir)
    if engine is None:
        return (*confinement.run_args, f"--restart={confinement.restart}")
    return confinement.for_engine(engine)
