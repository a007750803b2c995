"""``edgepack targets list|show``."""

from __future__ import annotations

from typing import Any

import click

from packager.backends import get_backend
from packager.console import Table, console
from packager.targets import catalogue, resolve_target


@click.group("targets")
def targets_group() -> None:
    """The device targets edgepack knows (targets/*.toml)."""


@targets_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_cmd(as_json: bool) -> None:
    """List the shipped targets."""
    loaded = [resolve_target(name) for name in catalogue()]
    if as_json:
        console.json(
            [
                {"name": t.name, "device_class": t.device_class, "description": t.spec.description}
                for t in loaded
            ]
        )
        return
    table = Table("name", "class", "description", box=None)
    for t in loaded:
        table.add_row(t.name, t.device_class, t.spec.description)
    console.table(table)


@targets_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show_cmd(name: str, as_json: bool) -> None:
    """Show one target (a name or a TOML file), validated."""
    target = resolve_target(name)
    document: dict[str, Any] = {"source": target.source, **target.spec.model_dump(mode="json")}
    notes = get_backend(target.device_class).target_notes(target)
    if as_json:
        console.json({**document, **{note.key: note.value for note in notes}})
        return
    console.result(f"{target.name}: {target.spec.description}  [{target.source}]")
    for note in notes:
        console.result(f"  {note.line}")
    for key, value in document.items():
        if isinstance(value, dict):
            console.result(f"  [{key}]")
            for k, v in value.items():
                console.result(f"    {k} = {v}")
