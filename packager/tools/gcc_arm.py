"""The Arm bare-metal cross toolchain (``arm-none-eabi-gcc`` and its binutils).

Used to check generated MCU sources the way the device build will see them: compiled for the
target's core and FPU, then the model symbol read back out of the object file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from packager.tools.base import Tool

CompletedBytes = subprocess.CompletedProcess[bytes]

_GCC_APT = "gcc-arm-none-eabi"
GCC = Tool(name="arm-none-eabi-gcc", executable="arm-none-eabi-gcc", apt_package=_GCC_APT)
GXX = Tool(name="arm-none-eabi-g++", executable="arm-none-eabi-g++", apt_package=_GCC_APT)
OBJCOPY = Tool(
    name="arm-none-eabi-objcopy",
    executable="arm-none-eabi-objcopy",
    apt_package="binutils-arm-none-eabi",
)
READELF = Tool(
    name="arm-none-eabi-readelf",
    executable="arm-none-eabi-readelf",
    apt_package="binutils-arm-none-eabi",
)


def cpu_flags(core: str, fpu: str) -> tuple[str, ...]:
    """gcc flags for a Cortex-M core and its FPU as named in a target file's ``[mcu]`` table."""
    flags = [f"-mcpu={core}", "-mthumb"]
    if fpu == "none":
        flags.append("-mfloat-abi=soft")
    else:
        flags += [f"-mfpu={fpu}", "-mfloat-abi=hard"]
    return tuple(flags)


def compile_cxx(source: Path, output: Path, flags: tuple[str, ...], include: Path) -> None:
    """Compile one C++ source to an object file (``-c``)."""
    GXX.run(["-std=c++17", "-Os", "-Wall", "-Werror", *flags, "-I", include, "-c", source,
             "-o", output])


def dump_section(obj: Path, section: str, output: Path) -> None:
    """Copy the raw bytes of one section of an object file to ``output``."""
    OBJCOPY.run(["-O", "binary", f"--only-section={section}", obj, output])


def symbols(obj: Path) -> str:
    """``readelf -Ws``: the symbol table as text (value, size, section index, name)."""
    return READELF.run(["-Ws", obj]).stdout.decode("utf-8", "replace")


SIZE = Tool(name="arm-none-eabi-size", executable="arm-none-eabi-size",
            apt_package="binutils-arm-none-eabi")
# Firmware links against newlib-nano with semihosting (librdimon): `edgepack run`'s emulator
# harness prints through the debugger channel. Needs libnewlib-arm-none-eabi and, for C++,
# libstdc++-arm-none-eabi-newlib.
LINK_FLAGS = ("--specs=nano.specs", "--specs=rdimon.specs", "-nostartfiles", "-Wl,--gc-sections")


def version() -> str:
    """``arm-none-eabi-g++ -dumpfullversion``: part of every object-cache key."""
    return GXX.run(["-dumpfullversion"], timeout=30).stdout.decode().strip()


def compile_object(source: Path, output: Path, flags: list[str], *, timeout: float) -> None:
    """Compile one C or C++ source (by suffix) to an object file with ``flags``."""
    tool = GCC if source.suffix == ".c" else GXX
    tool.run([*flags, "-c", source, "-o", output], timeout=timeout)


def link(objects: list[Path], output: Path, flags: list[str], map_file: Path) -> CompletedBytes:
    """Link a firmware ELF; returns the finished process (not checked: the caller reads the
    undefined symbols out of a failed link)."""
    return GXX.run([*flags, *LINK_FLAGS, f"-Wl,-Map={map_file}", *objects, "-o", output],
                   timeout=600, check=False)


def section_sizes(elf: Path) -> tuple[int, int, int]:
    """``arm-none-eabi-size`` (Berkeley format) of an ELF: (text, data, bss) in bytes. Flash holds
    text + data (the initial values), RAM holds data + bss."""
    out = SIZE.run([elf], timeout=30).stdout.decode().splitlines()
    text, data, bss = (int(v) for v in out[1].split()[:3])
    return text, data, bss
