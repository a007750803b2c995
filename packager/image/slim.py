"""The layer-content policy: what the Debian base and the wheel layer leave out (issue 16).

The policy is data, ``packager/image/data/slim-policy.toml``: a list of ``[[remove]]`` entries,
each a layer ("base" or "wheels"), a glob over paths relative to the image root and the reason the
on-device runtime never needs what it matches. tests/integration/test_slim_image.py is the proof
that it does not: it traces the full image running the whole runtime workload under qemu and fails
when the trace touches anything removed.

Glob syntax (whole path, relative to the image root, no leading slash): ``*`` matches within one
path component, ``**/`` any number of components, ``?`` one character, ``{a,b}`` either
alternative (not nested); ``{site-packages}`` is replaced by the wheel set's site-packages path
first. A path is removed when the glob matches it or one of its ancestors.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packager.errors import InputError
from packager.image.layer import TarEntry, normalize_path, parent_dirs

PolicyLayer = Literal["base", "wheels"]
POLICY_FILE = Path(__file__).resolve().parent / "data" / "slim-policy.toml"
SITE_PACKAGES = "{site-packages}"

# Whole-glob allow-list: path characters, the glob operators and one placeholder; no "..".
_GLOB = re.compile(r"(?:\{site-packages\}|[A-Za-z0-9._+*?,{}/-])+")
_LAYERS: tuple[PolicyLayer, ...] = ("base", "wheels")


@dataclass(frozen=True)
class Removal:
    """One policy entry, as written in the policy file."""

    layer: PolicyLayer
    glob: str
    reason: str


@dataclass(frozen=True)
class LayerPolicy:
    """The entries of one layer, their globs resolved and compiled."""

    layer: PolicyLayer
    rules: tuple[tuple[Removal, str, re.Pattern[str]], ...]  # (entry, resolved glob, regex)

    def key(self) -> list[str]:
        """What goes into the layer's cache key: the resolved globs, in file order."""
        return [glob for _, glob, _ in self.rules]

    def reason(self, path: str) -> Removal | None:
        """The entry that removes ``path`` (normalized, relative to the root), or None."""
        candidates = [*parent_dirs(path), path]
        for removal, _, pattern in self.rules:
            if any(pattern.fullmatch(p) for p in candidates):
                return removal
        return None

    def split(self, entries: Iterable[TarEntry]) -> tuple[list[TarEntry], list[TarEntry]]:
        """(kept, removed) entries, each in the order given."""
        kept: list[TarEntry] = []
        removed: list[TarEntry] = []
        for entry in entries:
            (removed if self.reason(entry.path) is not None else kept).append(entry)
        return kept, removed


def glob_regex(glob: str) -> re.Pattern[str]:
    """Compile a policy glob (syntax in the module docstring) to a whole-path regex.

    Raises ValueError for an unbalanced or nested ``{``.
    """
    out: list[str] = []
    i = 0
    depth = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "{":
            if depth:
                raise ValueError("nested '{'")
            depth = 1
            out.append("(?:")
        elif c == "}":
            if not depth:
                raise ValueError("'}' without '{'")
            depth = 0
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise ValueError("'{' without '}'")
    return re.compile("".join(out))


def parse_policy(text: str, source: str) -> tuple[Removal, ...]:
    """The entries of a policy document. Raises InputError naming ``source`` and the entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: not valid TOML ({exc})") from exc
    if doc.get("version") != 1:
        raise InputError(f"{source}: version must be 1", hint="this edgepack reads version 1")
    entries = doc.get("remove", [])
    if not isinstance(entries, list):
        raise InputError(f"{source}: remove must be an array of tables ([[remove]])")
    removals: list[Removal] = []
    for index, item in enumerate(entries):
        where = f"{source}: remove[{index}]"
        if not isinstance(item, dict) or set(item) != {"layer", "glob", "reason"}:
            raise InputError(f"{where}: needs exactly the keys layer, glob and reason")
        layer, glob, reason = item["layer"], item["glob"], item["reason"]
        if layer not in _LAYERS:
            raise InputError(f"{where}.layer: {layer!r} is not one of {', '.join(_LAYERS)}")
        if not isinstance(reason, str) or not reason.strip():
            raise InputError(f"{where}.reason: say why the runtime never needs this")
        if (
            not isinstance(glob, str)
            or not _GLOB.fullmatch(glob)
            or glob.startswith("/")
            or ".." in glob.split("/")
        ):
            raise InputError(
                f"{where}.glob: {glob!r} is not a relative path glob",
                hint="letters, digits, . _ + - / and * ? {a,b}; no '..', no leading '/'",
            )
        try:
            glob_regex(glob)
        except ValueError as exc:
            raise InputError(f"{where}.glob: {glob!r}: {exc}") from exc
        removals.append(Removal(layer, glob, reason.strip()))
    return tuple(removals)


def load_policy(path: Path = POLICY_FILE) -> tuple[Removal, ...]:
    """The policy file's entries (the packaged one by default). Raises InputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the layer policy ({exc.strerror})") from exc
    return parse_policy(text, str(path))


def layer_policy(
    layer: PolicyLayer,
    *,
    site_packages: str = "",
    removals: tuple[Removal, ...] | None = None,
) -> LayerPolicy:
    """The compiled entries for ``layer``; ``{site-packages}`` becomes ``site_packages``."""
    site = normalize_path(site_packages) if site_packages else ""
    rules = []
    for removal in load_policy() if removals is None else removals:
        if removal.layer != layer:
            continue
        if SITE_PACKAGES in removal.glob and not site:
            continue  # no site-packages in this layer: the entry cannot apply
        glob = removal.glob.replace(SITE_PACKAGES, site)
        rules.append((removal, glob, glob_regex(glob)))
    return LayerPolicy(layer, tuple(rules))


def no_policy(layer: PolicyLayer) -> LayerPolicy:
    """A policy that removes nothing (the full image: ``slim=False``)."""
    return LayerPolicy(layer, ())
