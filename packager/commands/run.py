"""``edgepack run BUNDLE``: try a bundle on this machine (emulated when foreign)."""

from __future__ import annotations

from pathlib import Path

import click

from packager.backends import get_backend
from packager.backends.base import TryRequest
from packager.bundle.verify import verify_bundle
from packager.console import console
from packager.errors import UsageError, VerifyError


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
              help="Firmware bundles: one inference on this .npy array [zeros].")
@click.option("--inputs", "inputs_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Firmware bundles: one inference per .npy file in DIR (sorted by name).")
@click.option("--kernels", type=click.Choice(["reference", "cmsis-nn"]),
              help="Firmware bundles: the TFLM kernel set to build with [cmsis-nn on Cortex-M].")
@click.option("--tflm-tree", metavar="DIR|ARCHIVE",
              help="Firmware bundles: TFLM source tree [$EDGEPACK_TFLM_TREE].")
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
    """Run BUNDLE here, after checking it as `edgepack verify` does, the way its device class
    tries bundles: a container image (foreign ones under qemu-user, on the device's CPU model)
    serving its API until stopped, or a firmware built and run on the emulated board of its
    core, printing outputs and measurements."""
    console.configure(quiet=as_json)
    if input_file and inputs_dir:
        raise UsageError("--input and --inputs: give one of them")
    files = [input_file] if input_file else sorted(inputs_dir.glob("*.npy")) if inputs_dir else []
    if inputs_dir and not files:
        raise UsageError(f"{inputs_dir}: no .npy files")
    # What is tried is the manifest verified (one read): never a second copy from the disk.
    check = verify_bundle(bundle, get_backend)
    if check.problems:
        raise VerifyError(f"{bundle}: {check.problems[0]}", hint="rebuild or copy it again")
    manifest = check.manifest
    request = TryRequest(bundle=bundle, port=port, engine=engine, smoke_test=smoke_test,
                         timeout_s=timeout, cpu=cpu, inputs=tuple(files), kernels=kernels,
                         toolchain_tree=tflm_tree)
    result = get_backend(manifest.target.device_class).try_bundle(request, manifest)
    if as_json:
        console.json(result.document)
        return
    for line in result.lines:
        console.result(line)
