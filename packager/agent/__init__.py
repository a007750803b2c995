"""The edgepack OTA agent: the update client that runs ON THE DEVICE.

It is copied onto devices and runs with only Python 3, its wheels (tuf, securesystemslib,
cryptography, cffi, pycparser, urllib3) and docker or podman, so it imports nothing from the rest
of ``packager`` (relative imports only; ``tests/unit/agent/test_boundary.py`` enforces it).
Run it as ``python3 -m <package> --root DIR --repo URL --once``.
"""

from __future__ import annotations

__all__ = ["AGENT_WHEELS"]

# What the agent needs on the device besides the standard library; the publisher downloads these
# for the device's platform (packager.ota.wheels) so install.sh can install them offline.
AGENT_WHEELS: tuple[str, ...] = (
    "tuf==7.0.1",
    "securesystemslib[crypto]==1.6.0",
    "urllib3>=2,<3",
)
