"""A bundle's signature: a DSSE envelope holding an in-toto Statement v1 about ``manifest.json``.

Shared by ``edgepack verify --key`` (through :mod:`packager.bundle.signing`) and the OTA agent on
the device, so both check the same bytes the same way; install.sh checks the same signature with
``openssl pkeyutl -verify -rawin`` (Ed25519 over the DSSE pre-authentication encoding).

Shape (DSSE v1, https://github.com/secure-systems-lab/dsse/blob/master/envelope.md; in-toto
Statement v1, https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md)::

    manifest.dsse.json = {"payload": b64(statement), "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": hex, "sig": b64(64-byte ed25519)}]}
    statement = {"_type": STATEMENT_TYPE, "predicate": {...}, "predicateType": BUNDLE_PREDICATE,
                 "subject": [{"digest": {"sha256": hex}, "name": "SHA256SUMS"},
                             {"digest": {"sha256": hex}, "name": "manifest.json"}]}

The statement is compact JSON with sorted keys, so install.sh can check the two subjects as one
exact suffix of the signed bytes. Imports only the standard library and securesystemslib (one of
the agent's own wheels).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key, SSlibKey  # type: ignore[attr-defined]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
BUNDLE_PREDICATE = "https://github.com/edgepack/edgepack/attestation/bundle/v1"
SIGNATURE_FILE = "manifest.dsse.json"
MANIFEST_FILE = "manifest.json"
SUMS_FILE = "SHA256SUMS"
# A bundle envelope is about 1 KiB; a provenance one a few KiB. Anything far larger is refused
# unread (a hostile bundle cannot make verification read without bound).
MAX_ENVELOPE_BYTES = 1024 * 1024
_HEX = re.compile(r"[0-9a-f]+")
_ALGORITHMS = {"sha256": 64, "sha512": 128}


class SignatureError(Exception):
    """A missing, malformed or wrongly signed envelope, or a statement about other bytes."""


def public_key_from_pem(pem: bytes, where: str) -> SSlibKey:
    """An Ed25519 public key (PEM SubjectPublicKeyInfo, ``openssl pkey -pubout``'s form) as
    securesystemslib's key, keyid computed as securesystemslib does (sha256 of its canonical
    JSON): the keyid in envelopes and TUF metadata alike."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{where}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{where}: {type(key).__name__} is not an Ed25519 key")
    return SSlibKey.from_crypto(key)


def check_statement(doc: Any) -> dict[str, Any]:
    """``doc`` if it has the fields an in-toto Statement v1 requires (spec/v1/statement.md):
    ``_type``, a non-empty ``subject`` list of ``{name, digest: {alg: lower-case hex}}``,
    a ``predicateType`` URI and an object ``predicate``; SignatureError naming the field."""
    if not isinstance(doc, dict):
        raise SignatureError("statement: not a JSON object")
    if doc.get("_type") != STATEMENT_TYPE:
        raise SignatureError(f"statement: _type {doc.get('_type')!r}, expected {STATEMENT_TYPE}")
    subjects = doc.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise SignatureError("statement: subject must be a non-empty list")
    for subject in subjects:
        if not isinstance(subject, dict) or not isinstance(subject.get("name"), str):
            raise SignatureError("statement: every subject needs a name")
        digest = subject.get("digest")
        if not isinstance(digest, dict) or not digest:
            raise SignatureError(f"statement: subject {subject['name']!r}: digest missing")
        for alg, value in digest.items():
            size = _ALGORITHMS.get(alg)
            if size is not None and (
                not isinstance(value, str) or len(value) != size or not _HEX.fullmatch(value)
            ):
                raise SignatureError(f"statement: subject {subject['name']!r}: bad {alg} digest")
    predicate_type = doc.get("predicateType")
    if not isinstance(predicate_type, str) or not predicate_type.startswith("https://"):
        raise SignatureError("statement: predicateType must be a URI")
    if not isinstance(doc.get("predicate"), dict):
        raise SignatureError("statement: predicate must be an object")
    return doc


def open_envelope(data: bytes, keys: list[Key], where: str) -> tuple[dict[str, Any], str]:
    """The verified statement in a DSSE envelope and the keyid that signed it.

    Raises SignatureError when the envelope is malformed, its payload type is not in-toto's, no
    signature verifies with one of ``keys`` (threshold 1), or the payload is not a Statement."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SignatureError(f"{where}: {len(data)} bytes, more than {MAX_ENVELOPE_BYTES}")
    try:
        envelope = Envelope.from_dict(json.loads(data))
    except Exception as exc:  # json, base64, KeyError, FormatError: all mean "not an envelope"
        raise SignatureError(f"{where}: not a DSSE envelope ({type(exc).__name__})") from exc
    if envelope.payload_type != PAYLOAD_TYPE:
        raise SignatureError(f"{where}: payloadType {envelope.payload_type!r}, not in-toto's")
    try:
        accepted = envelope.verify(keys, 1)
    except Exception as exc:  # VerificationError and malformed signatures alike
        ids = ", ".join(k.keyid[:16] for k in keys)
        signed = ", ".join(s[:16] for s in envelope.signatures) or "none"
        raise SignatureError(
            f"{where}: signature does not verify with the trusted key {ids} (signed by {signed})"
        ) from exc
    try:
        statement = check_statement(json.loads(envelope.payload))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{where}: payload is not JSON") from exc
    return statement, next(iter(accepted))


def subject_digests(statement: dict[str, Any]) -> dict[str, str]:
    """Subject name -> sha256 hex (subjects without a sha256 are left out)."""
    return {
        str(s["name"]): str(s["digest"]["sha256"])
        for s in statement["subject"]
        if "sha256" in s["digest"]
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_bundle_signature(
    root: Path, keys: list[Key], *, manifest: bytes | None = None
) -> tuple[dict[str, Any], str]:
    """Check ``root/manifest.dsse.json``: signed by one of ``keys``, a bundle statement, and its
    subjects are the bytes of ``root/manifest.json`` and ``root/SHA256SUMS``. Returns the
    statement and the signing keyid; SignatureError naming the file otherwise. The manifest's
    own file list (checked by the caller) then covers every other file. ``manifest``: the
    manifest's bytes as the caller already read them (and will act on), checked instead of
    reading the file again."""
    path = root / SIGNATURE_FILE
    if path.is_symlink() or not path.is_file():
        raise SignatureError(f"{SIGNATURE_FILE}: missing (the bundle is not signed)")
    with path.open("rb") as handle:
        data = handle.read(MAX_ENVELOPE_BYTES + 1)
    statement, keyid = open_envelope(data, keys, SIGNATURE_FILE)
    if statement["predicateType"] != BUNDLE_PREDICATE:
        raise SignatureError(
            f"{SIGNATURE_FILE}: predicateType {statement['predicateType']!r} is not a bundle's"
        )
    digests = subject_digests(statement)
    for name in (MANIFEST_FILE, SUMS_FILE):
        file = root / name
        if name not in digests:
            raise SignatureError(f"{SIGNATURE_FILE}: the signed statement does not cover {name}")
        if name == MANIFEST_FILE and manifest is not None:
            found = hashlib.sha256(manifest).hexdigest()
        elif file.is_symlink() or not file.is_file():
            raise SignatureError(f"{name}: missing")
        else:
            found = _sha256(file)
        if found != digests[name]:
            raise SignatureError(
                f"{name}: does not match the signed digest in {SIGNATURE_FILE} "
                "(changed after signing)"
            )
    return statement, keyid


def _image_index_digest(archive: Path) -> str:
    """The manifest digest ``index.json`` in an OCI image archive names (bounded read)."""
    import tarfile

    with tarfile.open(archive, "r:") as tar:
        member = tar.getmember("index.json")
        if not member.isfile() or member.size > 1024 * 1024:
            raise SignatureError(f"{archive.name}: index.json is not a small regular file")
        handle = tar.extractfile(member)
        assert handle is not None  # a regular file always has data
        index = json.loads(handle.read())
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or len(manifests) != 1:
        raise SignatureError(f"{archive.name}: index.json must name exactly one image")
    return str(manifests[0].get("digest"))


def check_release_bundle(directory: Path, key: Key, files: list[dict[str, Any]]) -> str:
    """The OTA agent's check of a staged release (in addition to TUF): ``manifest.dsse.json``
    verifies with the device's bundle key, and the signed ``manifest.json`` agrees with what
    was staged: every staged file's sha256 (``files``: the release's ``{path, target}``
    entries, targets named by their sha256) is the one listed, every listed file other than
    the image archive was staged, and ``image.tar``'s ``index.json`` names the signed image
    digest. Returns the signing keyid; SignatureError naming the mismatch otherwise."""
    _, keyid = check_bundle_signature(directory, [key])
    path = directory / MANIFEST_FILE
    if path.stat().st_size > 16 * 1024 * 1024:
        raise SignatureError(f"{MANIFEST_FILE}: larger than 16 MiB")
    try:
        manifest = json.loads(path.read_bytes())
        listed = {str(f["path"]): str(f["sha256"]) for f in manifest["files"]}
        image = manifest["image"]
        archive, image_digest = str(image["archive"]), str(image["digest"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{MANIFEST_FILE}: malformed ({type(exc).__name__}: {exc})") from exc
    staged: set[str] = set()
    for entry in files:
        rel = str(entry["path"])
        if rel in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        staged.add(rel)
        digest = str(entry["target"]).rsplit("/", 1)[-1]
        if listed.get(rel) != digest:
            raise SignatureError(f"{rel}: not the file the signed {MANIFEST_FILE} lists")
    missing = sorted(set(listed) - staged - {archive})
    if missing:
        raise SignatureError(f"{missing[0]}: listed in the signed {MANIFEST_FILE} but not staged")
    found = _image_index_digest(directory / "image.tar")
    if found != image_digest:
        raise SignatureError(
            f"image.tar: image {found[:19]}..., the signed {MANIFEST_FILE} says {image_digest[:19]}"
        )
    return keyid
