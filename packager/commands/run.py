"""``edgepack run BUNDLE``: try a bundle on this machine (emulated when foreign)."""

from __future__ import annotations

from pathlib import Path

import click

from packager.backends.linux.trial import RunRequest, run_bundle
from packager.console import console


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--port", "-p", default=8080, show_default=True, help="Port on 127.0.0.1.")
@click.option("--engine", type=click.Choice(["podman", "docker"]), help="Container engine [auto].")
@click.option(
    "--smoke-test",
    is_flag=True,
    help="Start, wait until ready, run one inference on zeros, stop, and report.",
)
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for ready.")
@click.option(
    "--cpu",
    metavar="MODEL",
    help="qemu CPU model to emulate instead of the device's (e.g. max) [the target's cpu.qemu].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--input", "input_file", type=click.Path(path_type=Path, dir_okay=False),
              help="MCU bundles: one inference on this .npy array [zeros].")
@click.option("--inputs", "inputs_dir", type=click.Path(path_type=Path, file_okay=False),
              help="MCU bundles: one inference per .npy file in DIR (sorted by name).")
@click.option("--kernels", type=click.Choice(["reference", "cmsis-nn"]),
              help="MCU bundles: the TFLM kernel set to build with [cmsis-nn on Cortex-M].")
@click.option("--tflm-tree", metavar="DIR|ARCHIVE",
              help="MCU bundles: TFLM source tree [$EDGEPACK_TFLM_TREE].")
def run_cmd(
    bundle: Path,
    port: int,
    engine: str | None,
    smoke_test: bool,
    timeout: float,
    cpu: str | None,
    as_json: bool,
    input_file: Path | None = None,
    inputs_dir: Path | None = None,
    kernels: str | None = None,
    tflm_tree: str | None = None,
) -> None:
    """Run BUNDLE here: a Linux bundle's image (arm64 under qemu-user, on the device's CPU
    model) serving its API until stopped; an MCU bundle's firmware, built and run on the
    emulated Cortex-M board of its core (qemu-system-arm), printing outputs and measurements."""
    console.configure(quiet=as_json)
    if (bundle / "manifest.json").is_file() and (bundle / "emulate").is_dir():
        _run_mcu(bundle, input_file, inputs_dir, kernels, tflm_tree, as_json)
        return
    result = run_bundle(
        RunRequest(
            bundle=bundle,
            port=port,
            engine=engine,
            smoke_test=smoke_test,
            timeout_s=timeout,
            cpu=cpu,
        )
    )
    if as_json:
        console.json(result.to_json())
    elif result.smoke:
        where = f" on an emulated {result.cpu}" if result.cpu else ""
        console.result(f"{bundle}: ready in {result.ready_after_s:.1f}s{where}, inference OK")


def _run_mcu(bundle: Path, input_file: Path | None, inputs_dir: Path | None, kernels: str | None,
             tree: str | None, as_json: bool) -> None:
    from packager.backends.mcu.emulate import emulate_bundle, load_inputs
    from packager.errors import UsageError

    if input_file and inputs_dir:
        raise UsageError("--input and --inputs: give one of them")
    files = [input_file] if input_file else sorted(inputs_dir.glob("*.npy")) if inputs_dir else []
    if inputs_dir and not files:
        raise UsageError(f"{inputs_dir}: no .npy files")
    inputs = load_inputs(bundle, files) if files else None
    console.status(f"building and emulating {bundle} ({kernels or 'default'} kernels)")
    result = emulate_bundle(bundle, inputs, tree=tree, kernels=kernels)
    doc = result.to_json()
    if as_json:
        console.json(doc)
        return
    for n, outs in enumerate(doc["outputs"]):
        console.result(f"inference {n}: outputs {outs}, {doc['instructions'][n]:,} instructions")
    linked = doc["linked"]
    console.result(
        f"{doc['board']}: arena {doc['arena_used_bytes']:,} of {doc['arena_bytes']:,} B used; "
        f"linked flash {linked['flash_bytes']:,} B, RAM {linked['ram_bytes']:,} B (static); "
        f"latency ~{doc['latency_estimate_ms']} ms ({doc['latency_estimate_basis']}); "
        f"instructions +-{doc['instructions_resolution']} ({doc['instructions_source']})")
