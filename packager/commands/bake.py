"""``edgepack bake BUNDLE... --out DIR``: a docker buildx bake folder for the bundles."""

from __future__ import annotations

from pathlib import Path

import click

from packager.bake import bake
from packager.console import console


@click.command("bake")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="The bake folder: docker-bake.hcl, Dockerfile (kept when present), images/.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bake_cmd(bundles: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Write a docker buildx bake definition for BUNDLES into a folder.

    \b
    One target per model x device (mnist-rpi4), one multi-platform target per model (mnist:
    one tag, one OCI index); each builds the folder's Dockerfile FROM the bundle's image
    (a named context, oci-layout://, pinned by digest). Then, in that folder:
      docker buildx bake --push          (tags ${REGISTRY}/MODEL:VERSION[-DEVICE])
      docker buildx bake --load          (the local engine)
      OCI_DIR=out docker buildx bake     (out/TARGET.tar, OCI archives)
    """
    console.configure(quiet=as_json)
    result = bake(bundles, out)
    if as_json:
        console.json(result.to_json())
        return
    console.result(f"bake file:  {result.bake_file}")
    kept = "written" if result.dockerfile_written else "kept (yours)"
    console.result(f"Dockerfile: {result.dockerfile} ({kept})")
    for target in result.targets:
        console.result(
            f"target {target.name}: {', '.join(target.platforms)} -> ${{REGISTRY}}/{target.tag}"
        )
    console.result(f"next: cd {out} && docker buildx bake --push")
