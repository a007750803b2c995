"""``edgepack verify BUNDLE``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from packager.backends import get_backend
from packager.bundle.signing import load_public_key
from packager.bundle.verify import verify_attestations, verify_bundle
from packager.console import console
from packager.errors import VerifyError


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    help="The signer's public key (PEM): the bundle must be signed by it (exit 8 otherwise).",
)
@click.option(
    "--require-signature",
    is_flag=True,
    help="Refuse an unsigned bundle (exit 8); with --key, the signature must verify.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(bundle: Path, key: Path | None, require_signature: bool, as_json: bool) -> None:
    """Re-check every checksum of BUNDLE and its image's digests; with --key, its signature."""
    console.configure(quiet=as_json)
    public = load_public_key(key) if key is not None else None
    # One read of manifest.json: not a bundle at all (exit 3), or a manifest with an unknown
    # or missing field (exit 8), before any signature talk; then the signature over those same
    # bytes (a bundle whose files, SHA256SUMS and manifest.json were regenerated together
    # passes every checksum, and only the signature can tell), then every checksum.
    check = verify_bundle(bundle, get_backend, key=public, require_signature=require_signature)
    attestations: dict[str, Any] | None = None
    if check.signature is not None:
        attestations = verify_attestations(bundle, public, check.signature)
    problems = check.problems
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"{bundle}: {problems[0]}{more}", details=tuple(problems[1:]))
    if attestations is None:
        attestations = verify_attestations(bundle, None, None)
    if as_json:
        console.json(
            {"bundle": str(bundle), "ok": True, "problems": [], "attestations": attestations}
        )
        return
    console.result(f"{bundle}: OK")
    for line in describe(attestations):
        console.result(line)


def describe(attestations: dict[str, Any]) -> list[str]:
    """One line each: the signature (who), the SBOM (how many packages), the provenance."""
    signature = attestations["signature"]
    if signature["verified"]:
        who = f"verified, key {signature['keyid'][:16]}"
    elif signature["signed"]:
        who = f"present, key {str(signature['keyid'])[:16]} (not checked: pass --key)"
    else:
        who = "none (unsigned bundle)"
    lines = [f"signature:  {who}"]
    sbom = attestations["sbom"]
    lines.append(
        f"sbom:       {sbom['file']}: {sbom['components']} components "
        f"({sbom['debian_packages']} Debian packages, {sbom['wheels']} wheels, "
        f"{sbom['models']} model)"
        if sbom
        else "sbom:       none"
    )
    provenance = attestations["provenance"]
    if provenance:
        inputs = ", ".join(provenance["inputs"])
        lines.append(f"provenance: {provenance['file']} ({provenance['status']}): {inputs}")
    else:
        lines.append("provenance: none")
    return lines
