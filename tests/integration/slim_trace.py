"""Run an image under podman (arm64 under qemu-user, amd64 natively) with every file it touches
recorded.

Two recorders, both inside the container and neither part of the image:

- a Python audit hook (``sys.addaudithook``) in a ``sitecustomize`` module that lives in a
  bind-mounted directory put first on ``PYTHONPATH``: every ``open`` (source, bytecode, data, the
  import system's reads), directory listing, ``ctypes.dlopen`` and import, plus the files of the
  modules already loaded before the hook (``preloaded``);
- the dynamic loader's own log (``LD_DEBUG=files``, ``LD_DEBUG_OUTPUT``): every shared object it
  maps or tries, extension modules and their libraries included.

Used by tests/integration/test_slim_image.py and benchmarks/build.py.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from packager.backends.linux.trial import plan_emulation
from packager.bundle.manifest import read_manifest
from packager.image.debian import merged_usr_path
from packager.image.slim import LayerPolicy, layer_policy
from packager.tools.containers import Engine, find_engine
from packager.tools.qemu import needs_emulation

SITE_PACKAGES = "/opt/edgepack/site-packages"
IMAGE_PYTHONPATH = f"/opt/edgepack/runtime:{SITE_PACKAGES}"

# The hook: written into the traced directory as sitecustomize.py. It must not import anything
# the image might lack, and it writes through a file opened before the hook is installed.
HOOK = r"""
import os
import sys

_dir = os.environ.get("EDGEPACK_TRACE_DIR")
if _dir:
    _log = open(os.path.join(_dir, "audit.%d.log" % os.getpid()), "a", encoding="utf-8",
                errors="backslashreplace")

    def _emit(kind, path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return
        _log.write("%s\t%s\n" % (kind, os.path.realpath(path or ".")))
        _log.flush()

    for _module in list(sys.modules.values()):
        _file = getattr(_module, "__file__", None)
        if _file:
            _emit("preloaded", _file)

    def _hook(event, args):
        if event == "open" or event == "os.listdir" or event == "os.scandir":
            _emit(event, args[0] if args else ".")
        elif event == "ctypes.dlopen":
            _emit(event, args[0])
        elif event == "import":
            _log.write("import\t%s\n" % (args[0],))
            _log.flush()

    sys.addaudithook(_hook)
"""

# ld.so's log: "file=NAME [0];  generating link map", "trying file=PATH", "calling init: PATH".
_LD_PATH = re.compile(r"(?:file=|calling init: |calling fini: )(/[^\s;\[\]]+)")


@dataclass(frozen=True)
class Trace:
    """Image paths (relative to the root, merged-/usr) the traced processes touched."""

    paths: frozenset[str]
    events: int  # lines read, for a sanity bound
    modules: frozenset[str]  # imported module names


def prepare_trace_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)  # the runtime runs as uid 10001
    (directory / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    return directory


def trace_env(mount: str = "/trace") -> tuple[tuple[str, str], ...]:
    return (
        ("EDGEPACK_TRACE_DIR", mount),
        ("PYTHONPATH", f"{mount}:{IMAGE_PYTHONPATH}"),
        ("LD_DEBUG", "files"),
        ("LD_DEBUG_OUTPUT", f"{mount}/ld"),
    )


def image_path(path: str) -> str | None:
    """``/lib/x`` -> ``usr/lib/x``; None for what is not in the image (/proc, the trace dir)."""
    if not path.startswith("/"):
        return None
    rel = path.strip("/")
    if not rel or rel.split("/")[0] in ("proc", "sys", "dev", "trace", "tmp"):
        return None
    try:
        return merged_usr_path(rel, "amd64")  # its merged-/usr links are arm64's and lib64
    except ValueError:
        return None


def read_trace(directory: Path) -> Trace:
    paths: set[str] = set()
    modules: set[str] = set()
    events = 0
    for log in sorted(directory.glob("audit.*.log")):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            kind, _, value = line.partition("\t")
            events += 1
            if kind == "import":
                modules.add(value)
            elif (p := image_path(value)) is not None:
                paths.add(p)
    for log in sorted(directory.glob("ld.*")):
        for match in _LD_PATH.finditer(log.read_text(encoding="utf-8", errors="replace")):
            events += 1
            if (p := image_path(match.group(1))) is not None:
                paths.add(p)
    return Trace(frozenset(paths), events, frozenset(modules))


def policies() -> tuple[LayerPolicy, LayerPolicy]:
    return layer_policy("base"), layer_policy("wheels", site_packages=SITE_PACKAGES)


def removed_and_touched(trace: Trace) -> dict[str, str]:
    """Traced path -> the policy entry's glob, for every traced path the policy removes."""
    hits: dict[str, str] = {}
    for policy in policies():
        for path in trace.paths:
            removal = policy.reason(path)
            if removal is not None:
                hits[path] = removal.glob
    return hits


# --- what an image archive holds ---------------------------------------------------------------


def image_files(archive: Path) -> dict[str, list[str] | None]:
    """path -> DT_NEEDED of each ELF file (None for other files, links and directories), all
    layers merged in order (no whiteouts in edgepack images)."""
    files: dict[str, list[str] | None] = {}
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(outer.extractfile(f"blobs/sha256/{manifest_digest}"))  # type: ignore[arg-type]
        for layer in manifest["layers"]:
            blob = outer.extractfile(f"blobs/sha256/{layer['digest'].split(':')[1]}")
            assert blob is not None
            mode = "r|gz" if layer["mediaType"].endswith("gzip") else "r|"
            with tarfile.open(fileobj=blob, mode=mode) as inner:
                for member in inner:
                    stream = inner.extractfile(member) if member.isfile() else None
                    if stream is not None and stream.read(4) == b"\x7fELF":
                        files[member.name] = dt_needed(b"\x7fELF" + stream.read())
                    else:
                        files[member.name] = None
    return files


def dt_needed(head: bytes) -> list[str] | None:
    """DT_NEEDED names of a 64-bit little-endian ELF (its whole bytes); None if not one.

    Reads the program headers, the PT_DYNAMIC segment and the string table it points at."""
    if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(head):
            return []
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", head, off)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []

    def file_offset(vaddr: int) -> int | None:
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return vaddr - start + offset
        return None

    needed: list[int] = []
    strtab: int | None = None
    off, size = dynamic
    for pos in range(off, min(off + size, len(head) - 16), 16):
        tag, value = struct.unpack_from("<qQ", head, pos)
        if tag == 0:
            break
        if tag == 1:
            needed.append(value)
        elif tag == 5:
            strtab = file_offset(value)
    if strtab is None:
        return []
    names = []
    for n in needed:
        start = strtab + n
        end = head.find(b"\0", start)
        if start < len(head) and end != -1:
            names.append(head[start:end].decode())
    return names


def unresolved_needed(files: dict[str, list[str] | None]) -> dict[str, list[str]]:
    """ELF path -> DT_NEEDED names no file or link in the image is called."""
    basenames = {p.rsplit("/", 1)[-1] for p in files}
    missing: dict[str, list[str]] = {}
    for path, names in files.items():
        lost = [n for n in names or [] if n not in basenames]
        if lost:
            missing[path] = lost
    return missing


# --- running it ----------------------------------------------------------------------------------


@dataclass
class Container:
    engine: Engine
    name: str
    url: str
    started: float
    port: int  # the runtime's port inside the container
    ready_after_s: float = 0.0

    def exec(self, *argv: str, env: tuple[tuple[str, str], ...] = ()) -> str:
        args = ["podman", "exec"]
        for key, value in env:
            args += ["-e", f"{key}={value}"]
        proc = subprocess.run(
            [*args, self.name, *argv], capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} in {self.name}: {proc.stdout}{proc.stderr}")
        return proc.stdout


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running(
    bundle: Path,
    name: str,
    port: int,
    *,
    extra_env: tuple[tuple[str, str], ...] = (),
    extra_volumes: tuple[str, ...] = (),
    timeout_s: float = 900,
) -> Iterator[Container]:
    """Load the bundle's image and start it (emulated as `edgepack run` does); stop it after."""
    manifest = read_manifest(bundle)
    image = manifest.image
    assert image is not None, f"{bundle} has no image"
    engine = find_engine("podman")
    engine.load(bundle / image.archive)
    scratch = bundle.parent / f".{name}-emulation"
    scratch.mkdir(exist_ok=True)
    arch = image.platform.split("/")[1]
    emulation = plan_emulation(manifest, arch, None, scratch) if needs_emulation(arch) else None
    engine.remove(name)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    engine.run_detached(
        image.ref,
        name=name,
        publish=[f"127.0.0.1:{port}:{image.port}"],
        volumes=(*(emulation.volumes if emulation else ()), *extra_volumes),
        platform=image.platform,
        env=(*(emulation.env if emulation else ()), *extra_env),
    )
    container = Container(engine, name, url, start, image.port)
    try:
        while not _ready(url):
            if not engine.is_running(name):
                raise AssertionError(f"{name} exited: {engine.logs(name, tail=30)}")
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"{name} not ready in {timeout_s}s: {engine.logs(name)}")
            time.sleep(0.5)
        container.ready_after_s = time.monotonic() - start
        yield container
    finally:
        subprocess.run(["podman", "stop", "-t", "30", name], capture_output=True, timeout=120)
        engine.remove(name)


# --- the workload ------------------------------------------------------------------------------

# numpy dtype -> Open Inference datatype: every dtype the runtime maps. The model has one input
# per dtype, named after it (its ONNX element type is onnx's for that numpy dtype), each through
# Identity except float32, which goes through Relu (a real kernel).
DTYPES: dict[str, str] = {
    "float32": "FP32", "float16": "FP16", "float64": "FP64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "bool": "BOOL",
}  # fmt: skip


def alltypes_model(path: Path) -> Path:
    """One input per dtype, each [batch, 3] with a dynamic batch (so requests are batched)."""
    import onnx
    from onnx import helper

    nodes = [
        helper.make_node("Relu" if name == "float32" else "Identity", [name], [f"{name}_out"])
        for name in DTYPES
    ]
    element = {name: helper.np_dtype_to_tensor_dtype(np.dtype(name)) for name in DTYPES}
    inputs = [helper.make_tensor_value_info(n, element[n], ["batch", 3]) for n in DTYPES]
    outputs = [helper.make_tensor_value_info(f"{n}_out", element[n], ["batch", 3]) for n in DTYPES]
    model = helper.make_model(
        helper.make_graph(nodes, "alltypes", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, path)
    return path


def _arrays(seed: int, rows: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in DTYPES:
        if name == "bool":
            arrays[name] = rng.integers(0, 2, (rows, 3)).astype(bool)
        elif name.startswith("float"):
            arrays[name] = rng.standard_normal((rows, 3)).astype(name)
        else:
            arrays[name] = rng.integers(0, 100, (rows, 3)).astype(name)
    return arrays


def _http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            reply.read()
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)


def _infer(client: Any, model: str, arrays: dict[str, np.ndarray], binary: bool) -> None:
    import tritonclient.http as triton

    tensors = []
    for name, datatype in DTYPES.items():
        tensor = triton.InferInput(name, list(arrays[name].shape), datatype)
        tensor.set_data_from_numpy(arrays[name], binary_data=binary)
        tensors.append(tensor)
    outputs = [triton.InferRequestedOutput(f"{n}_out", binary_data=binary) for n in DTYPES]
    result = client.infer(model, tensors, outputs=outputs)
    for name in DTYPES:
        expected = np.maximum(arrays[name], 0) if name == "float32" else arrays[name]
        got = result.as_numpy(f"{name}_out")
        np.testing.assert_array_equal(got, expected, err_msg=f"{model}: {name}")


def workload(container: Container, model: str, env: tuple[tuple[str, str], ...] = ()) -> None:
    """The runtime's whole surface: health and metadata, every dtype as JSON and as binary
    tensors, concurrent requests merged into batches, the response cache, error replies,
    metrics, the image's healthcheck and a clean stop (left to :func:`running`)."""
    import tritonclient.http as triton

    url = container.url
    client = triton.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=300.0)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model)
    assert client.get_server_metadata()
    metadata = client.get_model_metadata(model)
    assert {i["name"] for i in metadata["inputs"]} == set(DTYPES)
    _infer(client, model, _arrays(0), binary=False)
    _infer(client, model, _arrays(1), binary=True)
    _infer(client, model, _arrays(1), binary=True)  # the same request again: the cache answers
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        try:
            _infer(client_for_thread(), model, _arrays(seed, rows=1 + seed % 2), seed % 2 == 0)
        except BaseException as exc:  # collected and re-raised in the test's thread
            errors.append(exc)

    def client_for_thread() -> Any:
        return triton.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=300.0)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(10, 22)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not errors, errors
    infer_url = f"{url}/v2/models/{model}/infer"
    json_headers = {"Content-Type": "application/json"}
    assert _http(infer_url, b"{not json", json_headers) == 400
    assert _http(infer_url, json.dumps({"inputs": []}).encode(), json_headers) == 400
    assert _http(f"{url}/v2/models/nosuchmodel/infer", b"{}", json_headers) == 404
    assert _http(f"{url}/v2/nosuchpath") == 404
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as reply:
        metrics = reply.read().decode()
    assert "edgepack" in metrics or "inference" in metrics, metrics[:500]
    container.exec(
        "/usr/bin/python3.11",
        "-m",
        "edgepack_runtime.healthcheck",
        "--port",
        str(container.port),
        env=env,
    )
    client.close()
