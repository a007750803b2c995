"""``edgepack optimize MODEL``: prune, quantize and gate a model on measured accuracy."""

from __future__ import annotations

import re
from pathlib import Path

import click

from packager.calibration import ImagePreprocessing
from packager.commands.options import calibration_option, eval_option, trust_model_code_option
from packager.console import Table, console
from packager.errors import UsageError
from packager.models.torch_export import INPUT_DTYPES, InputSpec
from packager.optimize import OptimizeRequest, optimize
from packager.optimize.cpu import target_cpu
from packager.optimize.request import (
    EVAL_ON_TARGET_CHOICES,
    FORMAT_CHOICES,
    METHOD_CHOICES,
    QUANTIZE_CHOICES,
    PruneOptions,
)

# ASCII digits only, whole string: str.isdigit() also passes '²' or '١', which int() then
# refuses (an internal error) or reads as a number the user never typed. At most 9 (a dim,
# a size in pixels or an axis below 10**9): int() refuses more than 4300 digits (CPython's
# int_max_str_digits), an internal error too.
_DIGITS = re.compile(r"[0-9]{1,9}")

_PRUNE_KINDS = {
    "l1": "l1",
    "l1-unstructured": "l1",
    "l2": "l2",
    "l2-structured": "l2",
}


@click.command("optimize")
# A plain path, not click.Path(exists=True): a missing model is our InputError (exit 3).
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--quantize", type=click.Choice(QUANTIZE_CHOICES), required=True)
@click.option(
    "--format",
    "quant_format",
    type=click.Choice(FORMAT_CHOICES),
    default="QDQ",
    show_default=True,
    help="Static INT8 graph format.",
)
@click.option(
    "--per-channel/--per-tensor",
    default=True,
    show_default=True,
    help="INT8 weight scales per output channel or one per tensor.",
)
@calibration_option
@click.option(
    "--calibration-method", type=click.Choice(METHOD_CHOICES), default="MinMax", show_default=True
)
@click.option("--resize", metavar="HxW", help="Images: resize to height x width.")
@click.option(
    "--layout",
    type=click.Choice(["NCHW", "NHWC"]),
    default="NCHW",
    show_default=True,
    help="Images: tensor layout.",
)
@click.option(
    "--mean",
    metavar="M[,M,M]",
    default="0",
    show_default=True,
    help="Images: subtracted after scaling.",
)
@click.option(
    "--std",
    metavar="S[,S,S]",
    default="1",
    show_default=True,
    help="Images: divided by after subtracting the mean.",
)
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Images: pixel values (0-255) are multiplied by this first.",
)
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=D1,D2,...[:DTYPE]",
    help="PyTorch: an input's example shape, in forward() order (repeatable); DTYPE one of "
    f"{', '.join(INPUT_DTYPES)} [float32].",
)
@click.option(
    "--dynamic-dim",
    "dynamic_dims",
    multiple=True,
    metavar="NAME:AXIS",
    help="PyTorch: export this axis of an input as dynamic (repeatable).",
)
@click.option(
    "--prune",
    "prune_specs",
    multiple=True,
    metavar="l1=AMOUNT|l2=AMOUNT",
    help="PyTorch: L1 unstructured or L2 structured (channel) pruning, 0-1.",
)
@eval_option
@click.option("--max-accuracy-drop", type=float, help="Fail above this drop (fraction, 0-1).")
@click.option(
    "--min-top1-agreement",
    type=float,
    help="Fail below this top-1 agreement with FP32 (fraction, 0-1).",
)
@click.option("--latency-runs", type=int, default=20, show_default=True)
@click.option(
    "--target",
    "target_name",
    metavar="NAME|FILE",
    help="The device the model is for: its cpu.isa chooses the INT8 settings (default: this "
    "host's CPU).",
)
@click.option(
    "--eval-on-target",
    type=click.Choice(EVAL_ON_TARGET_CHOICES),
    default="auto",
    show_default=True,
    help="Measure INT8 accuracy on the target's CPU kernels under qemu-user where this host's "
    "differ (auto: for models up to 32 MiB).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for the optimized model and its report (created atomically).",
)
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@trust_model_code_option("PyTorch (torch.save pickles, .pt2 programs, TorchScript)")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def optimize_cmd(
    model: Path,
    quantize: str,
    quant_format: str,
    per_channel: bool,
    calibration: Path | None,
    calibration_method: str,
    resize: str | None,
    layout: str,
    mean: str,
    std: str,
    scale: float,
    input_shapes: tuple[str, ...],
    dynamic_dims: tuple[str, ...],
    prune_specs: tuple[str, ...],
    eval_dir: Path | None,
    max_accuracy_drop: float | None,
    min_top1_agreement: float | None,
    latency_runs: int,
    target_name: str | None,
    eval_on_target: str,
    out: Path,
    force: bool,
    trust_model_code: bool,
    as_json: bool,
) -> None:
    """Quantize (and, for PyTorch models, prune) MODEL, check it against the FP32 model, and
    write it with a JSON/Markdown/PNG report into --out."""
    console.configure(quiet=as_json)
    cpu = None
    if target_name is not None:
        from packager.targets import resolve_target

        cpu = target_cpu(resolve_target(target_name))
        if cpu is None:
            raise UsageError(
                f"--target {target_name}: a microcontroller target; INT8 for it is built by "
                "'edgepack build' (TFLite Micro), not by optimize"
            )
    request = OptimizeRequest(
        model=model,
        out=out,
        quantize=quantize,  # type: ignore[arg-type]  # click.Choice guarantees the literal
        quant_format=quant_format,  # type: ignore[arg-type]
        per_channel=per_channel,
        calibration=calibration,
        calibration_method=calibration_method,  # type: ignore[arg-type]
        preprocessing=ImagePreprocessing(
            resize=parse_resize(resize),
            layout=layout,  # type: ignore[arg-type]
            mean=parse_floats("--mean", mean),
            std=parse_floats("--std", std),
            scale=scale,
        ),
        inputs=parse_inputs(input_shapes, dynamic_dims),
        prune=parse_prune(prune_specs),
        eval_dir=eval_dir,
        max_accuracy_drop=max_accuracy_drop,
        min_top1_agreement=min_top1_agreement,
        latency_runs=latency_runs,
        force=force,
        cpu=cpu,
        eval_on_target=eval_on_target,  # type: ignore[arg-type]
        trust_model_code=trust_model_code,
    )
    result = optimize(request)
    if as_json:
        console.json(result.to_json())
        return
    table = Table(title=f"{model.name} -> {result.model}")
    for column in ("variant", "size", "gzip", "median ms", "top-1 agree", "max abs err"):
        table.add_column(column)
    for v in result.report.variants:
        m = v.metrics
        table.add_row(
            v.name,
            f"{v.size_bytes:,}",
            f"{v.gzip_bytes:,}",
            f"{v.latency_ms:.3f}",
            f"{m.top1_agreement:.2%}" if m and m.top1_agreement is not None else "-",
            f"{m.max_abs_error:.4g}" if m else "-",
        )
    console.table(table)
    final = result.report.variants[-1].metrics
    if final is not None and len(final.outputs) > 1:
        outputs = Table(title="per output (final variant vs fp32)")
        for column in ("output", "judged on", "top-1 agree", "cosine", "rel err", "max abs err"):
            outputs.add_column(column)
        for o in final.outputs:
            outputs.add_row(
                o.name,
                o.judged_on,
                f"{o.top1_agreement:.2%}" if o.top1_agreement is not None else "-",
                f"{o.cosine_similarity:.5f}",
                f"{o.relative_error:.2%}",
                f"{o.max_abs_error:.4g}",
            )
        console.table(outputs)
    for key, value in result.report.measured_on:
        if key in ("host_cpu", "accuracy") and isinstance(value, str):
            console.result(f"{key.replace('_', ' ')}: {value}")
    for note in result.report.notes:
        console.result(f"note: {note}")
    console.result(f"report: {result.out}")


def parse_floats(flag: str, text: str) -> tuple[float, ...]:
    """``--mean``/``--std`` text such as ``0.485,0.456,0.406`` as floats.

    Raises UsageError (exit 2) naming ``flag`` when a part is not a number.
    """
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise UsageError(
            f"{flag} {text}: give comma-separated numbers, e.g. 0.485,0.456,0.406"
        ) from exc


def parse_resize(text: str | None) -> tuple[int, int] | None:
    """``--resize HxW`` as (height, width) in pixels; None when the option was not given.

    Raises UsageError (exit 2) unless both are positive integers written in ASCII digits.
    """
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(_DIGITS.fullmatch(p) and int(p) > 0 for p in parts):
        raise UsageError(
            f"--resize {text[:40]!r}: give HEIGHTxWIDTH in ASCII digits (at most 9 each), "
            "e.g. 224x224"
        )
    return int(parts[0]), int(parts[1])


def parse_inputs(shapes: tuple[str, ...], dynamic: tuple[str, ...]) -> tuple[InputSpec, ...]:
    """``--input-shape NAME=D1,D2,...[:DTYPE]`` and ``--dynamic-dim NAME:AXIS`` as InputSpecs.

    In first-named order; DTYPE defaults to float32, a repeated NAME keeps its last shape and each
    input's dynamic axes are sorted and deduplicated. Raises UsageError (exit 2) for a malformed
    value, or a dynamic axis of an input --input-shape does not name or past its rank.
    """
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for text in shapes:
        name, sep, rest = text.partition("=")
        dims_text, _, dtype = rest.partition(":")
        parts = [d.strip() for d in dims_text.split(",")]
        dims = tuple(int(d) for d in parts) if all(_DIGITS.fullmatch(d) for d in parts) else ()
        if not sep or not name or not dims or any(d <= 0 for d in dims):
            raise UsageError(
                f"--input-shape {text[:60]!r}: give NAME=D1,D2,... in ASCII digits (at most 9 "
                "each), e.g. x=1,3,224,224"
            )
        specs[name] = (dims, dtype or "float32")
    axes: dict[str, list[int]] = {name: [] for name in specs}
    for text in dynamic:
        name, _, axis_text = text.partition(":")
        if (
            name not in specs
            or not _DIGITS.fullmatch(axis_text)
            or int(axis_text) >= len(specs[name][0])
        ):
            raise UsageError(
                f"--dynamic-dim {text[:60]!r}: give NAME:AXIS (AXIS in ASCII digits, below the "
                "input's rank) for an input named by --input-shape"
            )
        axes[name].append(int(axis_text))
    return tuple(
        InputSpec(name, dims, dtype, tuple(sorted(set(axes[name]))))
        for name, (dims, dtype) in specs.items()
    )


def parse_prune(specs: tuple[str, ...]) -> PruneOptions:
    """``--prune l1=AMOUNT`` / ``l2=AMOUNT`` as PruneOptions (AMOUNT a fraction, 0 <= AMOUNT < 1).

    ``l1-unstructured`` and ``l2-structured`` are accepted as the long names; a repeated kind keeps
    its last amount. Raises UsageError (exit 2) for any other kind or amount.
    """
    amounts = {"l1": 0.0, "l2": 0.0}
    for text in specs:
        kind, _, amount = text.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if kind not in _PRUNE_KINDS or not 0.0 <= value < 1.0:
            raise UsageError(
                f"--prune {text}: give l1=AMOUNT (unstructured) or l2=AMOUNT (channels), "
                "AMOUNT between 0 and 1"
            )
        amounts[_PRUNE_KINDS[kind]] = value
    return PruneOptions(l1_unstructured=amounts["l1"], l2_structured=amounts["l2"])
