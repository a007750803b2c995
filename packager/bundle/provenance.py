"""SLSA v1 build provenance: an in-toto statement about the bundle's files, in a DSSE envelope.

Predicate per https://slsa.dev/spec/v1.0/provenance: ``buildDefinition`` (``buildType``,
``externalParameters``: what the command line asked for, ``internalParameters``,
``resolvedDependencies``: every input with its digest: model, target file, Debian packages,
wheels, base image) and ``runDetails.builder.id``. No ``startedOn``/``finishedOn``: the only time
recorded is ``SOURCE_DATE_EPOCH``, so a rebuild is byte-identical. Paths that differ between
machines (--out, --cache-dir) are not parameters of the result and are left out.

``provenance.intoto.json`` is signed with the bundle key when there is one (else the envelope
carries no signature) and is listed in ``manifest.json``, so the manifest's signature covers it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from packager import __version__
from packager.agent.signature import (
    PAYLOAD_TYPE,
    SignatureError,
    check_statement,
    open_envelope,
)
from packager.bounded import read_bounded
from packager.bundle.manifest import MAX_DOCUMENT_BYTES
from packager.bundle.signing import envelope_bytes, statement_bytes
from packager.errors import VerifyError

PROVENANCE_FILE = "provenance.intoto.json"
SLSA_PREDICATE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/edgepack/edgepack/buildtypes/bundle/v1"
BUILDER_ID = "https://github.com/edgepack/edgepack/builders/cli"


def dependency(name: str, sha256: str, uri: str | None = None) -> dict[str, Any]:
    """A SLSA ResourceDescriptor (in-toto spec/v1/resource_descriptor.md)."""
    entry: dict[str, Any] = {"name": name, "digest": {"sha256": sha256}}
    if uri:
        entry["uri"] = uri
    return entry


def predicate(
    external: dict[str, Any], dependencies: list[dict[str, Any]], epoch: int
) -> dict[str, Any]:
    """The SLSA v1 provenance predicate: ``dependencies`` (from :func:`dependency`) sorted by
    uri then name, ``epoch`` (SOURCE_DATE_EPOCH, seconds) the only time recorded."""
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": {"SOURCE_DATE_EPOCH": epoch},
            "resolvedDependencies": sorted(
                dependencies, key=lambda d: (str(d.get("uri", "")), d["name"])
            ),
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID, "version": {"edgepack": __version__}},
        },
    }


def write_provenance(
    root: Path,
    subjects: dict[str, str],
    external: dict[str, Any],
    dependencies: list[dict[str, Any]],
    epoch: int,
    signer: CryptoSigner | None,
) -> str:
    """Write ``root/provenance.intoto.json`` (subjects: bundle path -> sha256 hex)."""
    payload = statement_bytes(subjects, SLSA_PREDICATE, predicate(external, dependencies, epoch))
    if signer is not None:
        data = envelope_bytes(payload, signer)
    else:
        import base64

        envelope = {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [],
        }
        data = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    (root / PROVENANCE_FILE).write_bytes(data)
    return PROVENANCE_FILE


def provenance_summary(root: Path, key: SSlibKey | None) -> dict[str, Any] | None:
    """What ``edgepack verify`` reports: the inputs (names of the resolved dependencies by
    kind) and whether the envelope's signature verified with ``key`` (VerifyError, exit 8,
    when a key is given and it does not). None when the bundle has no provenance."""
    path = root / PROVENANCE_FILE
    if path.is_symlink() or not path.is_file():
        return None
    data = read_bounded(path, MAX_DOCUMENT_BYTES, error=VerifyError, what="not a bundle document")
    malformed = f"{root}: provenance: {PROVENANCE_FILE} is malformed"
    if key is not None:
        try:
            statement, _ = open_envelope(data, [key], PROVENANCE_FILE)
        except SignatureError as exc:
            raise VerifyError(f"{root}: provenance: {exc}") from exc
        except RecursionError as exc:  # a payload nested deeper than the JSON parser goes
            raise VerifyError(malformed) from exc
        status = "verified"
    else:
        try:
            import base64

            envelope = json.loads(data)
            statement = check_statement(json.loads(base64.b64decode(envelope["payload"])))
            status = "signed, not checked" if envelope.get("signatures") else "unsigned"
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError,
                SignatureError) as exc:
            raise VerifyError(malformed) from exc
    if statement.get("predicateType") != SLSA_PREDICATE:
        raise VerifyError(f"{root}: provenance: predicateType is not {SLSA_PREDICATE}")
    try:
        return _summary(statement, status)
    except (AttributeError, KeyError, TypeError) as exc:
        # Unverified (no --key), the predicate is anyone's: a dependency that is not an object,
        # a missing name or digest is one line, never a traceback.
        raise VerifyError(f"{malformed} ({type(exc).__name__} in its predicate)") from exc


def _summary(statement: dict[str, Any], status: str) -> dict[str, Any]:
    """provenance_summary's document from a checked SLSA statement; AttributeError, KeyError or
    TypeError where the predicate does not have the shape edgepack writes."""
    definition = statement["predicate"].get("buildDefinition", {})
    deps = definition.get("resolvedDependencies", [])
    counts: dict[str, int] = {}
    named: list[str] = []
    for dep in deps:
        uri = str(dep.get("uri", ""))
        kind = uri.split("/", 1)[0].removeprefix("pkg:") if uri.startswith("pkg:") else dep["name"]
        counts[kind] = counts.get(kind, 0) + 1
        if not uri.startswith("pkg:"):
            named.append(f"{dep['name']} sha256:{dep['digest'].get('sha256', '')[:12]}")
    packaged = [f"{n} {k} packages" for k, n in sorted(counts.items()) if k in ("deb", "pypi")]
    inputs = named + packaged
    return {
        "file": PROVENANCE_FILE,
        "status": status,
        "builder": statement["predicate"].get("runDetails", {}).get("builder", {}).get("id"),
        "inputs": inputs,
        "external_parameters": definition.get("externalParameters", {}),
        "subjects": len(statement["subject"]),
    }
