"""A Jetson bundle's TensorRT plan, built on a reference device over ssh, and its check in verify.

``edgepack engine build BUNDLE --on ssh://[USER@]HOST[:PORT]`` (packager/commands/engine.py)
calls :func:`build_engine_on` through the backend. On the device, in a private directory made
by ``mktemp -d`` (mode 0700) and removed afterwards whatever happens:

1. the bundle's ONNX model (taken from the image's ``model`` layer and checked against the
   manifest's digest), the on-device builder (packager/runtime/engine_key.py, trtexec.py,
   jetson_preflight.py, engine_build.py as the package ``edgepack_runtime``), jetson_preflight.py
   again on its own (run by the system python3), and the bundle's
   ``engine/timing.cache`` when it has one, are copied (scp);
2. the device's identity is read with jetson_preflight's own readers (L4T release from
   ``/etc/nv_tegra_release``, SM from the SoC, TensorRT of its JetPack) and compared with the
   bundle's range and engine key: a device of another model is refused, one line per mismatch,
   before any build;
3. ``python3 -m edgepack_runtime.engine_build`` runs with the bundle's key (the same builder
   and trtexec command line as the first-boot unit), its progress relayed, bounded by
   ``--timeout`` (engine_build's own limit, then coreutils ``timeout``, then the ssh client);
4. the plan and its key file are copied back (sizes checked first) and the key file must equal
   the manifest's key; otherwise nothing is added.

The files are added as ``engine/<stem>.plan`` and ``engine/<stem>.key.json`` (the layout of
/work/brief/jetson.md); the device's install copies ``engine/`` and the first-boot unit installs
the prebuilt plan when its key equals the expected one (engine_build ``--prebuilt-dir``).

:func:`prebuilt_problems` is verify's side: a prebuilt plan's key file equals the manifest's key,
both files are listed in the manifest, and nothing else sits beside them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from packager.backends.engine_on import AddedFile, EngineBuildOn
from packager.bundle.manifest import MANIFEST, Manifest
from packager.digest import sha256_path
from packager.errors import (
    EdgepackError,
    InputError,
    TargetError,
    ToolFailedError,
    UnsupportedError,
    VerifyError,
)
from packager.image.oci import blob_name, open_source, sniff_compression
from packager.resources import runtime_dir
from packager.runtime.engine_key import (
    KEY_SUFFIX,
    MAX_KEY_BYTES,
    PLAN_SUFFIX,
    EngineKey,
    EngineKeyError,
    read_key,
)
from packager.runtime.jetson_preflight import parse_version
from packager.runtime.trtexec import DEFAULT_TRTEXEC, UnsupportedTensorRT, form
from packager.tools import ssh

ENGINE_DIR = "engine"
TIMING_CACHE = f"{ENGINE_DIR}/timing.cache"
PACKAGE = "edgepack_runtime"
# engine_build imports jetson_preflight (its argparse types), so the package carries it too.
BUILDER_MODULES = ("engine_key.py", "trtexec.py", "jetson_preflight.py", "engine_build.py")
PREFLIGHT = "jetson_preflight.py"
PROBE = "edgepack_probe.py"
MODEL = "model.onnx"
MODEL_LAYER = "model"
# The largest plan accepted back (a plan is about the size of the model's weights, a few GiB at
# most on a 64 GB Orin AGX); checked on the device before copying, so a runaway file never
# fills this disk.
MAX_PLAN_BYTES = 16 * 1024**3
# Seconds for the small steps (mktemp, probe, size check, clean-up); copies get the build's.
STEP_TIMEOUT_S = 120
# Slack between the builder's own limit, coreutils timeout's, and the ssh client's (s).
TIMEOUT_SLACK_S = 30
# engine_build.py's exit codes (packager/runtime/engine_build.py).
_BUILD_EXIT = {2: "bad arguments", 3: "the model is not the bundle's",
               4: "the device's TensorRT is not the bundle's", 5: "trtexec failed",
               6: "it ran past --timeout", 7: "the engines directory could not be written",
               124: "it ran past --timeout", 137: "it ran past --timeout (killed)",
               143: "it was stopped"}

# Runs on the device with its python3 (Python 3.6-safe, like jetson_preflight.py): one JSON line
# with what jetson_preflight's readers find under the root given as argv[1].
PROBE_SOURCE = '''\
import json
import sys

import jetson_preflight as p

root = sys.argv[1]
l4t, l4t_found = p.read_l4t(root)
trt, trt_found = p.host_tensorrt(root, l4t) if l4t is not None else (None, "")
sm, sm_found = p.read_sm(root)
print(json.dumps({"l4t": list(l4t) if l4t else None, "l4t_found": l4t_found,
                  "tensorrt": trt, "tensorrt_found": trt_found, "sm": sm, "sm_found": sm_found}))
'''


def _device(manifest: Manifest) -> dict[str, Any]:
    device = manifest.device
    return dict(device) if isinstance(device, dict) else {}


def expected_key(root: Path, manifest: Manifest) -> EngineKey:
    """The engine key the bundle's manifest expects; UnsupportedError (exit 10) when the bundle
    builds no engine (a generation served by onnxruntime on the CPU), VerifyError when the
    section is malformed."""
    raw = _device(manifest).get("engine_key")
    if raw is None:
        raise UnsupportedError(
            f"{root / MANIFEST}: device.engine_key: this bundle builds no TensorRT engine "
            "(it serves with onnxruntime on the CPU), so there is no plan to prebuild")
    try:
        return EngineKey.from_dict(raw)
    except EngineKeyError as exc:
        raise VerifyError(f"{root / MANIFEST}: device.engine_key: {exc}") from None


def engine_paths(key: EngineKey) -> tuple[str, str]:
    """(``engine/<stem>.plan``, ``engine/<stem>.key.json``), bundle-relative."""
    return f"{ENGINE_DIR}/{key.stem}{PLAN_SUFFIX}", f"{ENGINE_DIR}/{key.stem}{KEY_SUFFIX}"


def extract_model(root: Path, manifest: Manifest, dest: Path) -> Path:
    """Write the bundle's ONNX model (the file in the image's ``model`` layer whose sha256 is
    the manifest's model digest) to ``dest``; InputError when the image has no such file.

    Reads the layer as a stream, never extracting anything but that one regular file, at most
    the manifest's model size."""
    image = manifest.image
    layer = next((entry for entry in image.layers if entry.name == MODEL_LAYER), None) \
        if image is not None else None
    if image is None or layer is None:
        raise InputError(f"{root / MANIFEST}: image.layers: no '{MODEL_LAYER}' layer to take "
                         "the ONNX model from")
    digest = manifest.model.digest.removeprefix("sha256:")
    name = Path(manifest.model.source).stem
    with open_source(root / image.archive) as source:
        blob = blob_name(layer.digest)
        if not source.exists(blob):
            raise InputError(f"{root / image.archive}: {blob} (the model layer) is missing")
        with source.open(blob) as raw:
            head = raw.read(512)
        compression = sniff_compression(head)
        with source.open(blob) as raw:
            if compression == "zstd":
                from packager.tools.zstd import decompressing

                with decompressing(raw) as stream:
                    found = _model_member(stream, digest, manifest.model.size_bytes, dest)
            else:
                found = _model_member(raw, digest, manifest.model.size_bytes, dest)
    if not found:
        raise InputError(f"{root / image.archive}: the model layer holds no file with the "
                         f"manifest's model digest sha256:{digest} ({name})")
    return dest


def _model_member(stream: Any, digest: str, size: int, dest: Path) -> bool:
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg() or member.size != size:
                    continue
                data = tar.extractfile(member)
                if data is None:
                    continue
                content = data.read(size + 1)
                if len(content) == size and hashlib.sha256(content).hexdigest() == digest:
                    dest.write_bytes(content)
                    return True
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"the image's model layer is not a readable tar ({exc})") from None
    return False


def _upload_tree(root: Path, manifest: Manifest, upload: Path) -> None:
    """What goes to the device: the model, the builder package, the preflight readers, the probe
    and the bundle's timing cache."""
    upload.mkdir(parents=True)
    extract_model(root, manifest, upload / MODEL)
    package = upload / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text('"""edgepack\'s engine builder (copied by '
                                         'edgepack engine build --on)."""\n')
    for name in BUILDER_MODULES:
        shutil.copyfile(runtime_dir() / name, package / name)
    shutil.copyfile(runtime_dir() / PREFLIGHT, upload / PREFLIGHT)
    (upload / PROBE).write_text(PROBE_SOURCE)
    cache = root / TIMING_CACHE
    if cache.is_file() and not cache.is_symlink():
        shutil.copyfile(cache, upload / "timing.cache")


def _check_device(job: EngineBuildOn, remote: str, key: EngineKey,
                  l4t: dict[str, Any]) -> None:
    """The reference device is a device of this bundle: L4T in range, same TensorRT, same SM."""
    lines: list[str] = []
    finished = ssh.run(
        job.host, job.ssh,
        ["sh", "-c", 'cd -- "$1" && shift && exec "$@"', "sh", remote,
         job.python, PROBE, job.device_root],
        timeout_s=STEP_TIMEOUT_S, on_line=lines.append, what="reading the device's identity",
    )
    document: Any = None
    if finished.returncode == 0 and lines:
        try:
            document = json.loads(lines[-1][:4096])
        except ValueError:
            document = None
    if not isinstance(document, dict):
        raise ToolFailedError(
            f"{job.host.url}: could not read the device's identity with {job.python} "
            f"(exit {finished.returncode}): {finished.last()}",
            hint="the reference device must be a Jetson with python3 (pass --python PATH)")
    problems: list[str] = []
    low, below = str(l4t.get("min", "")), str(l4t.get("below", ""))
    found = document.get("l4t")
    if low and below:
        wanted = (parse_version(low), parse_version(below))
        if not isinstance(found, list) or not wanted[0] <= tuple(found) < wanted[1]:
            problems.append(f"L4T release: expected {low} up to (not incl.) {below}, found "
                            f"{document.get('l4t_found')}")
    if document.get("tensorrt") != key.tensorrt:
        problems.append(f"TensorRT: expected {key.tensorrt}, found "
                        f"{document.get('tensorrt') or 'unknown'} "
                        f"({document.get('tensorrt_found')})")
    if document.get("sm") != key.sm:
        problems.append(f"SM: expected sm{key.sm}, found {document.get('sm_found')}")
    if problems:
        raise TargetError(
            f"{job.host.url} is not a device of this bundle: {problems[0]}",
            hint="build on a reference device of the same module and JetPack",
            details=tuple(problems[1:]),
        )


def build_argv(job: EngineBuildOn, key: EngineKey, remote: str, timing_cache: bool) -> list[str]:
    """The remote argv: in ``remote``, coreutils ``timeout`` around the on-device builder."""
    engines = f"{remote}/engines"
    argv = [
        "sh", "-c", 'cd -- "$1" && shift && exec "$@"', "sh", remote,
        "timeout", "-k", "10", str(job.timeout_s + TIMEOUT_SLACK_S),
        job.python, "-m", f"{PACKAGE}.engine_build",
        "--model", f"{remote}/{MODEL}",
        "--model-sha256", key.model_sha256,
        "--tensorrt", key.tensorrt,
        "--sm", str(key.sm),
        "--precision", key.precision,
        "--dla-core", "none" if key.dla_core is None else str(key.dla_core),
        "--workspace-mib", str(key.workspace_mib),
        "--engines-dir", engines,
        "--trtexec", job.trtexec or DEFAULT_TRTEXEC,
        "--timeout-s", str(job.timeout_s),
        "--progress-s", str(job.progress_s),
    ]  # fmt: skip
    if timing_cache:
        argv += ["--timing-cache-seed", f"{remote}/timing.cache"]
    for directory in job.lib_dirs:
        argv += ["--lib-dir", directory]
    return argv


def _remote_sizes(job: EngineBuildOn, paths: tuple[str, str]) -> tuple[int, int]:
    lines: list[str] = []
    finished = ssh.run(job.host, job.ssh, ["stat", "-c", "%s", "--", *paths],
                       timeout_s=STEP_TIMEOUT_S, on_line=lines.append, what="stat")
    sizes = [line.strip() for line in lines if line.strip()]
    # ASCII digits, whole line, at most 18 (beyond any limit): str.isdigit() also passes '²',
    # which int() refuses, and int() refuses over 4300 digits.
    if finished.returncode != 0 or len(sizes) != 2 or not all(
        re.fullmatch(r"[0-9]{1,18}", s) for s in sizes
    ):
        raise ToolFailedError(f"{job.host.url}: the build reported success but left no plan "
                              f"and key file: {finished.last()}")
    plan, key = int(sizes[0]), int(sizes[1])
    if plan == 0 or plan > MAX_PLAN_BYTES:
        raise ToolFailedError(f"{job.host.url}: {paths[0]}: {plan} bytes is not a plan "
                              f"(1 byte .. {MAX_PLAN_BYTES} bytes)")
    if key > MAX_KEY_BYTES:
        raise ToolFailedError(f"{job.host.url}: {paths[1]}: {key} bytes is not a key file")
    return plan, key


def _make_remote_dir(job: EngineBuildOn) -> str:
    lines: list[str] = []
    finished = ssh.run(
        job.host, job.ssh,
        ["sh", "-c", 'umask 077 && mktemp -d "${TMPDIR:-/tmp}/edgepack-engine.XXXXXXXXXX"'],
        timeout_s=STEP_TIMEOUT_S, on_line=lines.append, what="mktemp",
    )
    path = lines[-1].strip() if lines else ""
    if finished.returncode != 0 or not ssh.REMOTE_PATH.fullmatch(path) or "/../" in path + "/":
        raise ToolFailedError(f"{job.host.url}: could not make a private directory "
                              f"(mktemp -d): {finished.last()}")
    return path


def _remove_remote_dir(job: EngineBuildOn, remote: str) -> None:
    try:
        finished = ssh.run(job.host, job.ssh, ["rm", "-rf", "--", remote],
                           timeout_s=STEP_TIMEOUT_S, what="clean-up")
    except EdgepackError as exc:
        job.on_line(f"warning: {remote} on the device was not removed: {exc.one_line()}")
        return
    if finished.returncode != 0:
        job.on_line(f"warning: {remote} on the device was not removed: {finished.last()}")


def build_engine_on(root: Path, manifest: Manifest, job: EngineBuildOn) -> tuple[AddedFile, ...]:
    """Build the bundle's plan on ``job.host`` (module docstring); the plan and key file to add.

    Raises UnsupportedError (no engine in this bundle, or a TensorRT without a known trtexec
    command line), TargetError (the device is not one of this bundle), ToolFailedError (ssh,
    scp or the build failed, or it ran past ``job.timeout_s``), VerifyError (the key that came
    back is not the manifest's). Nothing is added in any of these cases.
    """
    key = expected_key(root, manifest)
    try:
        form(key.tensorrt)
    except UnsupportedTensorRT as exc:
        raise UnsupportedError(f"{root / MANIFEST}: device.engine_key.{exc}") from None
    l4t = _device(manifest).get("l4t")
    upload = job.work / "upload"
    _upload_tree(root, manifest, upload)
    fetched = job.work / "fetched"
    fetched.mkdir()
    plan_rel, key_rel = engine_paths(key)
    remote = _make_remote_dir(job)
    job.on_line(f"{job.host.url}: working in {remote}")
    try:
        ssh.copy_to(job.host, job.ssh, sorted(upload.iterdir()), remote,
                    timeout_s=max(STEP_TIMEOUT_S, job.timeout_s))
        _check_device(job, remote, key, l4t if isinstance(l4t, dict) else {})
        job.on_line(f"{job.host.url}: building {key.stem} (first builds take minutes; "
                    f"stops after {job.timeout_s} s)")
        finished = ssh.run(
            job.host, job.ssh, build_argv(job, key, remote, (upload / "timing.cache").is_file()),
            timeout_s=job.timeout_s + 2 * TIMEOUT_SLACK_S, on_line=job.on_line,
            what="engine build",
        )
        if finished.returncode != 0:
            why = _BUILD_EXIT.get(finished.returncode, f"exit {finished.returncode}")
            raise ToolFailedError(f"{job.host.url}: the engine build failed ({why}): "
                                  f"{finished.last(2)}")
        built_plan = f"{remote}/engines/{key.model_sha256}/{key.stem}{PLAN_SUFFIX}"
        built_key = f"{remote}/engines/{key.model_sha256}/{key.stem}{KEY_SUFFIX}"
        _remote_sizes(job, (built_plan, built_key))
        ssh.copy_from(job.host, job.ssh, [built_plan, built_key], fetched,
                      timeout_s=max(STEP_TIMEOUT_S, job.timeout_s))
    finally:
        _remove_remote_dir(job, remote)
    plan_file = fetched / Path(plan_rel).name
    key_file = fetched / Path(key_rel).name
    for path in (plan_file, key_file):
        if path.is_symlink() or not path.is_file():
            raise ToolFailedError(f"{job.host.url}: {path.name} did not come back from the device")
    try:
        found = read_key(key_file)
    except EngineKeyError as exc:
        raise VerifyError(f"{job.host.url}: {key_rel}: {exc}; the plan is not added") from None
    if found != key:
        raise VerifyError(
            f"{job.host.url}: {key_rel}: expected key {key.to_json()}, found {found.to_json()}; "
            "the plan is not added")
    if plan_file.stat().st_size == 0:
        raise ToolFailedError(f"{job.host.url}: {plan_rel} came back empty")
    canonical = job.work / "key.json"
    canonical.write_text(key.to_json(), encoding="ascii")
    return (AddedFile(path=plan_rel, source=plan_file), AddedFile(path=key_rel, source=canonical))


def prebuilt_problems(root: Path, manifest: Manifest, key: EngineKey | None) -> list[str]:
    """verify: a prebuilt plan in ``engine/`` is the manifest's (one line each, naming the file):
    its key file is readable and equals ``key`` (``device.engine_key``, already read strictly by
    the caller: :func:`packager.backends.jetson.backend.check_engine_key`; None when the bundle
    builds no engine, and then ``engine/`` holds no plan or key file), plan and key file come as
    a pair and are both listed in manifest.json with their sha256, and no other plan or key
    file is there."""
    directory = root / ENGINE_DIR
    if not directory.is_dir() or directory.is_symlink():
        return []
    names = sorted(p.name for p in directory.iterdir()
                   if p.name.endswith((PLAN_SUFFIX, KEY_SUFFIX)))
    if not names:
        return []
    if key is None:
        return [f"{root / MANIFEST}: device.engine_key: none (this bundle builds no TensorRT "
                f"engine), but {ENGINE_DIR}/{names[0]} is there"]
    plan_rel, key_rel = engine_paths(key)
    problems: list[str] = []
    for name in names:
        if f"{ENGINE_DIR}/{name}" not in (plan_rel, key_rel):
            problems.append(f"{ENGINE_DIR}/{name}: not this bundle's plan (its engine key's "
                            f"files are {plan_rel} and {key_rel})")
    listed = {entry.path: entry for entry in manifest.files}
    present = [rel for rel in (plan_rel, key_rel) if (root / rel).is_file()]
    if len(present) == 1:
        missing = key_rel if present[0] == plan_rel else plan_rel
        problems.append(f"{present[0]}: without {missing} (a plan is loaded only with its key)")
    for rel in present:
        if rel not in listed:
            problems.append(f"{rel}: not listed in manifest.json")
    if (root / key_rel).is_file():
        try:
            # Bounded and checked like the device reads it (packager.runtime.engine_key).
            found = read_key(root / key_rel)
        except EngineKeyError as exc:
            problems.append(f"{key_rel}: {str(exc).replace(str(root / key_rel) + ': ', '')}")
        else:
            if found != key:
                problems.append(
                    f"{key_rel}: key differs from manifest.json's device.engine_key: "
                    + "; ".join(key.differences(found)))
    if (root / plan_rel).is_file() and plan_rel in listed:
        digest = sha256_path(root / plan_rel)[0]
        if digest != listed[plan_rel].sha256:
            problems.append(f"{plan_rel}: sha256 {digest[:16]}... is not the one listed")
    return problems
