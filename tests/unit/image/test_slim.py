"""The layer-content policy (packager/image/slim.py, data/slim-policy.toml)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from packager.errors import InputError
from packager.image import debian, wheels
from packager.image.debian import DebianLock, LockedPackage, base_layer_key, base_policy
from packager.image.layer import TarEntry
from packager.image.slim import (
    POLICY_FILE,
    Removal,
    glob_regex,
    layer_policy,
    load_policy,
    no_policy,
    parse_policy,
)
from packager.image.spec import DebianBase, WheelSet
from packager.image.wheels import LockedWheel, layer_key, wheel_policy

SITE = "opt/edgepack/site-packages"


def test_the_packaged_policy_parses_and_every_entry_gives_a_reason() -> None:
    removals = load_policy()
    assert len(removals) >= 20
    assert {r.layer for r in removals} == {"base", "wheels"}
    assert all(len(r.reason) > 10 for r in removals)
    assert len({(r.layer, r.glob) for r in removals}) == len(removals)


@pytest.mark.parametrize(
    ("glob", "path", "matches"),
    [
        ("usr/lib/*-linux-gnu/gconv", "usr/lib/aarch64-linux-gnu/gconv", True),
        ("usr/lib/*-linux-gnu/gconv", "usr/lib/aarch64/linux-gnu/gconv", False),
        ("a/**/tests", "a/tests", True),
        ("a/**/tests", "a/b/c/tests", True),
        ("a/**/tests", "a/b/c/tests2", False),
        ("a/**/*.{pyi,pxd}", "a/x/y.pyi", True),
        ("a/**/*.{pyi,pxd}", "a/x/y.py", False),
        ("lib{x,y}.so*", "liby.so.1", True),
        ("lib{x,y}.so*", "libz.so.1", False),
        ("a.b", "aXb", False),  # '.' is literal
    ],
)
def test_glob_syntax(glob: str, path: str, matches: bool) -> None:
    assert (glob_regex(glob).fullmatch(path) is not None) is matches


def test_a_directory_entry_removes_its_subtree_and_nothing_beside_it() -> None:
    policy = layer_policy("base")
    assert policy.reason("usr/lib/aarch64-linux-gnu/gconv/IBM1390.so") is not None
    assert policy.reason("usr/lib/x86_64-linux-gnu/gconv/gconv-modules") is not None
    assert policy.reason("usr/lib/python3.11/unittest/mock.py") is not None
    assert policy.reason("usr/lib/python3.11/json/__init__.py") is None
    assert policy.reason("usr/lib/python3.11/unittestx.py") is None
    assert policy.reason("usr/lib/aarch64-linux-gnu/libc.so.6") is None
    assert policy.reason("usr/lib/aarch64-linux-gnu/libsqlite3.so.0") is not None


def test_wheel_entries_follow_the_site_packages_path() -> None:
    policy = layer_policy("wheels", site_packages="/srv/site")
    lib = "onnxruntime/capi/libonnxruntime.so.1.32.0"
    assert policy.reason(f"srv/site/{lib}") is not None
    assert policy.reason(f"{SITE}/{lib}") is None
    assert policy.reason("srv/site/onnxruntime/capi/onnxruntime_pybind11_state.so") is None
    assert policy.reason("srv/site/numpy/_core/tests/test_umath.py") is not None
    assert policy.reason("srv/site/numpy/testing/__init__.py") is None
    assert policy.reason("srv/site/numpy/typing/__init__.py") is None  # the runtime imports it


def test_split_keeps_order_and_no_policy_keeps_all() -> None:
    entries = [
        TarEntry("usr/lib/python3.11/json/__init__.py", "file", 0o644),
        TarEntry("usr/lib/python3.11/pydoc_data/topics.py", "file", 0o644),
        TarEntry("usr/lib/python3.11/os.py", "file", 0o644),
    ]
    kept, removed = layer_policy("base").split(entries)
    assert [e.path for e in kept] == [entries[0].path, entries[2].path]
    assert removed == [entries[1]]
    assert no_policy("base").split(entries) == (entries, [])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 2\n", "version must be 1"),
        ('version = 1\n[[remove]]\nlayer = "base"\nglob = "x"\n', "exactly the keys"),
        ('version = 1\n[[remove]]\nlayer = "rootfs"\nglob = "x"\nreason = "r"\n', "layer"),
        ('version = 1\n[[remove]]\nlayer = "base"\nglob = "x"\nreason = " "\n', "reason"),
        ('version = 1\n[[remove]]\nlayer = "base"\nglob = "/etc"\nreason = "r"\n', "glob"),
        ('version = 1\n[[remove]]\nlayer = "base"\nglob = "a/../b"\nreason = "r"\n', "glob"),
        ('version = 1\n[[remove]]\nlayer = "base"\nglob = "a/{b"\nreason = "r"\n', "without"),
        ('version = 1\n[[remove]]\nlayer = "base"\nglob = "a b"\nreason = "r"\n', "glob"),
        ("version = ", "not valid TOML"),
    ],
)
def test_a_bad_policy_is_one_line_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        parse_policy(text, "policy.toml")
    assert "policy.toml" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_policy_file_is_data_next_to_the_module() -> None:
    assert POLICY_FILE.name == "slim-policy.toml" and POLICY_FILE.is_file()
    assert POLICY_FILE.parent == Path(debian.__file__).parent / "data"


def _lock() -> DebianLock:
    pkg = LockedPackage("libc6", "2.36", "arm64", "libc6_2.36_arm64.deb", 1, "ab" * 32)
    return DebianLock("arm64", "bookworm", ("libc6",), (pkg,))


def test_layer_cache_keys_cover_the_policy_and_the_compression(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An edited policy, --no-slim or zstd never reuses a cached layer built otherwise."""
    base = DebianBase(packages=("libc6",))
    wheel_set = WheelSet(requirements=("numpy==2.4.6",))
    locked = (LockedWheel("numpy.whl", "cd" * 32, 1),)
    base_key = base_layer_key(base, _lock(), (), 0)
    wheel_key = layer_key(wheel_set, locked, 0)
    assert base_key != base_layer_key(replace(base, slim=False), _lock(), (), 0)
    assert wheel_key != layer_key(replace(wheel_set, slim=False), locked, 0)
    assert base_key != base_layer_key(base, _lock(), (), 0, "zstd")
    assert wheel_key != layer_key(wheel_set, locked, 0, "zstd")
    # The same policy file edited: new keys.
    edited = (*load_policy(), Removal("base", "usr/share/extra", "test"))
    edited_wheels = (*load_policy(), Removal("wheels", "{site-packages}/extra", "test"))

    def fake(layer: str, *, site_packages: str = "", removals: object = None) -> object:
        return layer_policy(
            layer,  # type: ignore[arg-type]
            site_packages=site_packages,
            removals=edited if layer == "base" else edited_wheels,
        )

    monkeypatch.setattr(debian, "layer_policy", fake)
    monkeypatch.setattr(wheels, "layer_policy", fake)
    assert base_layer_key(base, _lock(), (), 0) != base_key
    assert layer_key(wheel_set, locked, 0) != wheel_key
    assert base_policy(base).reason("usr/share/extra/x") is not None
    assert wheel_policy(wheel_set).reason(f"{SITE}/extra") is not None
