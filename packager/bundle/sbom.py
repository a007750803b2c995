"""The bundle's SBOM: CycloneDX 1.6 JSON, written with the format's own library.

Why CycloneDX 1.6 (not SPDX 2.3): it has a component type for the model itself
(``machine-learning-model``, since 1.5), purls, hashes and licences on every component, and its
maintained Python library (``cyclonedx-python-lib``) ships the official JSON schema and a strict
validator, so the document is checked against the schema before it is written. SPDX 2.3's
``spdx-tools`` validates semantics in code but has no ML model type and pulls a larger tree.

``sbom.cdx.json`` lists, for a Linux image: every Debian package of the base (name, version,
architecture, source package, licence from its ``copyright`` file, purl, sha256 of the .deb),
every wheel (name, version, licence from its METADATA, purl, sha256 of the .whl), the model file
(sha256, source path) and edgepack's runtime. It is byte-identical for the same inputs: the
serial number is a UUIDv5 of the content, the timestamp is ``SOURCE_DATE_EPOCH`` (else 0).
"""

from __future__ import annotations

import email.parser
import hashlib
import io
import json
import re
import tarfile
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packager import __version__
from packager.bounded import read_bounded
from packager.bundle.manifest import MAX_DOCUMENT_BYTES
from packager.errors import VerifyError
from packager.image.spec import PackageRecord

SBOM_FILE = "sbom.cdx.json"
# edgepack's properties on a component (CycloneDX's own namespace rules: a taxonomy prefix).
PROP_KIND = "edgepack:kind"  # debian-package | wheel | model | runtime
PROP_SOURCE = "edgepack:debian:source"
PROP_PATH = "edgepack:source-path"
PROP_COPYRIGHT = "edgepack:debian:copyright"
NAMESPACE = uuid.UUID("6f1f3b5e-3c55-4a0e-9a55-0e6d2b1e7c15")  # edgepack's UUIDv5 namespace
_LICENCE_RECORD_VERSION = 2


@dataclass(frozen=True)
class DebInfo:
    """What a .deb's own files say for its SBOM component (:func:`deb_info`): its source
    package and the licence short names of its ``copyright`` file, and how that file reads."""

    source: str
    licences: tuple[str, ...]
    # How the copyright file reads: "machine-readable" (DEP-5), "free-form" (no licence can
    # be read from it reliably), "missing", or "link:OTHER" (/usr/share/doc/PACKAGE is a
    # symlink to OTHER's, e.g. libgcc-s1 -> gcc-12-base: OTHER's licences apply).
    copyright: str = "machine-readable"


def copyright_licences(text: str) -> tuple[str, ...]:
    """Licence short names from a machine-readable debian/copyright (DEP-5, the ``License:``
    field of each paragraph, first line), in order, each once; () when the file is free-form
    (https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/)."""
    if not re.match(r"(?i)format:\s*\S", text):
        return ()
    found: list[str] = []
    for line in text.splitlines():
        match = re.match(r"(?i)license:[ \t]*(\S.*)", line)
        if match:
            name = match.group(1).strip()
            if name not in found:
                found.append(name)
    return tuple(found)


def _source_field(control: str, package: str) -> str:
    match = re.search(r"(?m)^Source:\s*(\S+)", control)
    return match.group(1) if match else package


def deb_info(deb: Path, package: str) -> DebInfo:
    """The source package (``Source:``, else the package) and the licences in
    ``/usr/share/doc/PACKAGE/copyright`` of a .deb (read through dpkg-deb)."""
    from packager.tools import dpkg

    source = _source_field(dpkg.control(deb), package)
    with tempfile.TemporaryDirectory(prefix="edgepack-sbom-") as tmp:
        tar_path = Path(tmp) / "data.tar"
        dpkg.fsys_tarfile(deb, tar_path)
        members: dict[str, tarfile.TarInfo] = {}
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                members[member.name.removeprefix("./").rstrip("/")] = member
            doc_dir = members.get(f"usr/share/doc/{package}")
            if doc_dir is not None and doc_dir.issym():
                return DebInfo(source, (), f"link:{Path(doc_dir.linkname).name}")
            found = members.get(f"usr/share/doc/{package}/copyright")
            if found is None or not found.isfile() or found.size > 4 * 1024 * 1024:
                return DebInfo(source, (), "missing")
            handle = tar.extractfile(found)
            assert handle is not None  # a regular file always has data
            text = handle.read().decode("utf-8", "replace")
    licences = copyright_licences(text)
    return DebInfo(source, licences, "machine-readable" if licences else "free-form")


def wheel_licences(wheel: Path) -> tuple[str, ...]:
    """A wheel's licence from its METADATA: ``License-Expression`` (PEP 639), else the
    ``License`` field when it is one short line, else its ``License ::`` classifiers."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if not names:
            return ()
        meta = email.parser.BytesHeaderParser().parse(io.BytesIO(archive.read(names[0])))
    expression = meta.get("License-Expression")
    if expression:
        return (str(expression).strip(),)
    licence = str(meta.get("License") or "").strip()
    if licence and "\n" not in licence and len(licence) <= 80:
        return (licence,)
    classifiers = [
        str(c).split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if str(c).startswith("License ::") and str(c).count("::") >= 2
    ]
    return tuple(dict.fromkeys(classifiers))


def _cached_deb_info(cache_dir: Path, record: PackageRecord) -> DebInfo | None:
    """:func:`deb_info` of a locked .deb, from the content cache (None when the .deb is gone)."""
    from packager.image.cache import ContentCache

    cache = ContentCache(cache_dir)
    key = f"{record.sha256}-v{_LICENCE_RECORD_VERSION}"
    known = cache.get_record("sbom-deb", key)
    if known is not None:
        return DebInfo(str(known["source"]), tuple(known["licences"]), str(known["copyright"]))
    blob = cache.verified_blob("sha256:" + record.sha256)
    if blob is None:
        return None
    info = deb_info(blob, record.name)
    cache.put_record(
        "sbom-deb",
        key,
        {"source": info.source, "licences": list(info.licences), "copyright": info.copyright},
    )
    return info


def _licences(names: tuple[str, ...]) -> list[Any]:
    from cyclonedx.model.license import DisjunctiveLicense, LicenseExpression

    if len(names) == 1 and (" OR " in names[0] or " AND " in names[0]):
        return [LicenseExpression(names[0])]
    # Debian short names (GPL-2+, BSD-3-clause) are not all SPDX ids: named, not id'd.
    return [DisjunctiveLicense(name=n) for n in names]


def deb_purl(record: PackageRecord, suite: str | None) -> str:
    """pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=SUITE (purl-spec, type ``deb``)."""
    from packageurl import PackageURL

    qualifiers = {"arch": record.arch, **({"distro": suite} if suite else {})}
    purl = PackageURL("deb", "debian", record.name, record.version, qualifiers)
    return str(purl.to_string())


def wheel_purl(record: PackageRecord) -> str:
    """pkg:pypi/NAME@VERSION, the name normalised as PEP 503 and purl-spec's pypi type say."""
    from packageurl import PackageURL

    name = re.sub(r"[-_.]+", "-", record.name).lower()
    return str(PackageURL("pypi", None, name, record.version).to_string())


@dataclass(frozen=True)
class ModelEntry:
    """The model's ``machine-learning-model`` component in the SBOM (:func:`build_sbom`)."""

    name: str  # the file name in the image
    sha256: str  # hex
    source: str  # the file the build was given (its name: paths are not reproducible)


def build_sbom(
    *,
    image_name: str,
    image_version: str,
    image_digest: str,
    packages: tuple[PackageRecord, ...],
    debian_suite: str | None,
    model: ModelEntry,
    runtime_files: dict[str, str],
    cache_dir: Path,
    epoch: int,
) -> str:
    """The CycloneDX 1.6 JSON text for one image, validated against the 1.6 schema.

    ``runtime_files``: path in image -> sha256 hex of edgepack's runtime sources (hashed into
    the runtime component's digest). Raises VerifyError when the library's validator refuses
    the document (a bug)."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    components: list[Any] = []
    debs = {r.name: _cached_deb_info(cache_dir, r) for r in packages if r.kind == "deb"}
    for record in packages:
        if record.kind == "deb":
            info = debs[record.name]
            purl = deb_purl(record, debian_suite)
            properties = [Property(name=PROP_KIND, value="debian-package")]
            if info is not None:
                properties.append(Property(name=PROP_SOURCE, value=info.source))
                properties.append(Property(name=PROP_COPYRIGHT, value=info.copyright))
                linked = debs.get(info.copyright.removeprefix("link:"))
                if info.copyright.startswith("link:") and linked is not None:
                    info = DebInfo(info.source, linked.licences, info.copyright)
            components.append(
                Component(
                    name=record.name,
                    version=record.version,
                    type=ComponentType.LIBRARY,
                    bom_ref=purl,
                    purl=PackageURL.from_string(purl),
                    hashes=[HashType(alg=HashAlgorithm.SHA_256, content=record.sha256)],
                    licenses=_licences(info.licences) if info else [],
                    properties=properties,
                )
            )
        else:
            from packager.image.cache import ContentCache

            blob = ContentCache(cache_dir).verified_blob("sha256:" + record.sha256)
            licences = wheel_licences(blob) if blob is not None else ()
            purl = wheel_purl(record)
            components.append(
                Component(
                    name=re.sub(r"[-_.]+", "-", record.name).lower(),
                    version=record.version,
                    type=ComponentType.LIBRARY,
                    bom_ref=purl,
                    purl=PackageURL.from_string(purl),
                    hashes=[HashType(alg=HashAlgorithm.SHA_256, content=record.sha256)],
                    licenses=_licences(licences),
                    properties=[
                        Property(name=PROP_KIND, value="wheel"),
                        Property(name="edgepack:wheel:file", value=record.filename),
                    ],
                )
            )
    components.append(
        Component(
            name=model.name,
            type=ComponentType.MACHINE_LEARNING_MODEL,
            bom_ref=f"model:{model.name}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=model.sha256)],
            properties=[
                Property(name=PROP_KIND, value="model"),
                Property(name=PROP_PATH, value=model.source),
            ],
        )
    )
    runtime_digest = hashlib.sha256(
        "".join(f"{h}  {p}\n" for p, h in sorted(runtime_files.items())).encode()
    ).hexdigest()
    components.append(
        Component(
            name="edgepack-runtime",
            version=__version__,
            type=ComponentType.APPLICATION,
            bom_ref="edgepack-runtime",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=runtime_digest)],
            properties=[
                Property(name=PROP_KIND, value="runtime"),
                *(
                    Property(name=f"edgepack:file:{p}", value=h)
                    for p, h in sorted(runtime_files.items())
                ),
            ],
        )
    )
    subject = Component(
        name=image_name,
        version=image_version,
        type=ComponentType.CONTAINER,
        bom_ref=f"image:{image_name}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=image_digest.removeprefix("sha256:"))],
    )
    seed = json.dumps(
        [image_name, image_version, image_digest, sorted(c.bom_ref.value for c in components)]
    )
    # The image is made of every component (a flat graph: apt and pip resolved the rest).
    return bom_text(subject, components, seed, epoch)


def bom_text(subject: Any, components: list[Any], seed: str, epoch: int) -> str:
    """The CycloneDX 1.6 JSON text of ``subject`` made of ``components`` (a flat dependency
    graph), every bundle's SBOM the same way: serial number the UUIDv5 of ``seed`` in
    :data:`NAMESPACE`, timestamp ``epoch`` (no clock), keys sorted; VerifyError when the
    schema (:func:`validate`) refuses it."""
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.output.json import JsonV1Dot6

    bom = Bom(
        components=components,
        serial_number=uuid.uuid5(NAMESPACE, seed),
        metadata=BomMetaData(
            component=subject, timestamp=datetime.fromtimestamp(epoch, UTC), tools=[]
        ),
    )
    bom.register_dependency(subject, components)
    text = str(JsonV1Dot6(bom).output_as_string(indent=2))
    # Re-serialised with sorted keys: the library's key order is its own business.
    text = json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    problem = validate(text)
    if problem:
        raise VerifyError(f"{SBOM_FILE}: the CycloneDX 1.6 schema refuses it: {problem}")
    return text


def validate(text: str) -> str | None:
    """None when ``text`` is valid CycloneDX 1.6 JSON (the library's strict schema validator),
    else the first error."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    try:
        error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    except RecursionError:  # the validator parses with json.loads: a bundle's "[[[[..."
        return "nested too deeply to parse"
    return None if error is None else str(error)[:300]


def sbom_summary(root: Path) -> dict[str, Any] | None:
    """What ``edgepack verify`` reports of ``root/sbom.cdx.json``: component counts by kind
    and whether the schema accepts it; None when the bundle has no SBOM."""
    path = root / SBOM_FILE
    if path.is_symlink() or not path.is_file():
        return None
    text = read_bounded(path, MAX_DOCUMENT_BYTES, error=VerifyError,
                        what="not a bundle document").decode("utf-8", "replace")
    try:
        components = json.loads(text).get("components", [])
    except (ValueError, AttributeError, RecursionError):  # RecursionError: "[[[[..." 16 MiB deep
        components = []
    kinds: dict[str, int] = {}
    for component in components if isinstance(components, list) else []:
        # Untrusted: a component or property that is not an object counts as "other" (the
        # schema check below reports the document invalid), never a traceback.
        listed = component.get("properties", []) if isinstance(component, dict) else []
        props = {p.get("name"): p.get("value")
                 for p in (listed if isinstance(listed, list) else []) if isinstance(p, dict)}
        kind = str(props.get(PROP_KIND, "other"))
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "file": SBOM_FILE,
        "format": "CycloneDX 1.6",
        "valid": validate(text) is None,
        "components": len(components) if isinstance(components, list) else 0,
        "debian_packages": kinds.get("debian-package", 0),
        "wheels": kinds.get("wheel", 0),
        "models": kinds.get("model", 0),
    }
