"""Bundle keys and signatures: Ed25519 keys, DSSE envelopes over in-toto statements.

Keys are the OTA repository's kind (``packager.ota.repo``: securesystemslib ``CryptoSigner``,
PKCS#8 PEM private keys, the ``file2:`` form), so one key can sign TUF metadata and bundles. The
public half is PEM SubjectPublicKeyInfo: what ``openssl pkeyutl -pubin`` reads on a device.

Ed25519 signatures are deterministic (RFC 8032 section 5.1.6), so a signed bundle is still
byte-identical when rebuilt from the same inputs with the same key. Verification itself lives in
:mod:`packager.agent.signature`, shared with the device agent.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from packager.agent.signature import (
    BUNDLE_PREDICATE,
    MANIFEST_FILE,
    MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE,
    SIGNATURE_FILE,
    STATEMENT_TYPE,
    SUMS_FILE,
    SignatureError,
    check_bundle_signature,
    check_statement,
    public_key_from_pem,
)
from packager.bounded import read_bounded
from packager.digest import sha256_path
from packager.errors import InputError, UsageError, VerifyError

# The environment variable CI passes the signing key's path in (like --sign-key).
SIGN_KEY_ENV = "EDGEPACK_SIGN_KEY"
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
# An Ed25519 PEM key is a few hundred bytes; anything near this is not a key file.
MAX_KEY_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class KeyPair:
    """What :func:`generate_keypair` wrote: the private (``.key``) and public (``.pub``) PEM
    files and the key's securesystemslib keyid (64 hex)."""

    private: Path
    public: Path
    keyid: str


def generate_keypair(out_dir: Path, name: str = "bundle") -> KeyPair:
    """Write ``out_dir/NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub`` (SPKI PEM); refuses
    to overwrite either (a lost signing key cannot be recovered; a replaced one orphans
    devices that trust the old one)."""
    if not name or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
        raise UsageError(f"--name: {name!r}: use letters, digits, '.', '_' and '-'")
    private, public = out_dir / f"{name}{PRIVATE_SUFFIX}", out_dir / f"{name}{PUBLIC_SUFFIX}"
    for path in (private, public):
        if path.exists() or path.is_symlink():
            raise UsageError(
                f"{path}: already exists", hint="choose another --out or --name; keys are "
                "never overwritten"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    signer = CryptoSigner.generate_ed25519()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(signer.private_bytes)
    public.write_bytes(public_pem(signer.public_key))
    return KeyPair(private=private, public=public, keyid=signer.public_key.keyid)


def public_pem(key: SSlibKey) -> bytes:
    """``key`` as PEM SubjectPublicKeyInfo (the form openssl and ``edgepack verify`` read)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = bytes.fromhex(key.keyval["public"])
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )


def public_key_base64(key: SSlibKey) -> str:
    """The base64 body of :func:`public_pem` on one line (for install.sh, which rebuilds the
    PEM: a template value never holds a line break)."""
    lines = public_pem(key).decode("ascii").splitlines()
    return "".join(line for line in lines if not line.startswith("-----"))


def load_signer(path: Path, where: str = "--sign-key") -> CryptoSigner:
    """An Ed25519 signer from an unencrypted PKCS#8 PEM file (``keys generate``'s ``.key`` or
    an OTA repository's ``keys/online/<keyid>.pem``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path, where)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"{where}: {path}: not an unencrypted PEM private key",
            hint="create one with 'edgepack keys generate'",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{where}: {path}: {type(key).__name__} is not an Ed25519 key")
    return CryptoSigner(key)


def load_public_key(path: Path, where: str = "--key") -> SSlibKey:
    """An Ed25519 public key from PEM (``keys generate``'s ``.pub``)."""
    data = _read_key_file(path, where)
    if b"PRIVATE KEY" in data:
        raise UsageError(
            f"{where}: {path} is a private key", hint="pass the public half (the .pub file)"
        )
    try:
        return public_key_from_pem(data, f"{where}: {path}")
    except SignatureError as exc:
        raise InputError(
            str(exc), hint="pass the .pub file 'edgepack keys generate' wrote"
        ) from exc


def _read_key_file(path: Path, where: str) -> bytes:
    # Only a path that is not there is "no such key file": a directory, FIFO or device is
    # there, and read_bounded says what it is (never waiting on a FIFO).
    if not path.exists():
        raise InputError(f"{where}: {path}: no such key file", hint="check the path")
    return read_bounded(path, MAX_KEY_FILE_BYTES, shown=f"{where}: {path}", what="not a key file")


def statement_bytes(
    subjects: dict[str, str], predicate_type: str, predicate: dict[str, Any]
) -> bytes:
    """An in-toto Statement v1 (subjects: name -> sha256 hex), checked against the spec's
    required fields, as compact JSON with sorted keys (install.sh matches its tail)."""
    document = {
        "_type": STATEMENT_TYPE,
        "predicate": predicate,
        "predicateType": predicate_type,
        "subject": [
            {"digest": {"sha256": digest}, "name": name}
            for name, digest in sorted(subjects.items())
        ],
    }
    check_statement(document)
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def envelope_bytes(payload: bytes, signer: CryptoSigner) -> bytes:
    """A DSSE envelope of ``payload`` signed by ``signer``: one line of compact JSON with sorted
    keys (``payload``, ``payloadType``, ``signatures``), then a newline."""
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(signer)
    return json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"\n"


def sign_manifest(root: Path, signer: CryptoSigner, predicate: dict[str, Any]) -> str:
    """Write ``root/manifest.dsse.json``: a bundle statement over ``manifest.json`` and
    ``SHA256SUMS``, signed. Returns the keyid."""
    subjects = {name: sha256_path(root / name)[0] for name in (MANIFEST_FILE, SUMS_FILE)}
    payload = statement_bytes(subjects, BUNDLE_PREDICATE, predicate)
    (root / SIGNATURE_FILE).write_bytes(envelope_bytes(payload, signer))
    os.chmod(root / SIGNATURE_FILE, 0o644)
    return str(signer.public_key.keyid)


@dataclass(frozen=True)
class SignatureReport:
    """The signature part of ``edgepack verify``'s report: whether ``manifest.dsse.json`` is
    there, the keyid that signed it, whether it verified against a key, and its predicate."""

    signed: bool
    keyid: str | None = None
    verified: bool = False
    predicate: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "signed": self.signed,
            "verified": self.verified,
            "keyid": self.keyid,
            "predicate": self.predicate,
        }


# A keyid as securesystemslib computes it (sha256 hex of the key's canonical JSON).
_KEYID = re.compile(r"[0-9a-f]{64}")


def envelope_keyids(root: Path) -> list[str]:
    """The keyids an envelope names, unverified (for a report without --key): only those of the
    form securesystemslib computes (:data:`_KEYID`), since they are printed as they are; [] for
    an envelope that cannot be read or parsed (nested too deeply included)."""
    try:
        data = json.loads(read_bounded(root / SIGNATURE_FILE, MAX_ENVELOPE_BYTES))
        keyids = [s["keyid"] for s in data["signatures"]]
    except (InputError, ValueError, KeyError, TypeError, RecursionError):
        return []
    return [k for k in keyids if isinstance(k, str) and _KEYID.fullmatch(k)]


def unverified_signature(root: Path) -> SignatureReport:
    """Whether ``root`` carries a signature envelope and the first keyid it names, nothing
    checked (``edgepack verify`` without ``--key``); the manifest is not read."""
    present = (root / SIGNATURE_FILE).is_file()
    ids = envelope_keyids(root) if present else []
    return SignatureReport(signed=present, keyid=ids[0] if ids else None)


def verify_signature(
    root: Path, key: SSlibKey | None, *, require: bool, manifest: bytes
) -> SignatureReport:
    """The bundle's signature checked against ``key`` (when given) over ``manifest``: the bytes
    of ``root/manifest.json`` as the caller read them once and acts on
    (:func:`~packager.bundle.manifest.load_manifest`); the file is not read again. VerifyError
    (exit 8) naming the signature when it is missing and ``key`` or ``require`` asks for one,
    or when it does not verify or covers other bytes."""
    present = (root / SIGNATURE_FILE).is_file()
    if key is None:
        if require and not present:
            raise VerifyError(f"{root}: signature: {SIGNATURE_FILE} missing (the bundle is not "
                              "signed; --require-signature)")
        if require:
            raise UsageError(
                "--require-signature: pass --key PUB to check the signature against",
                hint="the signer's public key, from 'edgepack keys generate'",
            )
        return unverified_signature(root)
    try:
        statement, keyid = check_bundle_signature(root, [key], manifest=manifest)
    except SignatureError as exc:
        raise VerifyError(f"{root}: signature: {exc}") from exc
    return SignatureReport(
        signed=True, keyid=keyid, verified=True, predicate=dict(statement["predicate"])
    )


def decode_payload(envelope: bytes) -> bytes:
    """The payload bytes of a DSSE envelope, unverified (for tests and inspection)."""
    return base64.b64decode(json.loads(envelope)["payload"])
