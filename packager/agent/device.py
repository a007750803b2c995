"""What this device is, for a release's ``compat.requires`` (packager.agent.protocol): the L4T
release and the GPU's compute capability (SM) of an NVIDIA Jetson, and whether a release's
requirements are met (:func:`unmet`).

The agent does not read the device's files itself. The rules (``/etc/nv_tegra_release``'s first
line; the SoC from the device tree or ``tegra_chip_id``, and its SM) live in ONE place, the Jetson
bundle's preflight, packager/runtime/jetson_preflight.py: it ships with every bundle and is
installed at ``/opt/edgepack/<name>/jetson_preflight.py`` by the bundle's install.sh
(templates/jetson/install.sh.jinja), the same run that (re)installs the agent. A release installed
over the air does not replace it: a new SoC or L4T rule reaches a device when a newer bundle's
install.sh runs there. The agent runs it as its *facts probe* (``AgentConfig.facts_probe``, an
argv such as ``/usr/bin/python3 /opt/edgepack/<name>/jetson_preflight.py --facts``, written by
install-container.sh for a Jetson bundle; tests add the preflight's ``--root FIXTURE``) through
:func:`.engine.capture` (at most ``facts_timeout_s`` seconds and :data:`FACTS_MAX_BYTES` of
output) and parses its one JSON object strictly (:func:`parse_facts`)::

    {"schema": "edgepack.device-facts/v1", "l4t": "r36.3.0" | null, "l4t_found": "...",
     "sm": 87 | null, "sm_found": "..."}

No probe configured, a probe that cannot start, exits non-zero, times out, prints more than
:data:`FACTS_MAX_BYTES` or prints anything but exactly that object: the facts are unknown
(:func:`probe_facts` returns why, one line), and every release with requirements is skipped with
that reason. Nothing is guessed, and the agent goes on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .engine import argv_problem, capture, timeout_problem
from .protocol import check_requires, l4t_tuple

FACTS_SCHEMA = "edgepack.device-facts/v1"
# The probe prints about 200 bytes; 64 KiB is far above any honest answer.
FACTS_MAX_BYTES = 64 * 1024
# The longest ``*_found`` text accepted (the preflight quotes at most 80 characters of a file,
# escaped with ascii(): at most 10 characters each).
MAX_FOUND = 1000
_KEYS = frozenset({"schema", "l4t", "l4t_found", "sm", "sm_found"})


@dataclass(frozen=True)
class DeviceFacts:
    """The device as the requirements see it; None where it could not be read, with ``*_found``
    saying what was there instead (for the skip reason)."""

    l4t: tuple[int, int, int] | None
    l4t_found: str
    sm: int | None
    sm_found: str


def _show(value: object) -> str:
    """``value`` as JSON (escaped: one printable line), cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"key {_show(key)} appears twice")
        found[key] = value
    return found


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_facts(raw: bytes) -> DeviceFacts:
    """The facts in the probe's stdout ``raw``: exactly one JSON object of :data:`FACTS_SCHEMA`
    (surrounding whitespace aside), every key present, no other key, no key twice; ``l4t`` null
    or a release by the requirements' own rule (:func:`.protocol.l4t_tuple`, i.e.
    :data:`.protocol.L4T_RELEASE` whole: ``rN.N.N``, each 0-999 without leading zeros); ``sm``
    null or an integer 10-999 (not a string, not a bool); ``l4t_found``/``sm_found``
    1-:data:`MAX_FOUND` printable characters.
    ValueError naming the first thing that is not so, in one line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("printed something that is not UTF-8") from None
    try:
        doc = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        # RecursionError: "[[[[..." nested deeper than the parser's stack.
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ValueError(f"printed something that is not one JSON object ({detail})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"printed {_show(doc)}, not a JSON object")
    extra = sorted(set(doc) - _KEYS)
    if extra:
        raise ValueError(f"printed unexpected keys {_show(extra)}")
    missing = sorted(_KEYS - set(doc))
    if missing:
        raise ValueError(f"printed no {', '.join(missing)}")
    if doc["schema"] != FACTS_SCHEMA:
        raise ValueError(f"printed schema {_show(doc['schema'])}, expected {FACTS_SCHEMA}")
    l4t_text = doc["l4t"]
    l4t: tuple[int, int, int] | None = None
    if l4t_text is not None:
        try:
            # The requirements' own rule: the release the preflight prints (canonical ints) is
            # read exactly as l4t_min/l4t_below are, so both sides of a comparison share it.
            l4t = l4t_tuple(l4t_text) if isinstance(l4t_text, str) else None
        except ValueError:
            pass
        if l4t is None:
            raise ValueError(f"printed l4t {_show(l4t_text)}: not null or a release like r36.3.0")
    sm = doc["sm"]
    if sm is not None and (type(sm) is not int or not 10 <= sm <= 999):
        raise ValueError(f"printed sm {_show(sm)}: not null or a whole number 10-999")
    for key in ("l4t_found", "sm_found"):
        found = doc[key]
        if not (isinstance(found, str) and 0 < len(found) <= MAX_FOUND and found.isprintable()):
            raise ValueError(
                f"printed {key} {_show(found)}: not 1-{MAX_FOUND} printable characters"
            )
    return DeviceFacts(l4t, doc["l4t_found"], sm, doc["sm_found"])


def probe_facts(argv: Sequence[str], timeout_s: float) -> DeviceFacts | str:
    """Run the facts probe ``argv`` (``AgentConfig.facts_probe``) once and parse what it prints;
    the facts, or why they are unknown (one line naming the probe and what went wrong)."""
    if not argv:
        return "no facts probe configured (facts_probe in the agent's configuration)"
    problem = argv_problem(argv)
    if problem is not None:
        return f"facts_probe in the agent's configuration {problem}"
    problem = timeout_problem(timeout_s)
    if problem is not None:
        return f"facts_timeout_s in the agent's configuration {problem}"
    name = " ".join(argv)
    name = name if len(name) <= 200 else name[:197] + "..."
    ran = capture(argv, timeout_s=timeout_s, max_stdout=FACTS_MAX_BYTES)
    if not ran.ok:
        return f"facts probe {name}: {ran.line}"
    try:
        return parse_facts(ran.stdout)
    except ValueError as exc:
        return f"facts probe {name}: {exc}"


def unmet(requires: dict[str, str], facts: DeviceFacts | str) -> str:
    """'' when the device meets every requirement, else ONE line saying which requirement is not
    met (expected and found), or which is unknown or invalid, or why the device's facts are
    unknown (``facts`` a str, from :func:`probe_facts`): then nothing is guessed."""
    try:
        checked = check_requires(requires)
    except ValueError as exc:
        return str(exc)
    if not checked:
        return ""
    if isinstance(facts, str):
        return f"device facts unknown: {facts}"
    problems = []
    low, below = checked.get("l4t_min"), checked.get("l4t_below")
    if low is not None or below is not None:
        wanted = " and ".join(
            part
            for part in (f">= {low}" if low else "", f"< {below}" if below else "")
            if part
        )
        if (
            facts.l4t is None
            or (low and facts.l4t < l4t_tuple(low))
            or (below and facts.l4t >= l4t_tuple(below))
        ):
            problems.append(f"L4T {wanted} required, found {facts.l4t_found}")
    sm = checked.get("sm")
    if sm is not None and facts.sm != int(sm):
        problems.append(f"sm{sm} required, found {facts.sm_found}")
    return "; ".join(problems)
