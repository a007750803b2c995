"""``edgepack push BUNDLE... docker://REGISTRY/REPO:TAG``."""

from __future__ import annotations

from pathlib import Path

import click

from packager.console import console
from packager.push import PushRequest, push_bundles
from packager.tools.skopeo import RegistryOptions


@click.command("push")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("destination")
@click.option(
    "--tls-verify/--no-tls-verify",
    default=None,
    help="Require HTTPS and a verified certificate, as skopeo's --tls-verify "
    "[yes, unless registries.conf marks the registry insecure].",
)
@click.option(
    "--authfile",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Registry credentials [$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push_cmd(
    bundles: tuple[Path, ...], destination: str, tls_verify: bool | None, authfile: Path | None,
    as_json: bool,
) -> None:
    """Push the images of BUNDLES to DESTINATION (docker://REGISTRY/REPO:TAG).

    Several bundles of one model (one per platform) become one OCI image index under the tag,
    so that every device pulls its own platform. Digests are kept: each platform's is its
    bundle's image digest.
    """
    console.configure(quiet=as_json)
    result = push_bundles(
        PushRequest(bundles, destination, RegistryOptions(tls_verify=tls_verify, authfile=authfile))
    )
    if as_json:
        console.json(result.to_json())
    else:
        platforms = ", ".join(i.platform for i in result.images)
        console.result(f"{result.destination}@{result.digest} ({platforms})")
