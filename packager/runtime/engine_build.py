"""Build the TensorRT plan for this device with trtexec, once; skip it when it is already built.

Runs INSIDE the Jetson container (where trtexec and TensorRT's libraries live) as the main step
of the first-boot unit ``edgepack-<name>-engine.service``
(templates/jetson/engine-build.service.jinja), after ``jetson_preflight``::

    python3 -m edgepack_runtime.engine_build --model /opt/edgepack/model/model.onnx \\
        --model-sha256 HEX --tensorrt 8.6.2 --sm 87 --precision fp16 --workspace-mib 1024

or, with every key field and the model taken from the image's own runtime configuration (its
``engine`` section, packager/runtime/config.py: what the runtime will look for), so nothing
outside the image has to repeat them (the OTA agent's ``prepare`` step,
packager/agent/confinement.py)::

    python3 -m edgepack_runtime.engine_build --from-config /opt/edgepack/model/runtime.json

What it does, in order (every line it prints goes to the journal):

1. The expected :class:`~.engine_key.EngineKey` from the arguments; the model file must hash to
   ``--model-sha256`` and the container's TensorRT (``libnvinfer.so.X.Y.Z``) must be the key's.
2. Under a lock (``<engines>/<model_sha256>/.lock``): a plan whose key file equals the key is
   kept (exit 0, nothing run). A plan without its key, or with another key, is never loaded and
   is rebuilt; its key file is removed first.
3. A prebuilt plan in the bundle (``--prebuilt-dir``, from ``edgepack engine build --on``) whose
   key file equals the key is installed instead of building.
4. Otherwise trtexec (:func:`.trtexec.build_command`) writes into a hidden temporary file in the
   same directory, with the timing cache copied to a temporary file too (seeded from the
   bundle's ``engine/timing.cache`` when there is none yet). A progress line is printed at least
   every ``--progress-s`` seconds (first builds take minutes: ~9.5 min on an Orin in one report),
   trtexec's own lines are relayed, and the build is killed after ``--timeout-s``.
5. On success: fsync, rename the plan into place, then write the key file (temporary file,
   fsync, rename) - the key file is written LAST, so an interrupted build never leaves a plan
   that looks valid - then the timing cache.

Exit codes: 0 built, installed or already up to date; 2 bad arguments; 3 the model is not the
bundle's; 4 the container's TensorRT is not the key's; 5 trtexec failed or wrote no plan;
6 the build (or the wait for another build's lock) ran past ``--timeout-s``; 7 the engines
directory could not be written; 143 stopped by SIGTERM (trtexec killed, temporary files removed).

Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import glob
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from .engine_key import (
    ENGINES_DIR,
    KEY_SUFFIX,
    MAX_DLA_CORE,
    PLAN_SUFFIX,
    PRECISIONS,
    EngineKey,
    EngineKeyError,
    check_plan,
    read_key,
    sha256_file,
)
from .jetson_preflight import LIB_DIRS, positive_int
from .trtexec import DEFAULT_TRTEXEC, build_command, form, version_from_output

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_TENSORRT = 4
EXIT_BUILD = 5
EXIT_TIMEOUT = 6
EXIT_IO = 7
EXIT_TERMINATED = 128 + signal.SIGTERM

DEFAULT_TIMEOUT_S = 3600
DEFAULT_PROGRESS_S = 30
# trtexec's own lines relayed to the journal, each cut to this length; a flood (--verbose) stops
# being relayed after MAX_RELAYED lines (the progress lines go on).
MAX_LINE = 500
MAX_RELAYED = 2000
# Seconds between SIGTERM and SIGKILL when trtexec has to stop.
KILL_GRACE_S = 5
# libnvinfer.so.X.Y.Z, looked for in LIB_DIRS (one definition, jetson_preflight's).
_LIBNVINFER = re.compile(r"libnvinfer\.so\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class BuildError(Exception):
    """A build that cannot go on: one line for the journal and the exit code it ends with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Terminated(Exception):
    """SIGTERM arrived (systemd stopping the unit, ``docker stop``)."""


def say(message: str, out: IO[str] | None = None) -> None:
    """One journal line (stdout, flushed: systemd reads it as it comes)."""
    stream = out or sys.stdout
    stream.write(f"engine build: {message}\n")
    stream.flush()


def detect_tensorrt(lib_dirs: Sequence[str] = LIB_DIRS) -> str | None:
    """The TensorRT release whose ``libnvinfer.so.X.Y.Z`` the container has, or None.

    The versioned file name is how TensorRT's packages install it (``libnvinfer8``:
    ``libnvinfer.so.8.6.2``; JetPack 4's CSV mounts put the host's ``libnvinfer.so.8.2.1`` at the
    same place). Several different releases: None (ambiguous, refuse).
    """
    found = set()
    for directory in lib_dirs:
        for path in glob.glob(os.path.join(glob.escape(directory), "libnvinfer.so.*")):
            match = _LIBNVINFER.fullmatch(os.path.basename(path))
            if match:
                found.add(".".join(str(int(part)) for part in match.groups()))
    return found.pop() if len(found) == 1 else None


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never a part (temp file, fsync, rename)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _commit(plan_tmp: Path, key: EngineKey, engines_dir: Path) -> None:
    """Rename the finished plan into place, then write its key file (last)."""
    plan = key.plan_path(engines_dir)
    _fsync_file(plan_tmp)
    os.replace(plan_tmp, plan)
    _fsync_dir(plan.parent)
    _write_atomic(key.key_path(engines_dir), key.to_json().encode("ascii"))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def _locked(directory: Path, deadline: float, out: IO[str] | None) -> Iterator[None]:
    """An exclusive flock on ``directory/.lock``, waited for until ``deadline`` (monotonic)."""
    with open(directory / ".lock", "a+b") as handle:
        told = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildError(
                        "another build held the lock past --timeout-s", EXIT_TIMEOUT
                    ) from None
                if not told:
                    say("waiting for another build of this model to finish", out)
                    told = True
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _die_with_parent() -> None:
    """In trtexec's process: be killed when this builder dies, even by SIGKILL (prctl(2))."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM trtexec's process group, SIGKILL it after KILL_GRACE_S, and reap it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_trtexec(
    argv: list[str],
    *,
    expected_tensorrt: str,
    deadline: float,
    timeout_s: int,
    progress_s: float,
    label: str,
    out: IO[str] | None = None,
) -> None:
    """Run trtexec to its end, relaying its lines and printing progress; BuildError if it fails.

    Progress: a line at least every ``progress_s`` seconds while it runs. The version trtexec
    reports ("[TensorRT v8602]") must be ``expected_tensorrt``: otherwise it is stopped at once.
    """
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a stop reaches trtexec's children too
        # Runs in the child before exec, and before the reader thread exists.
        preexec_fn=_die_with_parent,
    )
    lines: queue.Queue[bytes | None] = queue.Queue(maxsize=1024)

    def pump() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            lines.put(raw)
        lines.put(None)

    reader = threading.Thread(target=pump, name="trtexec-output", daemon=True)
    reader.start()
    relayed, next_progress, eof = 0, started + progress_s, False
    try:
        while not eof:
            now = time.monotonic()
            if now >= deadline:
                _stop(process)
                raise BuildError(
                    f"trtexec ran past --timeout-s={timeout_s} and was stopped", EXIT_TIMEOUT
                )
            if now >= next_progress:
                say(f"still building {label}: {int(now - started)} s so far "
                    f"(stops at {timeout_s} s)", out)
                next_progress = now + progress_s
            try:
                raw = lines.get(timeout=max(0.05, min(next_progress, deadline) - now))
            except queue.Empty:
                continue
            if raw is None:
                eof = True
                continue
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            reported = version_from_output(text)
            if reported is not None and reported != expected_tensorrt:
                _stop(process)
                raise BuildError(
                    f"TensorRT: expected {expected_tensorrt}, found {reported} "
                    "(trtexec's banner)", EXIT_TENSORRT,
                )
            if relayed < MAX_RELAYED:
                say("trtexec: " + text[:MAX_LINE], out)
                relayed += 1
                if relayed == MAX_RELAYED:
                    say("trtexec: (further output not relayed)", out)
        remaining = max(0.0, deadline - time.monotonic())
        try:
            code = process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise BuildError(
                f"trtexec ran past --timeout-s={timeout_s} and was stopped", EXIT_TIMEOUT
            ) from None
    finally:
        _stop(process)
        reader.join(timeout=KILL_GRACE_S)
    if code != 0:
        raise BuildError(f"trtexec exited with status {code} (its output is above)", EXIT_BUILD)


def _install_prebuilt(
    key: EngineKey, prebuilt_dir: Path, engines_dir: Path, plan_tmp: Path, out: IO[str] | None
) -> bool:
    """Install the bundle's prebuilt plan when its key file equals ``key`` (copied through
    ``plan_tmp``); True if installed."""
    plan = prebuilt_dir / (key.stem + PLAN_SUFFIX)
    key_file = prebuilt_dir / (key.stem + KEY_SUFFIX)
    if not key_file.is_file() or not plan.is_file():
        return False
    try:
        found = read_key(key_file)
    except EngineKeyError as exc:
        say(f"prebuilt plan ignored: {exc}", out)
        return False
    if found != key:
        say("prebuilt plan ignored: key differs: " + "; ".join(key.differences(found)), out)
        return False
    shutil.copyfile(plan, plan_tmp)
    if plan_tmp.stat().st_size == 0:
        _unlink(plan_tmp)
        say("prebuilt plan ignored: it is empty", out)
        return False
    _commit(plan_tmp, key, engines_dir)
    say(f"installed the bundle's prebuilt plan {key.plan_path(engines_dir)}", out)
    return True


def build(
    key: EngineKey,
    *,
    model: Path,
    engines_dir: Path = Path(ENGINES_DIR),
    trtexec: str = DEFAULT_TRTEXEC,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    progress_s: float = DEFAULT_PROGRESS_S,
    timing_cache_seed: Path | None = None,
    prebuilt_dir: Path | None = None,
    out: IO[str] | None = None,
) -> str:
    """Make ``key``'s plan exist under ``engines_dir``: "kept" | "installed" | "built".

    Raises :class:`BuildError` (with its exit code) and lets :class:`Terminated` through after
    stopping trtexec and removing the temporary files.
    """
    deadline = time.monotonic() + timeout_s
    model_dir = key.plan_path(engines_dir).parent
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"{model_dir}: {exc.strerror or exc}", EXIT_IO) from None
    # Every write below goes into model_dir: a symlink there would carry the lock, the plan and
    # its key file (and their removals) to wherever it points, outside the engines directory.
    if model_dir.is_symlink() or not model_dir.is_dir():
        raise BuildError(
            f"{model_dir}: expected a directory, found a symlink or another file (remove it)",
            EXIT_IO,
        )
    try:
        return _build_locked(
            key, model=model, engines_dir=engines_dir, trtexec=trtexec, timeout_s=timeout_s,
            progress_s=progress_s, timing_cache_seed=timing_cache_seed,
            prebuilt_dir=prebuilt_dir, deadline=deadline, out=out,
        )
    except OSError as exc:
        where = exc.filename or engines_dir
        raise BuildError(f"{where}: {exc.strerror or exc}", EXIT_IO) from None


def _build_locked(
    key: EngineKey,
    *,
    model: Path,
    engines_dir: Path,
    trtexec: str,
    timeout_s: int,
    progress_s: float,
    timing_cache_seed: Path | None,
    prebuilt_dir: Path | None,
    deadline: float,
    out: IO[str] | None,
) -> str:
    model_dir = key.plan_path(engines_dir).parent
    plan_tmp = model_dir / f".{key.stem}.plan.tmp"
    cache = key.timing_cache_path(engines_dir)
    cache_tmp = cache.with_name(f".{cache.name}.{key.model_sha256[:16]}.tmp")
    with _locked(model_dir, deadline, out):
        status = check_plan(key, engines_dir)
        if status.ready:
            say(f"plan up to date, nothing to build: {status.plan}", out)
            return "kept"
        if status.state == "invalid":
            say(f"existing plan not used: {status.reason}; rebuilding", out)
        try:
            # Before anything else: a stale plan must never sit next to a key file.
            _unlink(key.key_path(engines_dir))
            _unlink(plan_tmp)  # left by a builder that was killed
            _unlink(cache_tmp)
            if prebuilt_dir is not None and _install_prebuilt(
                key, prebuilt_dir, engines_dir, plan_tmp, out
            ):
                return "installed"
            if cache.is_file():
                shutil.copyfile(cache, cache_tmp)
            elif timing_cache_seed is not None and timing_cache_seed.is_file():
                shutil.copyfile(timing_cache_seed, cache_tmp)
                say(f"timing cache seeded from {timing_cache_seed}", out)
            argv = build_command(
                key, onnx=str(model), plan=str(plan_tmp), timing_cache=str(cache_tmp),
                trtexec=trtexec,
            )
            say(f"building {key.plan_path(engines_dir)} (first builds take minutes)", out)
            say("running: " + " ".join(argv), out)
            started = time.monotonic()
            run_trtexec(
                argv, expected_tensorrt=key.tensorrt, deadline=deadline, timeout_s=timeout_s,
                progress_s=progress_s, label=key.stem, out=out,
            )
            if not plan_tmp.is_file() or plan_tmp.stat().st_size == 0:
                raise BuildError("trtexec exited 0 but wrote no plan", EXIT_BUILD)
            _commit(plan_tmp, key, engines_dir)
            if cache_tmp.is_file() and cache_tmp.stat().st_size > 0:
                _fsync_file(cache_tmp)
                os.replace(cache_tmp, cache)
            say(f"built {key.plan_path(engines_dir)} in {int(time.monotonic() - started)} s", out)
            return "built"
        finally:
            _unlink(plan_tmp)
            _unlink(cache_tmp)


# --dla-core: the GPU (none) or one of the cores EngineKey allows; argparse lists the choices.
DLA_CHOICES = ("none", *(str(core) for core in range(MAX_DLA_CORE + 1)))


def parser() -> argparse.ArgumentParser:
    """The command line: ``--from-config`` or the key's flags (``_expected`` checks which)."""
    cli = argparse.ArgumentParser(
        prog="python3 -m edgepack_runtime.engine_build",
        description="Build this device's TensorRT plan with trtexec (skipped when up to date).",
    )
    cli.add_argument("--from-config", type=Path, default=None, metavar="RUNTIME_JSON",
                     help="take the key, the model and the engines dir from the runtime's "
                     "config (its engine section) instead of the flags below")
    # Required unless --from-config (checked in _expected: argparse cannot say "one or the other").
    cli.add_argument("--model", type=Path, help="the bundle's ONNX file")
    cli.add_argument("--model-sha256", help="its sha256 (the key's model_sha256)")
    cli.add_argument("--tensorrt", help="major.minor.patch, e.g. 8.6.2")
    cli.add_argument("--sm", type=positive_int, help="compute capability, e.g. 87")
    cli.add_argument("--precision", choices=PRECISIONS)
    cli.add_argument("--dla-core", choices=DLA_CHOICES, default=None, help="DLA core, or none")
    cli.add_argument("--workspace-mib", type=positive_int)
    cli.add_argument("--engines-dir", type=Path, default=None,
                     help=f"default: the config's engines_dir, else {ENGINES_DIR}")
    cli.add_argument("--trtexec", default=DEFAULT_TRTEXEC)
    cli.add_argument("--timing-cache-seed", type=Path, default=None)
    cli.add_argument("--prebuilt-dir", type=Path, default=None)
    cli.add_argument("--timeout-s", type=positive_int, default=DEFAULT_TIMEOUT_S)
    cli.add_argument("--progress-s", type=positive_int, default=DEFAULT_PROGRESS_S)
    cli.add_argument("--lib-dir", action="append", default=None,
                     help="where libnvinfer.so.X.Y.Z is looked for (repeatable)")
    return cli


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


# The flags --from-config replaces (the key's fields and the model).
KEY_FLAGS = ("model", "model_sha256", "tensorrt", "sm", "precision", "dla_core", "workspace_mib")


def _expected(args: argparse.Namespace) -> tuple[EngineKey, Path, Path]:
    """The key to build, the model file and the engines directory: from ``--from-config`` (the
    runtime's own config, validated as the runtime validates it) or from the explicit flags.
    EngineKeyError (one line) for a missing, conflicting or invalid value."""
    if args.from_config is not None:
        # Imported here: `edgepack engine build --on` ships only engine_key, trtexec,
        # jetson_preflight and this module to the reference device
        # (packager/backends/jetson/engine_remote.py) and uses the explicit flags.
        from .config import ConfigError, load_config

        given = [name for name in KEY_FLAGS if getattr(args, name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise EngineKeyError(f"--from-config: {flag} cannot be given too (the config holds it)")
        try:
            config = load_config(args.from_config)
        except ConfigError as exc:
            raise EngineKeyError(str(exc)) from None
        if config.engine is None:
            raise EngineKeyError(
                f"{args.from_config}: no engine section: this runtime serves no TensorRT engine"
            )
        return config.engine.key, config.model_path, args.engines_dir or config.engine.engines_dir
    missing = [name for name in KEY_FLAGS if name != "dla_core" and getattr(args, name) is None]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise EngineKeyError(f"{flag} is required (or --from-config RUNTIME_JSON)")
    key = EngineKey(
        model_sha256=args.model_sha256, tensorrt=args.tensorrt, sm=args.sm,
        precision=args.precision, workspace_mib=args.workspace_mib,
        dla_core=None if args.dla_core in (None, "none") else int(args.dla_core),
    )
    return key, args.model, args.engines_dir or Path(ENGINES_DIR)


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Build, install or keep this device's plan; the exit code (module docstring: 0 up to date,
    2 usage (argparse exits 2 itself), 3 model, 4 TensorRT, 5 trtexec, 6 timeout, 7 engines
    directory, 143 SIGTERM). Its lines go to ``out`` (default stdout)."""
    args = parser().parse_args(argv)
    try:
        key, model, engines_dir = _expected(args)
        # A release with no known trtexec command line is a usage error here, before the lock
        # and before an existing key file is removed (not a traceback from build_command).
        form(key.tensorrt)
    except EngineKeyError as exc:
        say(str(exc), out)
        return EXIT_USAGE
    if not model.is_file():
        say(f"model: expected the bundle's ONNX file at {model}, found nothing", out)
        return EXIT_MODEL
    found_sha = sha256_file(model)
    if found_sha != key.model_sha256:
        say(f"model: expected sha256 {key.model_sha256}, found {found_sha} ({model})", out)
        return EXIT_MODEL
    lib_dirs = args.lib_dir or list(LIB_DIRS)
    found_trt = detect_tensorrt(lib_dirs)
    if found_trt != key.tensorrt:
        where = ", ".join(lib_dirs)
        shown = found_trt or "no single libnvinfer.so.X.Y.Z"
        say(f"TensorRT: expected {key.tensorrt}, found {shown} in {where}", out)
        return EXIT_TENSORRT
    if args.timing_cache_seed is not None and not args.timing_cache_seed.is_file():
        say(f"--timing-cache-seed: {args.timing_cache_seed} is not a file", out)
        return EXIT_USAGE
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        build(
            key, model=model, engines_dir=engines_dir, trtexec=args.trtexec,
            timeout_s=args.timeout_s, progress_s=args.progress_s,
            timing_cache_seed=args.timing_cache_seed, prebuilt_dir=args.prebuilt_dir, out=out,
        )
    except BuildError as exc:
        say(str(exc), out)
        return exc.code
    except Terminated:
        say("stopped by SIGTERM; trtexec stopped, temporary files removed", out)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
