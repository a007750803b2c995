"""A valid :class:`~packager.bundle.manifest.BundleMeta` for tests that write a manifest over a
tree they made themselves (no model, no build): every required section, plausible values."""

from __future__ import annotations

from typing import Any

from packager.bundle.manifest import BundleMeta

DIGEST = "sha256:" + "0" * 64


def sample_meta(name: str = "x", version: str = "1", **sections: Any) -> BundleMeta:
    """``name``/``version`` and ``sections`` (manifest keys, as JSON) over a minimal valid
    target, model and fit; ``target``/``model`` given as dicts replace the defaults whole."""
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "target": {"name": "industrial-pc", "device_class": "linux-container"},
        "model": {
            "source": "model.onnx",
            "format": "onnx",
            "digest": DIGEST,
            "size_bytes": 1,
            "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
        },
        "fit": {"target": "industrial-pc", "fits": True, "resources": []},
        **sections,
    }
    return BundleMeta.model_validate(document)
