"""Can the onnxruntime a bundle ships load this ONNX model? Check, convert down, or refuse.

onnxruntime refuses at session creation any model whose IR version or opset (per operator domain)
is newer than the release knows (and has no kernels for some operators of ai.onnx opsets below 7),
so a bundle built from such a model starts on the device and never becomes ready.
``make_loadable`` decides before anything is built:

1. compare the model's IR version, the opset of every domain it imports and every operator's
   existence at the runtime's opset with the limits of the exact onnxruntime release the image
   ships (``ONNXRUNTIME_SUPPORT``);
2. where a limit is exceeded and a conversion exists (``onnx.version_converter`` for the default
   domain's opset; the IR version stamp lowered when the model uses nothing newer), convert,
   check again, and keep the converted model;
3. load the result with onnxruntime when the host has that same release (the proof), and refuse
   with ``UnsupportedError`` (exit 10), naming the numbers, when any step fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf import unknown_fields  # type: ignore[import-untyped,unused-ignore]
from google.protobuf.message import Message  # type: ignore[import-untyped,unused-ignore]
from onnx import GraphProto, ModelProto, NodeProto

from packager.errors import UnsupportedError
from packager.models.onnx_save import save_onnx

_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class RuntimeSupport:
    """What one onnxruntime release loads: its highest IR version and, per operator domain, its
    highest opset. A domain not listed is a custom domain: onnxruntime does not limit its opset,
    but its operators need kernels, which only loading the model proves."""

    version: str
    max_ir_version: int
    max_opsets: tuple[tuple[str, int], ...]  # (domain, highest opset); "" is ai.onnx
    source: str
    # The oldest ai.onnx opset it guarantees: older models "may run depending upon legacy
    # support" (its model.cc warning), and e.g. Relu-1 has no kernel at all.
    min_opset: int = 7

    def max_opset(self, domain: str) -> int | None:
        domain = "" if domain in _DEFAULT_DOMAINS else domain
        return dict(self.max_opsets).get(domain)

    def describe(self) -> str:
        """E.g. ``IR <= 14, ai.onnx opset <= 28, ai.onnx.ml opset <= 5``."""
        opsets = ", ".join(f"{_domain(d)} opset <= {v}" for d, v in self.max_opsets[:2])
        return f"IR <= {self.max_ir_version}, {opsets}, ai.onnx opset >= {self.min_opset}"


def _measured(version: str, *, ir_version: int, opset: int) -> RuntimeSupport:
    """One release's row as measured from its wheel: the default domain and onnxruntime's
    internal NHWC domain (which follows it) at ``opset``; the ML, training and contrib domains
    at the opsets every measured release (1.19.2 to 1.32.0) registers."""
    return RuntimeSupport(
        version=version,
        max_ir_version=ir_version,
        max_opsets=(
            ("", opset),
            ("ai.onnx.ml", 5),
            ("ai.onnx.training", 1),
            ("ai.onnx.preview.training", 1),
            ("com.microsoft", 1),
            ("com.microsoft.experimental", 1),
            ("com.microsoft.nchwc", 1),
            ("com.ms.internal.nhwc", opset),
            ("org.pytorch.aten", 1),
        ),
        source=(
            f"onnxruntime {version} wheel: model.cc IR check and ValidateOpsetForDomain, "
            "measured; https://onnxruntime.ai/docs/reference/compatibility.html"
        ),
    )


# Per onnxruntime release shipped in images (packager/runtime/requirements.txt pins the one in
# use; a test fails when the pin has no entry here). Source for each row: onnxruntime's own
# load-time checks, read from the released wheel (onnxruntime/core/graph/model.cc rejects an
# ir_version above ONNX_NAMESPACE::Version::IR_VERSION; model_load_utils.h's
# ValidateOpsetForDomain rejects an opset above the domain's registered maximum with "Current
# official support for domain X is till opset N"), measured by loading generated models with the
# 1.32.0 wheel, and the "ONNX Runtime compatibility" table of
# https://onnxruntime.ai/docs/reference/compatibility.html. tests/unit/models/
# test_runtime_compat.py re-measures the row of the host's onnxruntime whenever it is the same.
ONNXRUNTIME_SUPPORT: dict[str, RuntimeSupport] = {
    # The Jetson images' pins (packager/backends/jetson/container.py WHEEL_PINS): JetPack 5's
    # CPython 3.8 and JetPack 6's 3.10. Measured the same way with the cp311 wheels of the same
    # releases (tests/integration/test_jetson_runtime_pins.py re-measures them).
    "1.19.2": _measured("1.19.2", ir_version=10, opset=21),
    "1.23.2": _measured("1.23.2", ir_version=11, opset=23),
    "1.32.0": _measured("1.32.0", ir_version=14, opset=28),
}


def support_for(version: str) -> RuntimeSupport:
    """The limits of onnxruntime ``version``; UnsupportedError when edgepack has none."""
    support = ONNXRUNTIME_SUPPORT.get(version)
    if support is None:
        known = ", ".join(sorted(ONNXRUNTIME_SUPPORT))
        raise UnsupportedError(
            f"no compatibility data for onnxruntime {version}, the version the image ships",
            hint=f"edgepack knows {known}; add the release to ONNXRUNTIME_SUPPORT",
        )
    return support


@dataclass(frozen=True)
class Compatibility:
    """What ``check`` found: every limit the model exceeds, and whether a conversion can fix it."""

    ir_version: int
    opsets: tuple[tuple[str, int], ...]
    problems: tuple[str, ...] = ()
    # Why no conversion exists (empty when one may): an unknown opset, a non-default domain ...
    blockers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Loadable:
    """The model to build from and what was done to get it."""

    path: Path
    converted: bool
    notes: tuple[str, ...] = field(default=())
    loaded_with: str | None = None  # the onnxruntime version that loaded it; None: not loaded


def check(model: ModelProto, support: RuntimeSupport) -> Compatibility:
    """Compare ``model`` (weights not needed) with ``support``; pure, never raises."""
    problems: list[str] = []
    blockers: list[str] = []
    known_ir = onnx.IR_VERSION
    if model.ir_version > support.max_ir_version:
        problems.append(f"IR version {model.ir_version} > {support.max_ir_version}")
        if model.ir_version > known_ir and _has_unknown_fields(model):
            blockers.append(
                f"the model uses fields of IR version {model.ir_version} that onnx "
                f"{onnx.__version__} (IR <= {known_ir}) does not know"
            )
    opsets = _opsets(model)
    for domain, version in sorted(opsets.items()):
        limit = support.max_opset(domain)
        if limit is None or version <= limit:
            continue
        problems.append(f"opset {version} of {_domain(domain)} > {limit}")
        if domain != "":
            blockers.append(f"onnx can convert only the ai.onnx opset, not {_domain(domain)}")
        elif version > onnx.defs.onnx_opset_version():
            blockers.append(
                f"onnx {onnx.__version__} knows ai.onnx opsets up to "
                f"{onnx.defs.onnx_opset_version()}, so it cannot convert opset {version}"
            )
    default = opsets.get("")
    if default is not None and default < support.min_opset:
        problems.append(f"opset {default} of ai.onnx < {support.min_opset}, the oldest it supports")
    missing = sorted(_missing_operators(model, opsets, support))
    if missing:
        problems.append(f"operators newer than the runtime: {', '.join(missing)}")
        blockers.append(f"no opset the runtime loads has {', '.join(missing)}")
    return Compatibility(
        ir_version=int(model.ir_version),
        opsets=tuple(sorted(opsets.items())),
        problems=tuple(problems),
        blockers=tuple(blockers),
    )


def make_loadable(
    source: Path,
    work: Path,
    support: RuntimeSupport,
    *,
    label: str,
    host_version: str | None = None,
) -> Loadable:
    """``source`` itself when the runtime loads it, else a converted copy in ``work``.

    ``host_version`` is the onnxruntime installed here (looked up when None): when it equals
    ``support.version`` the result is loaded with it as proof. Raises UnsupportedError (exit 10)
    naming the model's IR version and opsets and the runtime's limits when no conversion exists
    or the runtime still cannot load the model.
    """
    host = host_version if host_version is not None else _host_onnxruntime()
    model = onnx.load(str(source), load_external_data=False)
    found = check(model, support)
    path = source
    notes: list[str] = []
    if not found.ok:
        if found.blockers:
            raise _refusal(label, found, support, "; ".join(found.blockers))
        work.mkdir(parents=True, exist_ok=True)
        path = work / source.name
        notes = _convert(source, path, found, support, label)
        after = check(onnx.load(str(path), load_external_data=False), support)
        if not after.ok:  # pragma: no cover - the conversion targets exactly these limits
            raise _refusal(label, after, support, "the converted model still exceeds them")
    loaded_with = None
    if host == support.version:
        _load(path, label, support, found)
        loaded_with = host
    else:
        notes.append(
            f"not loaded with onnxruntime {support.version} (the host has "
            f"{host or 'no onnxruntime'}); checked against its IR and opset limits only"
        )
    return Loadable(
        path=path, converted=path != source, notes=tuple(notes), loaded_with=loaded_with
    )


def _convert(
    source: Path, dest: Path, found: Compatibility, support: RuntimeSupport, label: str
) -> list[str]:
    notes: list[str] = []
    # The converter serializes the model it is given: weights stay references to their files
    # (so a model over 2 GiB converts too) and are read back before saving.
    model = onnx.load(str(source), load_external_data=False)
    opset = dict(found.opsets).get("")
    limit = support.max_opset("")
    goal = None
    if opset is not None and limit is not None and opset > limit:
        goal = limit
    elif opset is not None and opset < support.min_opset:
        goal = support.min_opset
    if opset is not None and goal is not None:
        try:
            model = onnx.version_converter.convert_version(model, goal)
        except Exception as exc:  # the converter raises bare RuntimeError/ConvertError
            raise _refusal(
                label, found, support, f"onnx cannot convert it to opset {goal} ({_first(exc)})"
            ) from exc
        notes.append(
            f"converted from ai.onnx opset {opset} to {goal} for onnxruntime {support.version}"
        )
    if model.ir_version > support.max_ir_version:
        notes.append(
            f"IR version lowered from {model.ir_version} to {support.max_ir_version} for "
            f"onnxruntime {support.version}"
        )
        model.ir_version = support.max_ir_version
    onnx.load_external_data_for_model(model, str(source.parent))
    save_onnx(model, dest)
    try:
        # By path: the checker then reads external data beside it and copes with any size.
        onnx.checker.check_model(str(dest))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise _refusal(
            label, found, support, f"the converted model is not valid ONNX ({_first(exc)})"
        ) from exc
    return notes


def _load(path: Path, label: str, support: RuntimeSupport, found: Compatibility) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented
        raise UnsupportedError(
            f"{label}: onnxruntime {support.version}, the version the image ships, cannot load "
            f"the model (IR {found.ir_version}, {_opset_text(found.opsets)}): {_first(exc)}",
            hint="replace the operators it names or re-export the model for that runtime",
        ) from exc


def _refusal(
    label: str, found: Compatibility, support: RuntimeSupport, why: str
) -> UnsupportedError:
    return UnsupportedError(
        f"{label}: the model (IR version {found.ir_version}, {_opset_text(found.opsets)}) is "
        f"outside what onnxruntime {support.version}, the runtime the image ships, loads "
        f"({support.describe()}): {'; '.join(found.problems)}; and {why}",
        hint=(
            f"re-export it at IR <= {support.max_ir_version} and ai.onnx opset <= "
            f"{support.max_opset('')}, e.g. torch.onnx.export(..., opset_version="
            f"{support.max_opset('')})"
        ),
    )


def _host_onnxruntime() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime")
    except PackageNotFoundError:
        return None


def _domain(domain: str) -> str:
    return "ai.onnx" if domain in _DEFAULT_DOMAINS else domain


def _opset_text(opsets: tuple[tuple[str, int], ...]) -> str:
    return "opset " + ", ".join(f"{_domain(d)} {v}" for d, v in opsets) if opsets else "no opset"


def _first(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:300]


def _opsets(model: ModelProto) -> dict[str, int]:
    found: dict[str, int] = {}
    for entry in (*model.opset_import, *(i for f in model.functions for i in f.opset_import)):
        domain = "" if entry.domain in _DEFAULT_DOMAINS else entry.domain
        found[domain] = max(found.get(domain, 0), int(entry.version))
    return found


def _nodes(graph: GraphProto) -> Iterator[NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def _missing_operators(
    model: ModelProto, opsets: dict[str, int], support: RuntimeSupport
) -> set[str]:
    """Standard operators (ai.onnx, ai.onnx.ml) that no opset up to the runtime's has."""
    local = {(f.domain, f.name) for f in model.functions}
    nodes = [*_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    missing: set[str] = set()
    for node in nodes:
        domain = "" if node.domain in _DEFAULT_DOMAINS else node.domain
        if domain not in ("", "ai.onnx.ml") or (node.domain, node.op_type) in local:
            continue
        limit = support.max_opset(domain)
        if limit is None:
            continue
        version = min(opsets.get(domain, limit), limit)
        try:
            onnx.defs.get_schema(node.op_type, version, domain)
        except onnx.defs.SchemaError:
            missing.add(node.op_type if domain == "" else f"{domain}.{node.op_type}")
    return missing


def _has_unknown_fields(message: Message) -> bool:
    """True when ``message`` or any message inside holds fields this protobuf schema lacks."""
    if len(unknown_fields.UnknownFieldSet(message)):
        return True
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        items = value if descriptor.is_repeated else (value,)
        if any(_has_unknown_fields(item) for item in items):
            return True
    return False
