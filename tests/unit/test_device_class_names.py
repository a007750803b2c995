"""Core code never names a device class: it reaches one only through its backend
(packager.backends.base.Backend), so a new class is one package under packager/backends/.

The names are every REGISTRY key and every backend package, spelled as code spells them:
lower case (``"mcu"``, ``backends.linux``, ``write_mcu_sbom``) or as the head of a CamelCase
identifier (``McuTarget``, ``LinuxContainerBackend``). Prose (``MCU``, ``a Linux device``) in
docstrings and comments is documentation and left alone; so is an OCI platform (``linux/arm64``),
which names an operating system, not a device class.
"""

from __future__ import annotations

import re
from pathlib import Path

import packager
from packager.backends import REGISTRY

PACKAGER = Path(packager.__file__).resolve().parent
CORE = ("build.py", "plan.py", "commands", "bundle", "ota")
OCI_PLATFORM = re.compile(r"\blinux/(?:amd64|arm64|arm|386|ppc64le|s390x|riscv64)\b")


def device_class_names() -> tuple[str, ...]:
    packages = {
        p.name for p in (PACKAGER / "backends").iterdir()
        if p.is_dir() and (p / "__init__.py").is_file()
    }
    return tuple(sorted(set(REGISTRY) | packages, key=len, reverse=True))


def _patterns(names: tuple[str, ...]) -> list[re.Pattern[str]]:
    patterns = []
    for name in names:
        words = re.split(r"[-_]", name)
        camel = "".join(w.capitalize() for w in words)
        # lower case, not inside a longer lower-case word (``_mcu_`` and ``.mcu.`` count)
        patterns.append(re.compile(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![a-z0-9])"))
        # the head of a CamelCase identifier: McuTarget, LinuxContainerBackend
        patterns.append(re.compile(rf"(?<![A-Za-z0-9]){camel}(?=[A-Z])"))
    return patterns


def core_files() -> list[Path]:
    files: list[Path] = []
    for entry in CORE:
        path = PACKAGER / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
    return files


def offences(files: list[Path], names: tuple[str, ...]) -> list[str]:
    patterns = _patterns(names)
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            text = OCI_PLATFORM.sub("", line)
            for pattern in patterns:
                match = pattern.search(text)
                if match:
                    rel = path.relative_to(PACKAGER.parent) if path.is_relative_to(
                        PACKAGER.parent) else path
                    found.append(f"{rel}:{number}: {match.group()!r}: {line.strip()}")
                    break
    return found


def test_the_core_names_no_device_class() -> None:
    names = device_class_names()
    assert {"mcu", "linux"} <= set(names)  # the registry and the packages were found
    files = core_files()
    assert PACKAGER / "build.py" in files and any(p.parent.name == "commands" for p in files)
    found = offences(files, names)
    assert not found, "device-class names in core code (use the backend):\n" + "\n".join(found)


def test_the_grep_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The patterns catch the spellings the core used to have, and leave prose and platforms."""
    sample = tmp_path / "sample.py"
    bad = [
        'if target.device_class == "mcu":',
        "from packager.backends.linux.backend import check_ota_flags",
        "def write_mcu_sbom(prepared): ...",
        "if isinstance(target.spec, McuTarget):",
        'device_class != "linux-container"',
        "from packager.backends.mcu.emulate import proof_note",
    ]
    good = [
        '"platform": "linux/arm64",',
        "# a microcontroller (MCU) bundle carries firmware",
        '"""Over-the-air updates for Linux devices."""',
        "mcuboot_slots = 2  # not a class name: a longer word",
    ]
    sample.write_text("\n".join(bad + good) + "\n", encoding="utf-8")
    found = offences([sample], ("linux-container", "linux", "mcu"))
    assert [int(f.split(":")[1]) for f in found] == list(range(1, len(bad) + 1)), found
    assert found[0].startswith(f"{sample}:1: 'mcu'")
