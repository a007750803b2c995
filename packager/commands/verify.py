"""``edgepack verify BUNDLE``."""

from __future__ import annotations

from pathlib import Path

import click

from packager.bundle.verify import verify_bundle
from packager.console import console
from packager.errors import VerifyError


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(bundle: Path, as_json: bool) -> None:
    """Re-check every checksum of BUNDLE and its image's digests."""
    console.configure(quiet=as_json)
    problems = verify_bundle(bundle)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"{bundle}: {problems[0]}{more}", details=tuple(problems[1:]))
    if as_json:
        console.json({"bundle": str(bundle), "ok": True, "problems": []})
    else:
        console.result(f"{bundle}: OK")
