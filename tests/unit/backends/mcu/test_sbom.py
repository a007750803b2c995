"""The MCU bundle's CycloneDX SBOM (packager.backends.mcu.sbom), checked by the schema validator
the container SBOM uses."""

from __future__ import annotations

import json

from packager.backends.mcu.sbom import build_mcu_sbom, tflite_micro_version
from packager.bundle.sbom import validate


def test_mcu_sbom_lists_model_tflm_and_sources() -> None:
    files = {"model/demo.tflite": "1" * 64, "src/main.cc": "2" * 64, "CMakeLists.txt": "3" * 64}
    text = build_mcu_sbom(name="demo", version="1.0.0", files=files,
                          model_file="model/demo.tflite", sdk="cmake", epoch=0)
    assert validate(text) is None
    doc = json.loads(text)
    kinds = {c["name"]: c["type"] for c in doc["components"]}
    assert kinds["model/demo.tflite"] == "machine-learning-model"
    assert kinds["src/main.cc"] == "file" and kinds["CMakeLists.txt"] == "file"
    if tflite_micro_version() is not None:  # the mcu extra is installed by `make setup`
        assert kinds["tflite-micro"] == "framework"
    assert doc["metadata"]["component"]["type"] == "firmware"
