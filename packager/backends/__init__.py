"""Device-class backends, registered in one dict. Adding a family: one module plus one line."""

from __future__ import annotations

from packager.backends.base import Backend
from packager.errors import UnsupportedError

# device_class -> "module:Class"; imported lazily so a heavy backend costs nothing until used.
REGISTRY: dict[str, str] = {
    "linux-container": "packager.backends.linux.backend:LinuxContainerBackend",
    "mcu": "packager.backends.mcu.backend:McuBackend",
    "jetson": "packager.backends.jetson.backend:JetsonBackend",
}


def get_backend(device_class: str) -> Backend:
    """A new backend of ``device_class`` (a target's ``device_class``), imported from
    :data:`REGISTRY` on first use; UnsupportedError (exit 10) for a class no backend builds."""
    import importlib

    spec = REGISTRY.get(device_class)
    if spec is None:
        raise UnsupportedError(
            f"no backend builds '{device_class}' targets yet",
            hint=f"supported device classes: {', '.join(sorted(REGISTRY))}",
        )
    module_name, _, class_name = spec.partition(":")
    backend: Backend = getattr(importlib.import_module(module_name), class_name)()
    return backend
