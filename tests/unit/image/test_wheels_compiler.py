"""The wheel layer's cache key names the CPython that compiles its .pyc (issue 13): CPython's
compiler output changes between patch releases (3.11.2 and 3.11.7 compile numpy's ``pad()``
differently, measured with Dockerfile.builder), so a layer cached by one interpreter must not
stand in for another's build."""

from __future__ import annotations

import sys

import pytest

from packager.image import wheels
from packager.image.spec import WheelSet


def test_layer_key_changes_with_the_compiling_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wheel_set = WheelSet(
        ("numpy==2.4.6",), python_version=f"{sys.version_info[0]}.{sys.version_info[1]}"
    )
    assert wheels.compiles_bytecode(wheel_set)
    here = wheels.layer_key(wheel_set, (), 0)
    monkeypatch.setattr(sys, "version", "3.11.99 (main, Jan 1 2030, 00:00:00) [GCC 12.2.0]")
    assert wheels.layer_key(wheel_set, (), 0) != here


def test_layer_key_ignores_the_interpreter_when_nothing_is_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wheel_set = WheelSet(("numpy==2.4.6",), python_version="3.99")  # another minor: no .pyc
    assert not wheels.compiles_bytecode(wheel_set)
    here = wheels.layer_key(wheel_set, (), 0)
    monkeypatch.setattr(sys, "version", "3.11.99 (main, Jan 1 2030, 00:00:00) [GCC 12.2.0]")
    assert wheels.layer_key(wheel_set, (), 0) == here
