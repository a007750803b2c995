"""The on-device inference runtime (installed in images as the package ``edgepack_runtime``).

This package is copied verbatim into device images, where the rest of ``packager`` does not exist:
it imports only the standard library, numpy and onnxruntime, and its modules import each other
relatively. ``tests/unit/runtime/test_isolation.py`` enforces that.
"""

from __future__ import annotations

__version__ = "0.1.0"
