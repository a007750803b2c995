"""``edgepack run BUNDLE``: try a bundle on this machine (emulated when foreign)."""

from __future__ import annotations

from pathlib import Path

import click

from packager.console import console
from packager.trial import RunRequest, run_bundle


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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def run_cmd(
    bundle: Path, port: int, engine: str | None, smoke_test: bool, timeout: float, as_json: bool
) -> None:
    """Run BUNDLE's image here (arm64 under qemu-user) and serve its API until stopped."""
    console.configure(quiet=as_json)
    result = run_bundle(
        RunRequest(
            bundle=bundle, port=port, engine=engine, smoke_test=smoke_test, timeout_s=timeout
        )
    )
    if as_json:
        console.json(result.to_json())
    elif result.smoke:
        console.result(f"{bundle}: ready in {result.ready_after_s:.1f}s, inference OK")
