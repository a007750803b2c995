"""Crafted and oversized bundle documents through the real CLI (``edgepack verify``, ``verify
--json`` and ``ota publish``): exit 8 and one line, never an internal error or an unbounded read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from packager.bundle.manifest import MAX_DOCUMENT_BYTES, MAX_FILES, SCHEMA
from packager.cli import main
from packager.errors import ExitCode
from tests.unit.ota.synth import make_bundle


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def _bundle(tmp: Path) -> Path:
    return make_bundle(tmp / "b").path


def _with_files_entry(bundle: Path, field: str, literal: str) -> None:
    """manifest.json with files[0][field] written as the raw JSON ``literal``."""
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["files"][0][field] = "@@PLACEHOLDER@@"
    text = json.dumps(doc, indent=2).replace('"@@PLACEHOLDER@@"', literal)
    (bundle / "manifest.json").write_text(text)


def _edit(bundle: Path, change: Callable[[dict[str, Any]], object]) -> None:
    doc = json.loads((bundle / "manifest.json").read_text())
    change(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc, indent=2))


CRAFTED = {
    "deep": lambda b: (b / "manifest.json").write_text(
        '{"schema": "' + SCHEMA + '", "x": ' + "[" * 200_000 + "]" * 200_000 + "}"),
    "moderately-deep": lambda b: (b / "manifest.json").write_text(
        '{"schema": "' + SCHEMA + '", "files": [], "x": ' + "[" * 900 + "]" * 900 + "}"),
    "sha256-int": lambda b: _with_files_entry(b, "sha256", "5"),
    "sha256-not-hex": lambda b: _with_files_entry(b, "sha256", '"' + "z" * 64 + '"'),
    "size-5000-digits": lambda b: _with_files_entry(b, "size", "1" * 5000),
    "size-negative": lambda b: _with_files_entry(b, "size", "-1"),
    "size-bool": lambda b: _with_files_entry(b, "size", "true"),
    "path-int": lambda b: _with_files_entry(b, "path", "7"),
    "files-dict": lambda b: (b / "manifest.json").write_text(
        '{"schema": "' + SCHEMA + '", "files": {}}'),
    # The typed manifest (packager.bundle.manifest.Manifest): unknown, missing and mistyped
    # fields, and other schemas.
    "unknown-key": lambda b: _edit(b, lambda d: d["image"].update(prot=8080)),
    "unknown-top-key": lambda b: _edit(b, lambda d: d.update(mcu={})),
    "missing-key": lambda b: _edit(b, lambda d: d["model"].pop("digest")),
    "missing-section": lambda b: _edit(b, lambda d: d.pop("fit")),
    "port-string": lambda b: _edit(b, lambda d: d["image"].update(port="8080")),
    "schema-v1": lambda b: _edit(b, lambda d: d.update(schema="edgepack.bundle/v1")),
    "schema-missing": lambda b: _edit(b, lambda d: d.pop("schema")),
    "not-an-object": lambda b: (b / "manifest.json").write_text("[]"),
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_crafted_manifest_is_exit_8_in_verify_json_and_publish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    bundle = _bundle(tmp_path)
    CRAFTED[kind](bundle)
    code, _, err = _cli(capsys, "verify", str(bundle))
    assert code == ExitCode.VERIFY, err
    assert len(err.strip().splitlines()) == 1 and "manifest.json" in err, err
    code, out, _ = _cli(capsys, "verify", str(bundle), "--json")
    assert code == ExitCode.VERIFY and json.loads(out)["error"] == "verify", out
    repo = tmp_path / "repo"
    assert _cli(capsys, "ota", "init", str(repo))[0] == 0
    code, _, err = _cli(capsys, "ota", "publish", str(bundle), "--repo", str(repo))
    assert code == ExitCode.VERIFY and "internal error" not in err, err


def test_whitespace_padded_manifest_past_the_cap_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(tmp_path)
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text + " " * (MAX_DOCUMENT_BYTES + 1 - len(text)))
    code, _, err = _cli(capsys, "verify", str(bundle))
    assert code == ExitCode.VERIFY and f"more than the {MAX_DOCUMENT_BYTES} bytes" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["SHA256SUMS", "confinement.json", "manifest.dsse.json",
                                  "sbom.cdx.json"])
def test_any_bundle_document_past_the_cap_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    bundle = _bundle(tmp_path)
    with (bundle / name).open("wb") as fh:
        fh.truncate(MAX_DOCUMENT_BYTES + 1)  # sparse: the check must not need to read it
    code, _, err = _cli(capsys, "verify", str(bundle))
    assert code == ExitCode.VERIFY and name in err and "bytes a bundle document" in err, err


def test_manifest_with_too_many_entries_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(tmp_path)
    doc = json.loads((bundle / "manifest.json").read_text())
    entry = doc["files"][0]
    doc["files"] = [dict(entry, path=f"f{i}") for i in range(MAX_FILES + 1)]
    (bundle / "manifest.json").write_text(json.dumps(doc))
    code, _, err = _cli(capsys, "verify", str(bundle))
    assert code == ExitCode.VERIFY and f"at most {MAX_FILES}" in err, err


def test_two_problems_make_one_error_line_and_indented_details(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _bundle(tmp_path)
    (bundle / "README.md").write_text("changed\n")
    (bundle / "install.sh").write_text("changed\n")
    code, _, err = _cli(capsys, "verify", str(bundle))
    lines = err.strip().splitlines()
    assert code == ExitCode.VERIFY
    assert [line.startswith("error:") for line in lines] == [True, False], err
    assert "(and 1 more)" in lines[0] and lines[1].startswith("  ")
    code, out, _ = _cli(capsys, "verify", str(bundle), "--json")
    document = json.loads(out)
    assert code == ExitCode.VERIFY and len(document["details"]) == 1, document
