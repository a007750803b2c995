"""The typed manifest on a bundle ``edgepack build`` really wrote (an MCU bundle: no image to
build, so it runs here), read back through ``edgepack verify`` and its ``--json``: a round trip
that changes nothing, and one exit-8 line naming the field for what a manifest must not hold."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from packager.backends.mcu.manifest import McuSection
from packager.bundle.manifest import MANIFEST, SCHEMA, Manifest, read_manifest
from packager.errors import ExitCode
from tests.cli_runner import run_cli

TFLM = Path(__file__).resolve().parents[4] / "shared" / "testdata" / "tflm"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "bundle"
    with pytest.raises(SystemExit) as exited:
        from packager.cli import main

        main(["build", str(TFLM / "hello_world_int8.tflite"), "--target", "nrf52840-dk",
              "--out", str(out), "--opt", "update=off", "--no-emulate", "--json"])
    assert exited.value.code == 0
    return out


def _copy(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(built, copy)
    return copy


def test_a_built_manifest_round_trips_unchanged(built: Path) -> None:
    document = json.loads((built / MANIFEST).read_text())
    manifest = read_manifest(built)
    assert document["schema"] == SCHEMA
    assert manifest.to_json() == document
    assert Manifest.from_json(manifest.to_json()) == manifest
    section = manifest.device_as(McuSection)
    assert section.proof == {"emulated": False, "note": "skipped: --opt emulate=off"}
    assert section.to_json() == document["device"]
    assert manifest.model.digest == "sha256:" + section.model_sha256


def test_a_built_bundle_verifies(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["verify", str(built), "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"] is True


CASES: dict[str, tuple[Callable[[dict[str, Any]], object], str]] = {
    "unknown-key": (lambda d: d["model"].update(sise_bytes=1),
                    "model.sise_bytes: unknown key (did you mean 'size_bytes'?)"),
    "unknown-device-key": (lambda d: d["device"].update(arena_byts=1),
                           "device.arena_byts: unknown key (did you mean 'arena_bytes'?)"),
    "missing-key": (lambda d: d["target"].pop("name"), "target.name: is required"),
    "missing-device-key": (lambda d: d["device"].pop("arena_bytes"),
                           "device.arena_bytes: is required"),
    "old-schema": (lambda d: d.update(schema="edgepack.bundle/v1"),
                   "schema: 'edgepack.bundle/v1' is not supported"),
    "unknown-device-class": (lambda d: d["target"].update(device_class="toaster"),
                             "target.device_class: no backend builds 'toaster' targets"),
    # Relabelled as a container bundle: there is no image to check, and that is refused.
    "relabelled-class": (lambda d: d["target"].update(device_class="linux-container"),
                         "image: is required for a linux-container bundle"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unknown_missing_or_old_is_one_exit_8_line_under_json_too(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, expected = CASES[case]
    bundle = _copy(built, tmp_path)
    document = json.loads((bundle / MANIFEST).read_text())
    change(document)
    (bundle / MANIFEST).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    code, out, err = run_cli(["verify", str(bundle)], capsys)
    assert code == ExitCode.VERIFY, err
    assert err.count("error:") == 1 and expected in err and "Traceback" not in err, err
    assert str(bundle / MANIFEST) in err
    code, out, err = run_cli(["verify", str(bundle), "--json"], capsys)
    error = json.loads(out)  # exactly one JSON document on stdout
    assert code == ExitCode.VERIFY and error["exit_code"] == 8 and error["error"] == "verify"
    assert expected in error["message"] and "Traceback" not in out + err
