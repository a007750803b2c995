"""Keys, DSSE envelopes and `edgepack verify --key` / `--require-signature` (issue 15), on small
real bundles (tests/unit/ota/synth.py) through the real CLI entry point."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from packager.agent.signature import (
    BUNDLE_PREDICATE,
    SIGNATURE_FILE,
    SignatureError,
    check_bundle_signature,
    check_statement,
)
from packager.bundle.manifest import check_files, read_manifest, write_manifest
from packager.bundle.signing import (
    decode_payload,
    generate_keypair,
    load_public_key,
    load_signer,
    sign_manifest,
    statement_bytes,
)
from packager.cli import main
from packager.errors import UsageError
from tests.unit.ota.synth import make_bundle


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    good, other = generate_keypair(tmp_path / "k", "good"), generate_keypair(tmp_path / "k", "bad")
    return {"key": good.private, "pub": good.public, "other": other.private,
            "other_pub": other.public}


def _signed(tmp_path: Path, key: Path) -> Path:
    bundle = make_bundle(tmp_path / "bundle").path
    sign_manifest(bundle, load_signer(key), {"name": "demo"})
    return bundle


def test_generate_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    tmp_path: Path,
) -> None:
    pair = generate_keypair(tmp_path, "bundle")
    assert stat.S_IMODE(os.stat(pair.private).st_mode) == 0o600
    assert pair.public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert load_public_key(pair.public).keyid == load_signer(pair.private).public_key.keyid
    before = pair.private.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        generate_keypair(tmp_path, "bundle")
    assert pair.private.read_bytes() == before
    with pytest.raises(UsageError, match="private key"):
        load_public_key(pair.private)


def test_signature_is_deterministic_and_covers_manifest_and_sums(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    bundle = _signed(tmp_path, keys["key"])
    first = (bundle / SIGNATURE_FILE).read_bytes()
    sign_manifest(bundle, load_signer(keys["key"]), {"name": "demo"})
    assert (bundle / SIGNATURE_FILE).read_bytes() == first  # Ed25519 is deterministic
    statement = json.loads(decode_payload(first))
    assert statement["predicateType"] == BUNDLE_PREDICATE
    assert [s["name"] for s in statement["subject"]] == ["SHA256SUMS", "manifest.json"]
    # The envelope is beside the manifest, not in it, and not "unexpected".
    assert check_files(bundle, read_manifest(bundle)) == []
    check_bundle_signature(bundle, [load_public_key(keys["pub"])])


def test_statement_fields_are_checked() -> None:
    good = json.loads(statement_bytes({"a": "0" * 64}, BUNDLE_PREDICATE, {}))
    check_statement(good)
    for broken, field in (
        ({**good, "_type": "https://in-toto.io/Statement/v0.1"}, "_type"),
        ({**good, "subject": []}, "subject"),
        ({**good, "subject": [{"name": "a", "digest": {"sha256": "XYZ"}}]}, "sha256"),
        ({**good, "predicateType": "bundle"}, "predicateType"),
        ({**good, "predicate": []}, "predicate"),
    ):
        with pytest.raises(SignatureError, match=field):
            check_statement(broken)


def test_verify_key_refuses_regenerated_manifest_wrong_key_and_unsigned(
    tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _signed(tmp_path, keys["key"])
    code, out, _ = _cli(capsys, "verify", str(bundle), "--key", str(keys["pub"]), "--json")
    assert code == 0 and json.loads(out)["attestations"]["signature"]["verified"] is True
    code, _, err = _cli(capsys, "verify", str(bundle), "--key", str(keys["other_pub"]))
    assert code == 8 and "signature" in err and "does not verify" in err
    # One byte of install.sh, then SHA256SUMS and manifest.json regenerated: checksums hold.
    script = bundle / "install.sh"
    script.write_bytes(script.read_bytes().replace(b"#", b"$", 1))
    write_manifest(bundle, read_manifest(bundle).meta())
    assert _cli(capsys, "verify", str(bundle))[0] == 0
    code, out, _ = _cli(capsys, "verify", str(bundle), "--key", str(keys["pub"]), "--json")
    error = json.loads(out)
    assert code == 8 and error["exit_code"] == 8
    assert "signature" in error["message"] and "manifest.json" in error["message"]
    (bundle / SIGNATURE_FILE).unlink()
    for args in (["--require-signature"], ["--key", str(keys["pub"])]):
        code, _, err = _cli(capsys, "verify", str(bundle), *args)
        assert code == 8 and "not signed" in err, args
    code, out, _ = _cli(capsys, "verify", str(bundle), "--json")
    assert code == 0 and json.loads(out)["attestations"]["signature"]["signed"] is False


def test_bad_key_files_are_one_line_input_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle(tmp_path / "bundle").path
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    code, _, err = _cli(capsys, "verify", str(bundle), "--key", str(junk))
    assert code == 3 and err.count("\n") == 1 and "junk.pub" in err
    code, _, err = _cli(capsys, "verify", str(bundle), "--key", str(tmp_path / "missing.pub"))
    assert code == 3 and "no such key file" in err


def test_keys_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "keys", "generate", "--out", str(tmp_path), "--json")
    document = json.loads(out)
    assert code == 0 and len(document["keyid"]) == 64
    assert Path(document["private"]).is_file() and Path(document["public"]).is_file()
    code, _, err = _cli(capsys, "keys", "generate", "--out", str(tmp_path))
    assert code == 2 and "already exists" in err


def test_an_ota_repository_key_signs_bundles_too(tmp_path: Path) -> None:
    from packager.ota.repo import Repository

    repo = Repository.init(tmp_path / "repo")
    online = sorted((repo.path / "keys" / "online").glob("*.pem"))[0]
    bundle = make_bundle(tmp_path / "bundle").path
    keyid = sign_manifest(bundle, load_signer(online), {"name": "demo"})
    assert keyid == online.stem  # the same keyid TUF's metadata lists for it


@pytest.mark.parametrize(("envelope", "keyid"), [
    ("[" * 100_000, None),  # before: RecursionError out of envelope_keyids (exit 1)
    ('{"signatures": [{"keyid": "ab\\u001b]0;owned\\u0007\\ncd"}]}', None),  # printed as is
    ('{"signatures": [{"keyid": 5}]}', None),
    ('{"signatures": [{"keyid": "' + "c" * 64 + '"}]}', "c" * 64),
], ids=["nested", "control-text", "number", "sha256-hex"])
def test_an_unverified_envelope_shows_only_a_well_formed_keyid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], envelope: str, keyid: str | None
) -> None:
    """`edgepack verify` without --key names the envelope's keyid unverified: a hostile
    envelope is neither a traceback nor terminal control text in that line."""
    bundle = make_bundle(tmp_path / "bundle").path
    (bundle / SIGNATURE_FILE).write_text(envelope)
    code, out, _ = _cli(capsys, "verify", str(bundle), "--json")
    assert code == 0
    signature = json.loads(out)["attestations"]["signature"]
    assert (signature["signed"], signature["keyid"]) == (True, keyid)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_key_path_that_is_not_a_file_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Before: a FIFO or directory given as --key was "no such key file (check the path)"."""
    bundle = make_bundle(tmp_path / "bundle").path
    key = tmp_path / "key.pub"
    os.mkfifo(key) if kind == "fifo" else key.mkdir()
    code, _, err = _cli(capsys, "verify", str(bundle), "--key", str(key))
    assert code == 3 and err == f"error: --key: {key}: not a regular file\n"
