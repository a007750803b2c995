"""The Arm bare-metal cross toolchain (``arm-none-eabi-gcc`` and its binutils).

Used to check generated MCU sources the way the device build will see them: compiled for the
target's core and FPU, then the model symbol read back out of the object file.
"""

from __future__ import annotations

from pathlib import Path

from packager.tools.base import Tool

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
