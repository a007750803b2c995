#!/usr/bin/env python3
"""Jetson preflight: is this device the one the bundle was made for? Runs before anything else.

Runs on the Jetson HOST with the system ``python3`` as the first step of the first-boot engine
unit (templates/jetson/engine-build.service.jinja). JetPack 4 hosts are Ubuntu 18.04 with
Python 3.6, so this file stands alone and keeps to Python 3.6: standard library only, no
imports from the rest of edgepack, annotations as strings, no ``dataclasses``, no
``subprocess.run(capture_output=/text=)``. tests/unit/runtime/test_jetson_preflight.py parses it
with Python 3.6's grammar.

Checks, each mismatch ONE line ``preflight: <check>: expected <E>, found <F>[ (<hint>)]``:

- L4T release (``/etc/nv_tegra_release``: ``# R36 (release), REVISION: 3.0, ...``) inside the
  bundle's range ``--l4t-min`` (inclusive) .. ``--l4t-below`` (exclusive).
- TensorRT: the release the host's JetPack provides (``--tensorrt``, major.minor.patch). On
  JetPack 4 the container gets TensorRT from the host (the NVIDIA runtime's CSV mounts), so the
  host's ``libnvinfer8`` package (``/var/lib/dpkg/status``) is what runs; from JetPack 5 the
  container carries its own, and the host's L4T release must be the JetPack generation that
  ships the bundle's TensorRT (:data:`JETPACK_TENSORRT`). With ``--image``, the container's own
  ``libnvinfer.so.X.Y.Z`` is checked too (one ``<engine> run``).
- SM (compute capability) of the GPU, from the SoC: ``/proc/device-tree/compatible`` names
  ``nvidia,tegra210|186|194|234``; else ``/sys/module/tegra_fuse/parameters/tegra_chip_id``
  (decimal: 33 = 0x21 T210, 24 = 0x18 T186, 25 = 0x19 T194, 35 = 0x23 T234). Jetson has no
  ``nvidia-smi``. SMs: T210 Nano/TX1 5.3, T186 TX2 6.2, T194 Xavier 7.2, T234 Orin 8.7 (NVIDIA
  "CUDA GPUs" compute capability table; jetson-containers l4t_version.get_cuda_arch).
- Container runtime with NVIDIA support. docker: ``docker info`` lists the ``nvidia`` runtime
  (nvidia-container-runtime; JetPack installs it for docker on every generation, and the unit
  runs ``--runtime nvidia``). podman: a CDI spec for ``nvidia.com/gpu`` at
  ``/etc/cdi/nvidia.yaml`` or ``/var/run/cdi/nvidia.yaml`` (``nvidia-ctk cdi generate``;
  JetPack 6's toolkit does, JetPack 4/5's does not: use docker there), and the unit runs
  ``--device nvidia.com/gpu=all``.
- Free disk under the engines directory (``--min-free-mib``): a plan plus trtexec's temporary
  files.

``--root`` points every file read at a fixture tree (tests); commands still run for real.

Facts mode, ``jetson_preflight.py --facts [--root DIR]``: no checks, ONE JSON object on stdout
(sorted keys, ASCII, one line) and exit 0 whatever the device is::

    {"l4t": "r36.3.0" | null, "l4t_found": "...", "schema": "edgepack.device-facts/v1",
     "sm": 87 | null, "sm_found": "..."}

``l4t``/``sm`` are what :func:`read_l4t`/:func:`read_sm` read (null when they could not), the
``*_found`` texts what they say was there. The OTA agent (packager/agent/device.py) learns the
device's facts for a release's ``compat.requires`` by running this file, the bundle's copy
installed at /opt/edgepack/<name>/ (templates/jetson/install.sh.jinja), so the SoC and L4T
rules live here only; they change on a device when a bundle's install.sh runs there (not with a
release installed over the air). Only ``--root`` goes with ``--facts``.

Exit codes: 0 every check passed (facts mode: the facts were printed); 1 the device does not
match (the lines say how); 2 bad arguments (argparse's own code).
"""

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2

# L4T release (major, minor) -> the TensorRT its JetPack ships (NVIDIA JetPack release notes /
# archive: 4.6.1-4.6.6 = r32.7.x TRT 8.2.1; 5.0.2 = r35.1 TRT 8.4.1; 5.1-5.1.5 = r35.2-r35.6
# TRT 8.5.2; 6.0 DP/GA = r36.2/r36.3 TRT 8.6.2; 6.1/6.2 = r36.4 TRT 10.3.0).
JETPACK_TENSORRT = {
    (32, 6): "8.0.1",
    (32, 7): "8.2.1",
    (35, 1): "8.4.1",
    (35, 2): "8.5.2",
    (35, 3): "8.5.2",
    (35, 4): "8.5.2",
    (35, 5): "8.5.2",
    (35, 6): "8.5.2",
    (36, 2): "8.6.2",
    (36, 3): "8.6.2",
    (36, 4): "10.3.0",
}
# Tegra SoC -> CUDA compute capability (sm).
SOC_SM = {"tegra210": 53, "tegra186": 62, "tegra194": 72, "tegra234": 87}
CHIP_ID_SOC = {33: "tegra210", 24: "tegra186", 25: "tegra194", 35: "tegra234"}
CDI_SPECS = ("etc/cdi/nvidia.yaml", "var/run/cdi/nvidia.yaml")
ENGINES_DIR = "/var/lib/edgepack/engines"
LIB_DIRS = ("/usr/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu/nvidia")
# Bounded waits for the engine's answers (a hung daemon must not hang boot).
INFO_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 300
MAX_READ = 1 << 20
# The facts mode's output (packager/agent/device.py parses exactly this schema).
FACTS_SCHEMA = "edgepack.device-facts/v1"
# The check mode's options; none of them goes with --facts.
CHECK_REQUIRED = ("l4t_min", "l4t_below", "tensorrt", "sm", "engine")

_RELEASE_LINE = re.compile(r"# R([0-9]{1,3}) \(release\), REVISION: ([0-9]{1,3})\.([0-9]{1,3})\b")
_VERSION3 = re.compile(r"r?(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})")
_LIBNVINFER = re.compile(r"libnvinfer\.so\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\b")
_DPKG_VERSION = re.compile(r"(?:[0-9]+:)?([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_CDI_KIND = re.compile(r"""^kind:\s*["']?nvidia\.com/gpu["']?\s*$""", re.MULTILINE)


def parse_version(text: "str") -> "tuple[int, int, int]":
    """``"r36.3.0"`` or ``"36.3.0"`` -> (36, 3, 0); ValueError otherwise."""
    match = _VERSION3.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a release like r36.3.0")
    return (int(match.group(1)), int(match.group(2)), int(match.group(3)))


def show(version: "tuple[int, int, int]") -> str:
    """(36, 3, 0) -> ``"r36.3.0"``, the form ``/etc/nv_tegra_release`` releases are named in."""
    return "r{}.{}.{}".format(*version)


def show_range(low: "tuple[int, int, int]", below: "tuple[int, int, int]") -> str:
    """r36.0.0 .. below r36.4.0, read as a person would say it."""
    if below == (low[0] + 1, 0, 0):
        if low[1:] == (0, 0):
            return f"r{low[0]}.x"
        return f"r{low[0]}.x from {show(low)}"
    if below == (low[0], low[1] + 1, 0) and low[2] == 0:
        return f"r{low[0]}.{low[1]}.x"
    if below[0] == low[0] and low[1:] == (0, 0):
        return f"r{low[0]}.x below {show(below)}"
    return f"{show(low)} up to (not incl.) {show(below)}"


def supported_l4t_range(l4t: str) -> "tuple[tuple[int, int, int], tuple[int, int, int]]":
    """The L4T releases a bundle for L4T ``l4t`` runs on: (lowest, first one above).

    JetPack containers run on the hosts of their own generation only (jetson-containers,
    l4t_version.l4t_version_compatible): r32.7+ containers on r32.7.x hosts; r34 on r34; r35
    on r35.x ("JetPack 5.1 can run other JetPack 5.1.x containers"); r36 below r36.4 on r36.0 -
    r36.3 and r36.4+ on r36.4+ (JetPack 6.1 changed the container contract). Anything else: the
    exact release.
    """
    major, minor, patch = parse_version(l4t)
    if major == 32 and minor >= 7:
        return (32, 7, 0), (33, 0, 0)
    if major in (34, 35):
        return (major, 0, 0), (major + 1, 0, 0)
    if major == 36:
        return ((36, 0, 0), (36, 4, 0)) if minor < 4 else ((36, 4, 0), (37, 0, 0))
    return (major, minor, patch), (major, minor, patch + 1)


def _read(root: str, path: str) -> "bytes | None":
    """At most MAX_READ bytes of ``root/path``, or None when it cannot be read or is not a
    regular file (a FIFO there would block the boot's preflight forever; O_NONBLOCK opens it
    without waiting for a writer). procfs and sysfs files are regular files."""
    try:
        descriptor = os.open(os.path.join(root, path.lstrip("/")), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        os.set_blocking(descriptor, True)
        with os.fdopen(descriptor, "rb") as handle:
            descriptor = -1
            return handle.read(MAX_READ)
    except OSError:
        return None
    finally:
        if descriptor >= 0:
            os.close(descriptor)


def read_l4t(root: str) -> "tuple[tuple[int, int, int] | None, str]":
    """(release, what was found) from ``/etc/nv_tegra_release``'s first line."""
    raw = _read(root, "etc/nv_tegra_release")
    if raw is None:
        return None, "no /etc/nv_tegra_release (not a Jetson, or L4T not installed)"
    first = raw.decode("utf-8", "replace").splitlines()[:1]
    match = _RELEASE_LINE.match(first[0]) if first else None
    if match is None:
        line = first[0][:80] if first else ""
        return None, f"an unreadable /etc/nv_tegra_release ({line!a})"
    version = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
    return version, show(version)


def _dpkg_tensorrt(root: str) -> "str | None":
    """The ``libnvinfer8``/``libnvinfer10`` version dpkg records (``8.2.1-1+cuda10.2`` -> 8.2.1)."""
    raw = _read(root, "var/lib/dpkg/status")
    if raw is None:
        return None
    for stanza in raw.decode("utf-8", "replace").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if not re.fullmatch(r"libnvinfer[0-9]{1,2}", fields.get("Package", "")):
            continue
        if "installed" not in fields.get("Status", "").split():
            continue
        match = _DPKG_VERSION.match(fields.get("Version", ""))
        if match:
            return "{}.{}.{}".format(*(int(part) for part in match.groups()))
    return None


def host_tensorrt(root: str, l4t: "tuple[int, int, int]") -> "tuple[str | None, str]":
    """(TensorRT release, its source) for this host's L4T release."""
    shipped = JETPACK_TENSORRT.get(l4t[:2])
    if l4t[0] == 32:
        # JetPack 4: the NVIDIA runtime mounts the host's TensorRT into the container.
        installed = _dpkg_tensorrt(root)
        if installed is not None:
            return installed, "host libnvinfer8 package, mounted into the container"
    if shipped is None:
        return None, f"L4T {show(l4t)} is not in edgepack's JetPack table"
    return shipped, f"shipped with L4T {show(l4t)}"


def read_sm(root: str) -> "tuple[int | None, str]":
    """(compute capability as NN, what was found) from the SoC's identity."""
    raw = _read(root, "proc/device-tree/compatible")
    if raw is not None:
        for entry in raw.decode("ascii", "replace").split("\0"):
            soc = entry.strip()
            if soc.startswith("nvidia,") and soc[len("nvidia,"):] in SOC_SM:
                name = soc[len("nvidia,"):]
                return SOC_SM[name], f"sm{SOC_SM[name]} ({name})"
    raw = _read(root, "sys/module/tegra_fuse/parameters/tegra_chip_id")
    if raw is not None:
        text = raw.decode("ascii", "replace").strip()
        if re.fullmatch(r"[0-9]{1,3}", text) and int(text) in CHIP_ID_SOC:
            name = CHIP_ID_SOC[int(text)]
            return SOC_SM[name], f"sm{SOC_SM[name]} ({name}, chip id {text})"
        return None, f"an unknown Tegra chip id {text[:16]!r}"
    return None, "no Tegra SoC (no nvidia,tegra* in /proc/device-tree/compatible, no tegra_chip_id)"


def facts(root: str) -> "dict[str, object]":
    """The facts mode's object: this device's L4T release and SM (None where unreadable) and
    what was found, as :data:`FACTS_SCHEMA` (see the module docstring)."""
    l4t, l4t_found = read_l4t(root)
    sm, sm_found = read_sm(root)
    return {
        "schema": FACTS_SCHEMA,
        "l4t": show(l4t) if l4t is not None else None,
        "l4t_found": l4t_found,
        "sm": sm,
        "sm_found": sm_found,
    }


def _run(argv: "list[str]", timeout: int) -> "tuple[int | None, str]":
    """(exit code or None when it could not run or timed out, stdout + stderr, bounded)."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout} s"
    except OSError as exc:
        return None, str(exc.strerror or exc)
    return proc.returncode, proc.stdout[:MAX_READ].decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:120] if lines else ""


def gpu_run_args(engine: str) -> "list[str]":
    """The ``<engine> run`` arguments that give a container the Jetson GPU."""
    if os.path.basename(engine) == "podman":
        return ["--device", "nvidia.com/gpu=all"]
    return ["--runtime", "nvidia"]


def check_runtime(engine: str, root: str) -> "str | None":
    """None when ``engine`` can run NVIDIA containers, else the mismatch line's tail."""
    name = os.path.basename(engine)
    if name not in ("docker", "podman"):
        return f"expected docker or podman, found {engine!r}"
    if not (os.path.isfile(engine) and os.access(engine, os.X_OK)):
        return f"expected {name} at {engine}, found no executable there"
    if name == "podman":
        for spec in CDI_SPECS:
            raw = _read(root, spec)
            if raw is not None and _CDI_KIND.search(raw.decode("utf-8", "replace")):
                return None
        return (
            "expected a CDI spec for nvidia.com/gpu (/etc/cdi/nvidia.yaml), found none "
            "(run: nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml; "
            "on JetPack 4/5 use docker)"
        )
    code, out = _run([engine, "info", "--format", "{{json .Runtimes}}"], INFO_TIMEOUT_S)
    if code != 0:
        return f"expected docker info to answer, found {_last_line(out) or code}"
    try:
        runtimes = json.loads(out)
    except ValueError:
        runtimes = None
    if not isinstance(runtimes, dict):
        return f"expected docker info's runtimes as JSON, found {out.strip()[:120]!r}"
    if "nvidia" not in runtimes:
        names = ", ".join(sorted(str(name) for name in runtimes)) or "none"
        return (
            f"expected the nvidia runtime in docker info, found {names} "
            "(install nvidia-container-runtime)"
        )
    return None


def container_tensorrt(engine: str, image: str) -> "tuple[str | None, str]":
    """(TensorRT release, detail) of ``image``'s own libnvinfer, run with the GPU runtime."""
    script = "ls {} 2>/dev/null".format(" ".join(LIB_DIRS))
    argv = [engine, "run", "--rm", "--network", "none", *gpu_run_args(engine),
            "--entrypoint", "/bin/sh", image, "-c", script]
    code, out = _run(argv, PROBE_TIMEOUT_S)
    versions = sorted({".".join(str(int(p)) for p in m) for m in _LIBNVINFER.findall(out)})
    if len(versions) == 1:
        return versions[0], f"libnvinfer.so.{versions[0]} in {image}"
    if versions:
        return None, "several ({}) in {}".format(", ".join(versions), image)
    if code is None or code != 0:
        tool = os.path.basename(engine)
        return None, f"no answer from {tool} run {image} ({_last_line(out) or code})"
    return None, f"no libnvinfer.so.X.Y.Z in {image}"


def free_mib(root: str, engines_dir: str) -> "tuple[int, str]":
    """(free MiB, the directory measured): the engines dir, or its nearest existing parent."""
    # Absolute, so the walk up ends at "/" (a relative --root that does not exist would end
    # at "" and disk_usage("") raises).
    path = os.path.abspath(os.path.join(root, engines_dir.lstrip("/")))
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free // (1024 * 1024), path


def preflight(args: argparse.Namespace) -> "list[str]":
    """Every mismatch as one line (empty when the device fits the bundle)."""
    problems = []
    low, below = parse_version(args.l4t_min), parse_version(args.l4t_below)
    wanted_l4t = show_range(low, below)
    l4t, found_l4t = read_l4t(args.root)
    if l4t is None or not low <= l4t < below:
        problems.append(f"L4T release: expected {wanted_l4t}, found {found_l4t}")
    wanted_trt = ".".join(str(part) for part in parse_version(args.tensorrt))
    if l4t is not None:
        trt, source = host_tensorrt(args.root, l4t)
        if trt != wanted_trt:
            problems.append("TensorRT: expected {}, found {} ({})".format(
                wanted_trt, trt or "unknown", source))
    sm, found_sm = read_sm(args.root)
    if sm != args.sm:
        problems.append(f"SM: expected sm{args.sm}, found {found_sm}")
    runtime = check_runtime(args.engine, args.root)
    if runtime is not None:
        problems.append("container runtime: " + runtime)
    elif args.image:
        trt, detail = container_tensorrt(args.engine, args.image)
        if trt != wanted_trt:
            problems.append("TensorRT in the container: expected {}, found {} ({})".format(
                wanted_trt, trt or "none", detail))
    free, measured = free_mib(args.root, args.engines_dir)
    if free < args.min_free_mib:
        problems.append(
            f"free disk: expected {args.min_free_mib} MiB free under {measured}, found {free} MiB"
        )
    return problems


def _version_arg(text: str) -> str:
    try:
        parse_version(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def positive_int(text: str) -> int:
    """argparse type: a whole number 1..999999999 (no sign, no blanks); also engine_build's."""
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def parser() -> argparse.ArgumentParser:
    """The command line. The check mode's options are required without ``--facts`` and refused
    with it: :func:`parse_args` checks that (argparse's required=True cannot depend on a flag)."""
    cli = argparse.ArgumentParser(
        prog="jetson_preflight.py",
        description="Check that this Jetson matches the edgepack bundle (exit 0 yes, 1 no); "
        "with --facts, print what this device is as JSON.",
    )
    cli.add_argument("--facts", action="store_true",
                     help="print this device's L4T release and SM as JSON, check nothing")
    cli.add_argument("--l4t-min", type=_version_arg, help="lowest L4T, e.g. r36.0.0")
    cli.add_argument("--l4t-below", type=_version_arg,
                     help="first L4T above the range, e.g. r36.4.0")
    cli.add_argument("--tensorrt", type=_version_arg, help="e.g. 8.6.2")
    cli.add_argument("--sm", type=positive_int, help="compute capability, e.g. 87")
    cli.add_argument("--engine", help="path of docker or podman")
    cli.add_argument("--image", default=None, help="check this image's TensorRT too")
    cli.add_argument("--engines-dir", default=None, help="default " + ENGINES_DIR)
    cli.add_argument("--min-free-mib", type=positive_int, default=None, help="default 1024")
    cli.add_argument("--root", default="/", help="read device files under this directory")
    return cli


def parse_args(argv: "list[str] | None" = None) -> argparse.Namespace:
    """The parsed command line; a usage error (exit 2, argparse's message) when a check-mode
    option is missing without ``--facts`` or given with it."""
    cli = parser()
    args = cli.parse_args(argv)
    optional = ("image", "engines_dir", "min_free_mib")
    if args.facts:
        given = [name for name in CHECK_REQUIRED + optional if getattr(args, name) is not None]
        if given:
            cli.error("--facts takes only --root, not " + ", ".join(
                "--" + name.replace("_", "-") for name in given))
        return args
    missing = [name for name in CHECK_REQUIRED if getattr(args, name) is None]
    if missing:
        cli.error("the following arguments are required: " + ", ".join(
            "--" + name.replace("_", "-") for name in missing))
    defaults = (("image", ""), ("engines_dir", ENGINES_DIR), ("min_free_mib", 1024))
    for name, value in defaults:
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: "list[str] | None" = None) -> int:
    """Print the facts (``--facts``) or run the checks; the exit code: 0 match (or facts
    printed), 1 mismatch (one ``preflight:`` line per problem on stderr), 2 bad arguments."""
    args = parse_args(argv)
    if args.facts:
        print(json.dumps(facts(args.root), sort_keys=True), flush=True)  # noqa: T201
        return EXIT_OK
    if parse_version(args.l4t_min) >= parse_version(args.l4t_below):
        print("preflight: --l4t-min must be below --l4t-below", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    problems = preflight(args)
    for line in problems:
        print("preflight: " + line, file=sys.stderr, flush=True)  # noqa: T201
    if problems:
        return EXIT_MISMATCH
    wanted = show_range(parse_version(args.l4t_min), parse_version(args.l4t_below))
    engine = os.path.basename(args.engine)
    print(  # noqa: T201
        f"preflight: ok: this device matches the bundle (L4T {wanted}, TensorRT {args.tensorrt}, "
        f"sm{args.sm}, {engine})",
        flush=True,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
