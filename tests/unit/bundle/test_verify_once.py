"""A bundle's manifest.json is read once, and what was verified is what is used.

A bundle sits on untrusted media (a USB stick, a directory another process can write): a
command that verifies one copy of manifest.json and then reads another acts on a manifest nobody
checked. Here manifest.json's opens are counted with the interpreter's own audit hook ("open":
every builtin, ``Path.open`` and ``os.open`` alike), and the bounded reader is made to return
one manifest on its first read and another afterwards: the swap a hostile writer makes between
the check and the use. Every command must check and act on the same copy. Small real bundles
(tests/unit/ota/synth.py) through the real CLI entry point; the one stand-in is the reference
device of ``engine build`` (a recorder in place of the ssh build, which cannot run here).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from packager.backends import get_backend
from packager.backends.base import TryRequest, TryResult
from packager.backends.engine_on import AddedFile, EngineBuildOn
from packager.backends.linux.backend import LinuxContainerBackend
from packager.bounded import read_bounded
from packager.bundle import manifest as manifest_module
from packager.bundle.manifest import MANIFEST, Manifest
from packager.bundle.signing import (
    generate_keypair,
    load_public_key,
    load_signer,
    sign_manifest,
)
from packager.bundle.verify import verify_bundle
from packager.cli import main
from packager.errors import InputError, VerifyError
from tests.unit.ota.synth import make_bundle

# Paths whose opens are being counted (empty: the hook does nothing). An audit hook cannot be
# removed, so one is installed for the session and switched by this list.
_WATCHED: list[str] = []
_OPENED: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], str | bytes | os.PathLike):
        path = os.fsdecode(os.fspath(args[0]))
        if path in _WATCHED:
            _OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture
def opens() -> Iterator[Callable[[Path], list[str]]]:
    """``watch(path)``: from now on, every open of ``path`` is appended to the list returned."""

    def watch(path: Path) -> list[str]:
        _WATCHED.append(str(path))
        return _OPENED

    yield watch
    _WATCHED.clear()
    _OPENED.clear()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def _edited(bundle: Path, change: Callable[[dict[str, Any]], None]) -> bytes:
    """manifest.json's bytes with ``change`` applied (the file itself left as it is)."""
    document = json.loads((bundle / MANIFEST).read_bytes())
    change(document)
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def _poisoned(bundle: Path) -> bytes:
    """A manifest that fails verification: install.sh's recorded sha256 is not the file's."""

    def change(document: dict[str, Any]) -> None:
        for entry in document["files"]:
            if entry["path"] == "install.sh":
                entry["sha256"] = "0" * 64

    return _edited(bundle, change)


def _renamed(bundle: Path) -> bytes:
    """A manifest every checksum still agrees with, naming another model and target."""

    def change(document: dict[str, Any]) -> None:
        document["name"] = "evil"
        document["target"]["name"] = "evil-device"

    return _edited(bundle, change)


def _swap(monkeypatch: pytest.MonkeyPatch, bundle: Path, *versions: bytes) -> list[int]:
    """The bounded reader's n-th read of ``bundle``'s manifest.json returns ``versions[n]``
    (the last one from then on), whatever the file holds; the list returned counts the reads."""
    reads: list[int] = []

    def reader(path: Path, limit: int, **options: Any) -> bytes:
        data = read_bounded(path, limit, **options)
        if Path(path) != bundle / MANIFEST:
            return data
        reads.append(len(data))
        return versions[min(len(reads), len(versions)) - 1]

    monkeypatch.setattr(manifest_module, "read_bounded", reader)
    return reads


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic bundle signed with a fresh key, and the key's public half."""
    pair = generate_keypair(tmp_path / "keys", "good")
    bundle = make_bundle(tmp_path / "bundle").path
    sign_manifest(bundle, load_signer(pair.private), {"name": "demo"})
    return bundle, pair.public


# --- (1) one open per verification, signature included -----------------------------------------


def test_verify_opens_the_manifest_once_with_or_without_a_signature_check(
    signed: tuple[Path, Path], opens: Callable[[Path], list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle, public = signed
    opened = opens(bundle / MANIFEST)
    for args in ([], ["--key", str(public)], ["--key", str(public), "--require-signature"]):
        opened.clear()
        code, out, err = _cli(capsys, "verify", str(bundle), "--json", *args)
        assert code == 0, out + err
        assert len(opened) == 1, (args, opened)
        verified = json.loads(out)["attestations"]["signature"]["verified"]
        assert verified is bool(args), args
    opened.clear()
    check = verify_bundle(bundle, get_backend, key=load_public_key(public))
    assert len(opened) == 1, opened
    assert check.problems == () and check.signature is not None and check.signature.verified
    assert check.manifest == Manifest.from_json(json.loads(check.read.data))


def test_ota_publish_and_push_planning_open_the_manifest_once(
    tmp_path: Path, opens: Callable[[Path], list[str]], capsys: pytest.CaptureFixture[str],
) -> None:
    from packager.push import plan_sources

    bundle = make_bundle(tmp_path / "bundle").path
    opened = opens(bundle / MANIFEST)
    assert [s.name for s in plan_sources((bundle,))] == ["demo"]
    assert len(opened) == 1, opened
    opened.clear()
    repo = tmp_path / "repo"
    assert _cli(capsys, "ota", "init", str(repo))[0] == 0
    # Reading it to plan the release is the one open; storing it as a target copies the file
    # once more, checked against the digest of the bytes verified.
    code, out, err = _cli(capsys, "ota", "publish", str(bundle), "--repo", str(repo))
    assert code == 0, out + err
    assert len(opened) == 2, opened


# --- (2) what was verified is what is used --------------------------------------------------------


def test_verify_judges_the_copy_it_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle(tmp_path / "bundle").path
    genuine = (bundle / MANIFEST).read_bytes()
    reads = _swap(monkeypatch, bundle, _poisoned(bundle), genuine)
    code, _, err = _cli(capsys, "verify", str(bundle))
    assert code == 8 and "install.sh: sha256" in err, err
    assert len(reads) == 1


def test_verify_key_checks_the_signature_over_the_bytes_it_parsed(
    signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle, public = signed
    genuine = (bundle / MANIFEST).read_bytes()
    # The file on disk is the signed one; the copy read (and reported on) is not.
    reads = _swap(monkeypatch, bundle, _renamed(bundle), genuine)
    code, out, err = _cli(capsys, "verify", str(bundle), "--key", str(public), "--json")
    assert code == 8, out + err
    assert "manifest.json: does not match the signed digest" in json.loads(out)["message"]
    assert len(reads) == 1


def test_run_never_tries_a_manifest_it_did_not_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle(tmp_path / "bundle").path
    genuine = (bundle / MANIFEST).read_bytes()
    tried: list[Manifest] = []

    def try_bundle(self: LinuxContainerBackend, request: TryRequest,
                   manifest: Manifest) -> TryResult:  # no container started: only recorded
        tried.append(manifest)
        return TryResult(document={}, lines=())

    monkeypatch.setattr(LinuxContainerBackend, "try_bundle", try_bundle)
    reads = _swap(monkeypatch, bundle, _poisoned(bundle), genuine)
    code, _, err = _cli(capsys, "run", str(bundle))
    assert code == 8 and "install.sh: sha256" in err, err
    assert tried == [] and len(reads) == 1


def _renamed_after_the_first_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, list[int]]:
    """A bundle whose manifest reads genuine first and renamed on any later read; the reads."""
    bundle = make_bundle(tmp_path / "bundle").path
    genuine = (bundle / MANIFEST).read_bytes()
    return bundle, _swap(monkeypatch, bundle, genuine, _renamed(bundle))


def test_push_describes_the_manifest_it_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from packager.push import plan_sources

    bundle, reads = _renamed_after_the_first_read(tmp_path, monkeypatch)
    (source,) = plan_sources((bundle,))
    assert (source.name, source.version) == ("demo", "1.0.0")
    assert len(reads) == 1


def test_bake_plans_from_the_manifests_it_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from packager.bake import plan_bake

    bundle, reads = _renamed_after_the_first_read(tmp_path, monkeypatch)
    models, targets, _ = plan_bake((bundle,))
    assert [m.name for m in models] == ["demo"]
    assert sorted(t.name for t in targets) == ["demo-industrial-pc"]
    assert len(reads) == 1


def test_ota_publish_stores_the_manifest_it_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from packager.ota.repo import Repository

    repo = Repository.init(tmp_path / "repo")
    bundle = make_bundle(tmp_path / "bundle").path
    # The copy verified names another model than the file the release would carry: storing
    # the file is refused (its digest is not the verified bytes'), nothing is published.
    reads = _swap(monkeypatch, bundle, _renamed(bundle))
    with pytest.raises(VerifyError, match=r"manifest\.json: content does not match its digest"):
        repo.publish(bundle)
    assert repo.releases() == [] and len(reads) == 1


class _Recorder(LinuxContainerBackend):
    """STAND-IN for a backend that builds its engine on a reference device (a Jetson over
    ssh, which cannot exist here): records the manifest it was given, then stops the command
    (nothing is added)."""

    seen: ClassVar[list[Manifest]] = []

    def build_engine_on(
        self, root: Path, manifest: Manifest, job: EngineBuildOn
    ) -> tuple[AddedFile, ...]:
        self.seen.append(manifest)
        raise InputError("stand-in: no reference device")


def test_engine_build_never_rewrites_a_manifest_it_did_not_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import packager.commands.engine as engine

    bundle = make_bundle(tmp_path / "bundle").path
    genuine = (bundle / MANIFEST).read_bytes()
    monkeypatch.setattr(engine, "get_backend", lambda device_class: _Recorder())
    _Recorder.seen = []
    reads = _swap(monkeypatch, bundle, genuine)
    code, _, err = _cli(capsys, "engine", "build", str(bundle), "--on", "ssh://ref")
    assert code == 3 and "stand-in" in err, err  # the genuine bundle reaches the device step
    assert [m.name for m in _Recorder.seen] == ["demo"] and len(reads) == 1
    _Recorder.seen = []
    reads = _swap(monkeypatch, bundle, _poisoned(bundle), genuine)
    code, _, err = _cli(capsys, "engine", "build", str(bundle), "--on", "ssh://ref")
    assert code == 8 and "install.sh: sha256" in err, err
    assert _Recorder.seen == [] and len(reads) == 1
