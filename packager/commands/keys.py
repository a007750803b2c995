"""``edgepack keys generate``: an Ed25519 key pair for signing bundles."""

from __future__ import annotations

from pathlib import Path

import click

from packager.bundle.signing import generate_keypair
from packager.console import console


@click.group("keys")
def keys_group() -> None:
    """Keys that sign bundles (see README, "Trust")."""


@keys_group.command("generate")
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=Path("keys"),
    show_default=True,
    help="Directory for NAME.key (private, mode 0600) and NAME.pub (public).",
)
@click.option("--name", default="bundle", show_default=True, help="File name stem.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate_cmd(out: Path, name: str, as_json: bool) -> None:
    """Generate an Ed25519 key pair: build with --sign-key NAME.key, verify with --key NAME.pub.

    Keep NAME.key offline or in CI's secret store (EDGEPACK_SIGN_KEY); existing files are never
    overwritten."""
    console.configure(quiet=as_json)
    pair = generate_keypair(out, name)
    if as_json:
        console.json(
            {"private": str(pair.private), "public": str(pair.public), "keyid": pair.keyid}
        )
        return
    console.result(f"private key: {pair.private} (keep it secret; build --sign-key)")
    console.result(f"public key:  {pair.public} (edgepack verify --key)")
    console.result(f"keyid:       {pair.keyid}")
