"""The skopeo wrapper's registry flags (issue 13)."""

from __future__ import annotations

from pathlib import Path

from packager.tools.skopeo import RegistryOptions


def test_registry_options_spell_skopeo_flags() -> None:
    assert RegistryOptions().flags("dest") == []  # skopeo's default, registries.conf's say
    assert RegistryOptions(tls_verify=True).flags("dest") == ["--dest-tls-verify=true"]
    assert RegistryOptions(tls_verify=False).flags() == ["--tls-verify=false"]
    assert RegistryOptions(authfile=Path("/a.json")).flags("src") == [
        "--src-authfile",
        "/a.json",
    ]
