"""The wheel layer's .pyc are written by the CPython release the image ships (issue 13).

CPython's compiler output changes between patch releases (3.11.2 and 3.11.7 compile numpy's
``pad()`` differently, measured with Dockerfile.builder), so the layer's cache key names the
release that compiled it, and when the image's release is known (edgepack's Debian base) only a
host interpreter of exactly that release compiles: Debian 12's ``/usr/bin/python3.11`` (3.11.2)
on this host, whose own Python is pyenv's 3.11.7."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from packager.image import wheels
from packager.image.builder import python_release
from packager.image.spec import PackageRecord, WheelSet
from packager.tools import python as host_python

HOST_MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"
HOST_RELEASE = ".".join(map(str, sys.version_info[:3]))
DEBIAN_PYTHON = Path(f"/usr/bin/python{HOST_MINOR}")
WHEEL_SET = WheelSet(("numpy==2.4.6",), python_version=HOST_MINOR)


def test_layer_key_changes_with_the_compiling_release() -> None:
    here = wheels.layer_key(WHEEL_SET, (), 0, compiler=HOST_RELEASE)
    assert wheels.layer_key(WHEEL_SET, (), 0, compiler="3.11.99") != here
    assert wheels.layer_key(WHEEL_SET, (), 0, compiler=None) != here


def test_another_minor_version_gets_no_pyc() -> None:
    other = WheelSet(("numpy==2.4.6",), python_version="3.99")
    assert wheels.bytecode_compiler(other) is None
    assert wheels.bytecode_compiler(other, "3.99.1") is None


def test_a_known_release_takes_only_an_interpreter_of_that_release() -> None:
    assert wheels.bytecode_compiler(WHEEL_SET, "3.11.999") is None  # no host has it
    chosen = wheels.bytecode_compiler(WHEEL_SET, HOST_RELEASE)
    assert chosen is not None and host_python.release_of(chosen) == HOST_RELEASE


def test_the_release_comes_from_the_debian_lock() -> None:
    deb = PackageRecord("deb", f"python{HOST_MINOR}-minimal", "3.11.2-6+deb12u6", "arm64",
                        "python3.11-minimal_3.11.2-6+deb12u6_arm64.deb", "0" * 64)  # fmt: skip
    other = PackageRecord("deb", "libc6", "2.36-9+deb12u10", "arm64", "libc6.deb", "0" * 64)
    assert python_release([other, deb], WHEEL_SET) == "3.11.2"
    assert python_release([other], WHEEL_SET) is None


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason=f"needs Debian's {DEBIAN_PYTHON}")
def test_debian_python_compiles_the_same_bytes_whatever_the_hash_seed(tmp_path: Path) -> None:
    """Two compiles of a module with set constants (marshalled in iteration order, which string
    hash randomisation changes) in two processes give the same bytes: the seed is fixed."""
    release = host_python.release_of(str(DEBIAN_PYTHON))
    assert release is not None
    interpreter = host_python.interpreter_for(release)
    assert interpreter is not None
    words = ", ".join(repr(f"w{i}") for i in range(64))
    outputs = []
    for run in ("a", "b"):
        root = tmp_path / run / "site"
        root.mkdir(parents=True)
        (root / "m.py").write_text(f"def f(x):\n    return x in {{{words}}}\n")
        host_python.compile_tree(interpreter, root, "/opt/edgepack/site-packages")
        (pyc,) = (root / "__pycache__").iterdir()
        outputs.append(pyc.read_bytes())
    assert outputs[0] == outputs[1]
    assert b"/opt/edgepack/site-packages/m.py" in outputs[0]
