"""The one path policy (packager.agent.paths) on the build host: `edgepack verify` and
`edgepack ota publish`, run as the real CLI, refuse a bundle that names a file outside itself
(through a symlinked component or an absolute path) or carries a setuid file, with exit 8 and
one line naming the path; the build's manifest writer masks modes and refuses links."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from packager.agent.paths import (
    PathError,
    check_inside,
    check_mode,
    check_relpath,
    create_file,
    open_append,
)
from packager.bundle.manifest import write_manifest
from packager.errors import VerifyError
from packager.ota.repo import Repository
from tests.unit.bundle.meta import sample_meta
from tests.unit.ota.synth import make_bundle

REPO_ROOT = Path(__file__).resolve().parents[3]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "packager", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _list(bundle: Path, rel: str, content: bytes) -> None:
    """Add ``rel`` to manifest.json with the sha256 and size of ``content``, as an attacker who
    edits the manifest (or a compromised build host) would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"].append(
        {"path": rel, "sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    )
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _outside(tmp_path: Path) -> Path:
    victim = tmp_path / "outside" / "x"
    (victim.parent / "a" / "b").mkdir(parents=True)
    victim.write_bytes(b"#!/bin/sh\necho pwned\n")
    return victim


def _symlinked_component(tmp_path: Path) -> tuple[Path, str]:
    bundle = make_bundle(tmp_path / "bundle").path
    victim = _outside(tmp_path)
    (bundle / "s").symlink_to(victim.parent / "a" / "b")
    _list(bundle, "s/../../x", victim.read_bytes())
    return bundle, "s"


def _absolute(tmp_path: Path) -> tuple[Path, str]:
    bundle = make_bundle(tmp_path / "bundle").path
    victim = _outside(tmp_path)
    _list(bundle, str(victim), victim.read_bytes())
    return bundle, str(victim)


def _setuid(tmp_path: Path) -> tuple[Path, str]:
    bundle = make_bundle(tmp_path / "bundle").path
    (bundle / "install.sh").chmod(0o4755)
    return bundle, "install.sh"


def _symlinked_file(tmp_path: Path) -> tuple[Path, str]:
    bundle = make_bundle(tmp_path / "bundle").path
    victim = _outside(tmp_path)
    (bundle / "README.md").unlink()
    (bundle / "README.md").symlink_to(victim)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "README.md":
            entry["sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
            entry["size"] = victim.stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return bundle, "README.md"


CRAFTED = {
    "symlinked-component": _symlinked_component,
    "absolute-path": _absolute,
    "setuid-mode": _setuid,
    "symlinked-file": _symlinked_file,
}


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_verify_and_publish_refuse_the_crafted_bundle(tmp_path: Path, kind: str) -> None:
    bundle, named = CRAFTED[kind](tmp_path)
    verify = _cli("verify", str(bundle))
    assert verify.returncode == 8, verify.stdout + verify.stderr
    # One error line naming the path (further problems, if any, follow as detail lines).
    first = verify.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and repr(named) in first, verify.stderr
    assert "Traceback" not in verify.stderr

    repo = Repository.init(tmp_path / "repo")
    publish = _cli("ota", "publish", str(bundle), "--repo", str(repo.path))
    assert publish.returncode == 8, publish.stdout + publish.stderr
    assert named in publish.stderr and "Traceback" not in publish.stderr
    assert repo.releases() == []
    assert not list(repo.targets_dir.rglob("*.json"))  # no release document was written


def test_clean_synthetic_bundle_still_publishes(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle").path
    (bundle / "install.sh").chmod(0o775)  # a umask-002 build host: recorded as 0755
    repo = Repository.init(tmp_path / "repo")
    plan = repo.publish(bundle)
    files = json.loads(plan.document)["files"]
    assert {f["path"]: f["mode"] for f in files}["install.sh"] == 0o755
    assert {f["mode"] for f in files} <= {0o644, 0o755}


def test_build_manifest_masks_modes_and_refuses_links(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    root.mkdir()
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o6777)
    (root / "data.txt").write_text("x")
    (root / "data.txt").chmod(0o666)
    write_manifest(root, sample_meta())
    assert (root / "run.sh").stat().st_mode & 0o7777 == 0o755
    assert (root / "data.txt").stat().st_mode & 0o7777 == 0o644
    (root / "link").symlink_to("/etc/passwd")
    with pytest.raises(VerifyError, match="'link': is a symbolic link"):
        write_manifest(root, sample_meta())


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "a/../b",
        "..",
        "./a",
        "a//b",
        "a/",
        "a\nb",
        "a b",
        "a\\b",
        "a\x00b",
        "x" * 256,
        "/".join(["d"] * 40),
    ],
)
def test_relpath_policy_refuses(path: str) -> None:
    with pytest.raises(PathError):
        check_relpath(path)


def test_relpath_policy_allows_bundle_names() -> None:
    for path in (
        "ota/wheels/cryptography-44.0.0-cp39-abi3-manylinux_2_28_x86_64.whl",
        "ota/lib/edgepack_agent/__init__.py",
        "edgepack-mnist.service",
        "SHA256SUMS",
        "blobs/sha256/" + "0" * 64,
    ):
        assert check_relpath(path) == path
    for mode in (0o4755, 0o2755, 0o1755, 0o777, 0o666, 0o664, 0o700, True):
        with pytest.raises(PathError):
            check_mode(mode)


def test_inside_and_create_refuse_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "d").symlink_to(outside)
    with pytest.raises(PathError, match="symbolic link"):
        check_inside(root, "d/file")
    with pytest.raises(PathError):
        os.close(create_file(root, "d/file", 0o644))
    (root / "leaf").symlink_to(outside / "planted")
    with pytest.raises(PathError, match="already exists"):
        os.close(create_file(root, "leaf", 0o644))
    with pytest.raises(PathError):
        os.close(open_append(root, "leaf"))
    assert list(outside.iterdir()) == []
    os.mkfifo(root / "fifo")
    with pytest.raises(PathError):  # not opened (that would wait for a reader)
        os.close(open_append(root, "fifo"))
    fd = create_file(root, "new/dir/file", 0o755)
    os.close(fd)
    assert (root / "new/dir/file").stat().st_mode & 0o7777 == 0o755
