"""The CycloneDX 1.6 SBOM of a microcontroller bundle (``sbom.cdx.json``): its TFLite model,
TensorFlow Lite Micro and every generated source; the same conventions (properties, UUIDv5
serial, schema validation) as the container SBOM (:mod:`packager.bundle.sbom`)."""

from __future__ import annotations

import json
from typing import Any

from packager.bundle.sbom import PROP_KIND, PROP_PATH, bom_text


def tflite_micro_version() -> str | None:
    """The tflite-micro Python package's version (the interpreter that measured the arena)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tflite-micro")
    except PackageNotFoundError:
        return None


def build_mcu_sbom(
    *, name: str, version: str, files: dict[str, str], model_file: str, sdk: str, epoch: int
) -> str:
    """The CycloneDX 1.6 JSON text for an MCU bundle: the TFLite model
    (``machine-learning-model``), TensorFlow Lite Micro (the interpreter version that measured
    the arena; the firmware links the TFLM its SDK supplies) and every generated source
    (``file``, sha256). ``files``: bundle path -> sha256 hex."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.component import Component, ComponentType
    from packageurl import PackageURL

    components: list[Any] = []
    for path, digest in sorted(files.items()):
        is_model = path == model_file
        components.append(
            Component(
                name=path,
                type=ComponentType.MACHINE_LEARNING_MODEL if is_model else ComponentType.FILE,
                bom_ref=f"file:{path}",
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digest)],
                properties=[
                    Property(name=PROP_KIND, value="model" if is_model else "source"),
                    Property(name=PROP_PATH, value=path),
                ],
            )
        )
    tflm = tflite_micro_version()
    if tflm is not None:
        purl = PackageURL("pypi", None, "tflite-micro", tflm)
        components.append(
            Component(
                name="tflite-micro",
                version=tflm,
                type=ComponentType.FRAMEWORK,
                bom_ref=str(purl.to_string()),
                purl=purl,
                properties=[
                    Property(name=PROP_KIND, value="tflite-micro"),
                    Property(
                        name="edgepack:tflm:role",
                        value=f"arena measured with this interpreter; the {sdk} project links "
                        "the TensorFlow Lite Micro its SDK supplies",
                    ),
                ],
            )
        )
    subject = Component(
        name=name, version=version, type=ComponentType.FIRMWARE, bom_ref=f"firmware:{name}"
    )
    return bom_text(subject, components, json.dumps([name, version, sorted(files.items())]),
                    epoch)
