"""Will the model fit the device? The report shape every backend fills (its own estimate lives in
its package under ``packager/backends/``), and the refusal.

The estimates are deliberately simple and stated with their parts, so a refusal tells the user
what is needed, what the target has, and where the numbers came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from packager.errors import FitError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Resource:
    """One budget of a fit check, in bytes: what the model needs (``needed_parts``, labelled,
    summing to ``needed_bytes``) against what the target offers, and where the figures
    come from (``available_note``, ``estimate_source``)."""

    name: str  # "memory", "storage", "ram", "flash"
    needed_bytes: int
    available_bytes: int
    needed_parts: tuple[tuple[str, int], ...]
    available_note: str  # how available was computed, e.g. "4096 MB RAM - 512 MB reserved"
    estimate_source: str = ""

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "needed_bytes": self.needed_bytes,
            "available_bytes": self.available_bytes,
            "needed_parts": {k: v for k, v in self.needed_parts},
            "available_note": self.available_note,
            "estimate_source": self.estimate_source,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class FitReport:
    """Every budget a backend checked for the target named ``target``: the ``fit`` of the
    manifest and of ``--json``; it fits when each resource does."""

    target: str
    resources: tuple[Resource, ...]

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.resources)

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "fits": self.fits,
            "resources": [r.to_json() for r in self.resources],
        }


def human_bytes(n: int) -> str:
    """``n`` bytes for people in binary units: ``512 B``, ``1.5 KiB``, ... up to ``GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def enforce(report: FitReport, *, force: bool, model_label: str) -> None:
    """Refuse a model that does not fit, naming what is needed and what the target has."""
    if force or report.fits:
        return
    bad = next(r for r in report.resources if not r.fits)
    parts = " + ".join(f"{label} {human_bytes(v)}" for label, v in bad.needed_parts if v)
    raise FitError(
        f"{model_label} does not fit {report.target}: {bad.name} needs "
        f"{human_bytes(bad.needed_bytes)} ({parts}), the target has "
        f"{human_bytes(bad.available_bytes)} ({bad.available_note})",
        hint="use a smaller or quantized model, a larger target, or --force to build anyway",
    )
