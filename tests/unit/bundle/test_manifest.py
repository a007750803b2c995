from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from packager.bundle.manifest import (
    SCHEMA,
    SUMS,
    DeviceSection,
    Manifest,
    check_files,
    read_manifest,
    write_manifest,
)
from packager.errors import VerifyError
from tests.unit.bundle.meta import sample_meta


def _bundle(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)))
    return root


def test_manifest_lists_every_file_with_sha256(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    doc = write_manifest(root, sample_meta("x", "1"))
    files = {f.path: f for f in doc.files}
    assert set(files) == {"a.txt", "sub/b.bin", SUMS}
    assert files["sub/b.bin"].sha256 == hashlib.sha256(bytes(range(256))).hexdigest()
    assert files["a.txt"].size == 6
    assert read_manifest(root) == doc
    assert doc.to_json() == json.loads((root / "manifest.json").read_text())
    assert check_files(root, doc) == []


def test_sha256sums_is_coreutils_format(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    write_manifest(root, sample_meta())
    lines = (root / SUMS).read_text().splitlines()
    assert lines == [
        f"{hashlib.sha256(b'alpha' + bytes([10])).hexdigest()}  a.txt",
        f"{hashlib.sha256(bytes(range(256))).hexdigest()}  sub/b.bin",
    ]


def test_manifest_is_byte_identical_for_same_inputs(tmp_path: Path) -> None:
    a = _bundle(tmp_path / "a")
    b = _bundle(tmp_path / "b")
    write_manifest(a, sample_meta(device={"k": 1}))
    write_manifest(b, sample_meta(device={"k": 1}))
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_check_files_names_each_damaged_file(tmp_path: Path) -> None:
    root = _bundle(tmp_path / "b")
    doc = write_manifest(root, sample_meta())
    data = bytearray((root / "sub" / "b.bin").read_bytes())
    data[7] ^= 0xFF
    (root / "sub" / "b.bin").write_bytes(bytes(data))
    (root / "a.txt").unlink()
    (root / "extra").write_text("?")
    problems = check_files(root, doc)
    assert any(p.startswith("sub/b.bin: sha256") for p in problems)
    assert "a.txt: missing" in problems
    assert any(p.startswith("extra: not listed") for p in problems)


def test_read_manifest_rejects_missing_and_foreign(tmp_path: Path) -> None:
    with pytest.raises(VerifyError, match=r"manifest\.json: missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"schema": "other"}')
    with pytest.raises(VerifyError, match="schema"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "edgepack.bundle/v1"}))
    with pytest.raises(VerifyError) as err:
        read_manifest(tmp_path)
    assert "schema: 'edgepack.bundle/v1' is not supported" in err.value.one_line()
    assert SCHEMA in err.value.one_line()


def _written(tmp_path: Path, **sections: object) -> tuple[Path, dict[str, object]]:
    root = _bundle(tmp_path / "b")
    write_manifest(root, sample_meta(**sections))
    return root, json.loads((root / "manifest.json").read_text())


def _rewrite(root: Path, document: object) -> None:
    (root / "manifest.json").write_text(json.dumps(document))


IMAGE = {
    "archive": "image.tar", "digest": "sha256:" + "1" * 64, "config_digest": "sha256:" + "2" * 64,
    "ref": "edgepack/x:1", "platform": "linux/arm64", "size_bytes": 10, "port": 8080,
    "layers": [{"name": "base", "digest": "sha256:" + "3" * 64, "diff_id": "sha256:" + "4" * 64,
                "size": 5, "uncompressed_size": 9}],
}


def test_typed_round_trip_every_section(tmp_path: Path) -> None:
    optimization = {
        "source": "m.onnx", "source_kind": "onnx", "quantize": "int8-dynamic",
        "settings": {"per_channel": True}, "steps": ["quantize"], "model": "m.int8.onnx",
        "variants": [{"name": "fp32", "metrics": None}],
        "notes": [], "evaluation": {"samples": 2},
    }
    root, document = _written(
        tmp_path, image=IMAGE, optimization=optimization, device={"proof": {"note": None}},
        target={"name": "rpi4", "device_class": "linux-container", "platform": "linux/arm64",
                "cpu": {"model": "cortex-a72", "cores": 4, "qemu": "cortex-a72"}},
    )
    manifest = read_manifest(root)
    assert manifest.to_json() == document
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.image is not None and manifest.image.port == 8080
    assert manifest.target.cpu is not None and manifest.target.cpu.qemu == "cortex-a72"
    assert manifest.device == {"proof": {"note": None}}  # the backend's nulls are its own
    assert "prune" not in document["optimization"]  # type: ignore[operator]
    # Writing what was read gives the same bytes.
    before = (root / "manifest.json").read_bytes()
    write_manifest(root, manifest.meta())
    assert (root / "manifest.json").read_bytes() == before


def _assert_refused(root: Path, expected: str) -> None:
    """read_manifest refuses ``root``'s manifest: exit 8, one line naming the file, then
    ``expected``."""
    with pytest.raises(VerifyError) as err:
        read_manifest(root)
    line = err.value.one_line()
    assert err.value.exit_code == 8
    assert line.startswith(f"{root / 'manifest.json'}: {expected}"), line


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["image"].update(prot=1), "image.prot: unknown key (did you mean 'port'?)"),
        (lambda d: d.update(edgepack_version="0.1.0"), "edgepack_version: unknown key"),
        (lambda d: d["model"].update(digset=d["model"].pop("digest")),
         "model.digset: unknown key (did you mean 'digest'?)"),
        (lambda d: d["image"].pop("port"), "image.port: is required"),
        (lambda d: d.pop("target"), "target: is required"),
        (lambda d: d["image"].update(port="8080"), "image.port: must be an integer"),
        (lambda d: d["image"].update(port=0), "image.port: must be at least 1"),
        (lambda d: d["fit"].update(fits="yes"), "fit.fits: must be true or false"),
        (lambda d: d["files"][0].update(size=-1), "files[0].size: must be at least 0"),
        (lambda d: d["image"]["layers"][0].update(digest="md5:x"),
         "image.layers[0].digest: must match"),
        (lambda d: d.update(name="a b; rm -rf /"), "name: must match"),
    ],
)
def test_unknown_missing_or_mistyped_field_is_exit_8_naming_it(
    tmp_path: Path, change: Any, expected: str
) -> None:
    root, document = _written(tmp_path, image=IMAGE)
    change(document)
    _rewrite(root, document)
    _assert_refused(root, expected)


class _Board(DeviceSection):
    arena_bytes: int
    proof: dict[str, object] | None = None


def test_the_device_section_is_typed_by_the_backends_model(tmp_path: Path) -> None:
    root, _ = _written(tmp_path, device={"arena_bytes": 1024})
    assert read_manifest(root).device_as(_Board).arena_bytes == 1024
    root, _ = _written(tmp_path / "typo", device={"arena_byte": 1024})
    with pytest.raises(VerifyError) as err:
        read_manifest(root).device_as(_Board, "m.json")
    assert "m.json: device.arena_byte: unknown key (did you mean 'arena_bytes'?)" in (
        err.value.one_line())
    root, _ = _written(tmp_path / "none")
    with pytest.raises(VerifyError, match="device: is required"):
        read_manifest(root).device_as(_Board)


FOLDED = {"tool": "polygraphy", "version": "0.53.6", "ran": True, "nodes_before": 16,
          "nodes_after": 11}
NOT_FOLDED = {"tool": "polygraphy", "version": "0.53.6", "ran": False,
              "error": "m.onnx: polygraphy cannot fold the model's constants (KeyError: 99)"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({**FOLDED, "ran": "yes"}, "model.constant_folding.ran: must be true or false"),
        ({**FOLDED, "tool": "sed"}, "model.constant_folding.tool: "),
        ({**FOLDED, "nodes_after": -1}, "model.constant_folding.nodes_after: must be at least 0"),
        ({**FOLDED, "note": "x" * 100_000}, "model.constant_folding.note: unknown key"),
        ({**FOLDED, "error": "none"}, "model.constant_folding: "),
        ({k: v for k, v in FOLDED.items() if k != "nodes_after"}, "model.constant_folding: "),
        ({**NOT_FOLDED, "nodes_before": 16}, "model.constant_folding: "),
        ({k: v for k, v in NOT_FOLDED.items() if k != "error"}, "model.constant_folding: "),
    ],
)
def test_a_constant_folding_record_that_says_what_no_build_wrote_is_refused(
    tmp_path: Path, record: dict[str, object], expected: str
) -> None:
    """Before: model.constant_folding was any JSON object, so `edgepack verify` passed a
    manifest claiming folding ran without counts, or failed with counts."""
    root, document = _written(tmp_path)
    for good in (FOLDED, NOT_FOLDED):
        document["model"]["constant_folding"] = good  # type: ignore[index]
        _rewrite(root, document)
        assert read_manifest(root).to_json()["model"]["constant_folding"] == good
    document["model"]["constant_folding"] = record  # type: ignore[index]
    _rewrite(root, document)
    _assert_refused(root, expected)
