"""The publisher: real TUF metadata written with tuf's Metadata API and checked with it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from tuf.api.metadata import Metadata

from packager.bundle.manifest import read_manifest, write_manifest
from packager.cli import main
from packager.commands.ota import ota_group
from packager.errors import InputError, UsageError, VerifyError
from packager.ota.repo import Repository
from tests.unit.ota.synth import make_bundle


def _md(repo: Repository, name: str) -> Metadata:
    return Metadata.from_file(str(repo.metadata_dir / name))


def _latest(repo: Repository, role: str) -> Metadata:
    files = repo.metadata_dir.glob(f"*.{role}.json")
    return Metadata.from_file(str(max(files, key=lambda p: int(p.name.split(".")[0]))))


def test_init_writes_keys_per_role_with_thresholds(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    root = _md(repo, "1.root.json")
    assert root.signed.roles["root"].threshold == 2
    assert len(root.signed.roles["root"].keyids) == 2
    root.verify_delegate("root", root)  # both root signatures are valid
    for role in ("targets", "snapshot", "timestamp"):
        assert root.signed.roles[role].threshold == 1
        keyid = root.signed.roles[role].keyids[0]
        assert (repo.path / "keys" / "online" / f"{keyid}.pem").is_file()
        assert keyid not in {p.stem for p in (repo.path / "keys" / "root").iterdir()}
    root.verify_delegate("timestamp", _md(repo, "timestamp.json"))
    with pytest.raises(InputError, match="not empty"):
        Repository.init(repo.path)
    with pytest.raises(UsageError):
        Repository.init(tmp_path / "bad", root_keys=1, root_threshold=2)
    assert not (tmp_path / "bad").exists()


def test_publish_signs_sequence_rollout_and_halt(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    rng = random.Random(5)
    base = rng.randbytes(4096)
    v1 = make_bundle(tmp_path / "b1", version="1.0.0", model=rng.randbytes(999), base=base)
    v2 = make_bundle(tmp_path / "b2", version="2.0.0", model=rng.randbytes(999), base=base)
    p1 = repo.publish(v1.path, percent=10)
    stored_before = {p.name for p in (repo.targets_dir / "blobs" / "sha256").iterdir()}
    p2 = repo.publish(v2.path)
    assert (p1.sequence, p2.sequence) == (1, 2)
    stored_after = {p.name for p in (repo.targets_dir / "blobs" / "sha256").iterdir()}
    # Base and runtime layers are shared: only model layer, config and manifest are new.
    assert len(stored_after - stored_before) == 3
    root = _md(repo, "1.root.json")
    targets = _latest(repo, "targets")
    root.verify_delegate("targets", targets)
    custom = targets.signed.targets["releases/stable/000000000001.json"].custom["edgepack"]
    assert custom["percent"] == 10 and custom["halted"] is False
    assert custom["compat"] == {"platform": "linux/amd64", "device_class": "linux-container"}
    for name, info in targets.signed.targets.items():
        path = repo.targets_dir / name
        with path.open("rb") as handle:
            info.verify_length_and_hashes(handle)
    version = targets.signed.version
    repo.set_release("stable", 1, percent=50)
    repo.set_release("stable", halted=True)
    targets = _latest(repo, "targets")
    assert targets.signed.version == version + 2
    assert (
        targets.signed.targets["releases/stable/000000000001.json"].custom["edgepack"]["percent"]
        == 50
    )
    assert targets.signed.targets["releases/stable/000000000002.json"].custom["edgepack"]["halted"]
    root.verify_delegate("targets", targets)
    with pytest.raises(UsageError, match="whole number"):
        repo.set_release("stable", percent=101)


def test_corrupt_bundle_is_refused_and_nothing_published(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    bundle = make_bundle(tmp_path / "b", model=b"m" * 5000).path
    data = bytearray((bundle / "image.tar").read_bytes())
    data[-2000] ^= 0xFF
    (bundle / "image.tar").write_bytes(bytes(data))
    before = sorted(p.name for p in repo.metadata_dir.iterdir())
    with pytest.raises(VerifyError, match=r"image\.tar"):
        repo.publish(bundle)
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == before
    assert repo.releases() == []


def test_cli_publish_json_status_halt_if(tmp_path: Path) -> None:
    runner = CliRunner()
    repo_dir = tmp_path / "r"
    assert runner.invoke(ota_group, ["init", str(repo_dir)]).exit_code == 0
    bundle = make_bundle(tmp_path / "b").path
    out = runner.invoke(ota_group, ["publish", str(bundle), "--repo", str(repo_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["sequence"] == 1
    lines = [
        {"device_id": f"d{i}", "sequence": 1, "outcome": o, "time": f"2025-01-01T00:00:0{i}"}
        for i, o in enumerate(["committed", "rolled-back", "rolled-back"])
    ]
    (repo_dir / "reports" / "http.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = runner.invoke(
        ota_group, ["status", "--repo", str(repo_dir), "--halt-if", "0.5", "--json"]
    )
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    assert status["latest"]["failed"] == 2 and status["halted_now"] is True
    assert Repository(repo_dir).releases()[0].halted


def test_publish_refuses_what_verify_refuses_with_the_same_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ota publish`` runs the one verifier `edgepack verify` runs, the device class's checks
    included: a bundle whose manifest names another image than image.tar holds, every checksum
    regenerated to match, is refused by both with the same line, and nothing is published."""
    bundle = make_bundle(tmp_path / "b").path
    manifest = read_manifest(bundle)
    assert manifest.image is not None
    other = manifest.image.model_copy(update={"digest": "sha256:" + "0" * 64})
    write_manifest(bundle, manifest.meta().model_copy(update={"image": other}))
    repo = Repository.init(tmp_path / "r")
    lines = []
    for args in (["verify", str(bundle)],
                 ["ota", "publish", str(bundle), "--repo", str(repo.path)]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        err = capsys.readouterr().err
        assert exited.value.code == 8, err
        lines.append(err.strip().splitlines()[0])
    # The same line; publish adds its hint after it.
    assert lines[1].startswith(lines[0]) and "image digest" in lines[0], lines
    assert repo.releases() == []
