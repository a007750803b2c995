"""``edgepack build``: model + target -> verified bundle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from packager.backends.base import BuildRequest
from packager.build import build
from packager.bundle.manifest import FitSection, Manifest
from packager.commands.options import calibration_option, eval_option, trust_model_code_option
from packager.console import console
from packager.errors import UsageError
from packager.fit import human_bytes


def _parse_opt(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--opt: '{text}' is not KEY=VALUE", hint="e.g. --opt update=off")
    return key.strip(), value.strip()


# The runtime settings `build` may override (runtime.json; the target's value otherwise): each a
# whole number >= 0, in the order --help lists them.
_RUNTIME_OPTIONS: tuple[tuple[str, str], ...] = (
    ("--max-batch-size",
     "Runtime: merge concurrent requests up to this batch (0 = off) [target's]."),
    ("--batch-delay-us",
     "Runtime: longest wait for a batch to fill, in microseconds [target's]."),
    ("--batch-axis",
     "Runtime: declare that the model's first axis (0) is its batch axis, for batching a model "
     "whose first dimension is not named batch/N/batch_size [from the model's dimension names]."),
    ("--cache-mb", "Runtime: response cache size in MiB (0 = off) [target's]."),
)
_Command = TypeVar("_Command", bound=Callable[..., Any])


def _runtime_options(command: _Command) -> _Command:
    """Add the :data:`_RUNTIME_OPTIONS` to ``command`` (innermost decorator last: click lists
    options in decorator order, so they are applied in reverse)."""
    for flag, text in reversed(_RUNTIME_OPTIONS):
        command = click.option(flag, type=click.IntRange(min=0), help=text)(command)
    return command


def fit_lines(fit: FitSection) -> list[str]:
    """The summary's budget lines from the manifest's ``fit``: each resource's needed parts
    against what the target has. After an image build its storage is the built image's real
    sizes (the backend's fit, the manifest's figures), marked "built image"."""
    lines = []
    for resource in fit.resources:
        parts = " + ".join(f"{k} {human_bytes(v)}" for k, v in resource.needed_parts.items() if v)
        measured = resource.estimate_source.startswith("the built image")
        lines.append(
            f"{resource.name + ':':<9} {human_bytes(resource.needed_bytes)} of "
            f"{human_bytes(resource.available_bytes)} ({parts})"
            + (" [built image]" if measured else "")
        )
    return lines


def summary_lines(bundle: Path, manifest: Manifest, backend_lines: tuple[str, ...]) -> list[str]:
    """What ``edgepack build`` prints: from the manifest it wrote, then the backend's own
    lines (``ExecuteResult.summary``)."""
    target = manifest.target
    lines = [
        f"bundle:   {bundle}",
        f"target:   {target.name} ({target.platform or target.device_class})",
        f"model:    {manifest.name} {manifest.version} ({manifest.model.digest})",
    ]
    if manifest.image is not None:
        image = manifest.image
        lines.append(f"image:    {image.ref} {image.digest} ({image.size_bytes} bytes)")
    return [*lines, *fit_lines(manifest.fit), *backend_lines]


@click.command("build")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--target", "-t", required=True, help="A target name (see 'targets list') or a TOML file."
)
@click.option(
    "--out", "-o", type=click.Path(path_type=Path), help="Bundle directory [out/NAME-VERSION]."
)
@click.option("--name", help="Served model name [the model file's stem].")
@click.option("--version", "version", default="0.1.0", show_default=True, help="Bundle version.")
@click.option(
    "--base",
    help="Base image instead of Debian: oci-archive:PATH, an OCI layout dir, or "
    "docker://REGISTRY/REPO@sha256:DIGEST (pulled into the cache).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Build even when the model does not fit the target or its runtime cannot load it.",
)
@click.option(
    "--quantize",
    type=click.Choice(["fp32", "fp16", "int8-dynamic", "int8-static"]),
    help="Optimize the model first (see 'edgepack optimize') [the target's preferred precision].",
)
@calibration_option
@eval_option
@_runtime_options
@click.option(
    "--opt",
    "opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Backend option, repeatable; the target's device class defines the keys "
    "(e.g. update=on|off).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="Download and layer cache [~/.cache/edgepack].",
)
@click.option(
    "--ota-repo", metavar="URL", help="OTA: carry the device agent, set up for this repo."
)
@click.option(
    "--ota-root",
    type=click.Path(path_type=Path),
    help="OTA: the repository's trusted root metadata (its 1.root.json).",
)
@click.option("--ota-channel", default="stable", show_default=True, help="OTA: release channel.")
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd"]),
    default="gzip",
    show_default=True,
    help="Image layer compression; zstd is smaller but needs docker >= 23, podman >= 4.1 or "
    "containerd >= 1.5 on the device.",
)
@click.option(
    "--slim/--no-slim",
    default=True,
    show_default=True,
    help="Leave out of the image what the runtime never loads (packager/image/data/"
    "slim-policy.toml); --no-slim keeps every file the packages and wheels ship.",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    envvar="EDGEPACK_SIGN_KEY",
    help="Sign the manifest and provenance with this Ed25519 private key (PEM, from 'edgepack "
    "keys generate'); install.sh and the OTA agent then check it. [$EDGEPACK_SIGN_KEY]",
)
@click.option(
    "--no-emulate",
    is_flag=True,
    help="Skip the proof under emulation where the backend has one (firmware: compile, link "
    "and run it under qemu-system-arm); the same as --opt emulate=off.",
)
@click.option("--offline", is_flag=True, help="Use only the cache; never download.")
@trust_model_code_option(
    "PyTorch (torch.save pickles, .pt2 programs, TorchScript) or a TensorFlow SavedModel (its "
    "init ops)"
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build_cmd(
    model: Path,
    target: str,
    out: Path | None,
    name: str | None,
    version: str,
    base: str | None,
    force: bool,
    quantize: str | None,
    calibration: Path | None,
    eval_dir: Path | None,
    max_batch_size: int | None,
    batch_delay_us: int | None,
    batch_axis: int | None,
    cache_mb: int | None,
    opts: tuple[str, ...],
    cache_dir: Path | None,
    ota_repo: str | None,
    ota_root: Path | None,
    ota_channel: str,
    offline: bool,
    slim: bool,
    no_emulate: bool,
    compression: Literal["gzip", "zstd"],
    sign_key: Path | None,
    trust_model_code: bool,
    as_json: bool,
) -> None:
    """Build a ready-to-flash bundle of MODEL for a target device."""
    console.configure(quiet=as_json)
    request = BuildRequest(
        model=model,
        target=target,
        out=out,
        name=name,
        version=version,
        force=force,
        base=base,
        cache_dir=cache_dir,
        offline=offline,
        ota_repo=ota_repo,
        ota_root=ota_root,
        ota_channel=ota_channel,
        quantize=quantize,
        calibration=calibration,
        eval_dir=eval_dir,
        max_batch_size=max_batch_size,
        max_queue_delay_us=batch_delay_us,
        batch_axis=batch_axis,
        cache_mb=cache_mb,
        options=tuple(_parse_opt(o) for o in opts) + ((("emulate", "off"),) if no_emulate else ()),
        compression=compression,
        slim=slim,
        sign_key=sign_key,
        trust_model_code=trust_model_code,
    )
    result = build(request)
    if as_json:
        console.json(result.to_json())
        return
    for line in summary_lines(result.bundle, result.manifest, result.summary):
        console.result(line)
