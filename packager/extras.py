"""Heavy optional frameworks (TensorFlow, PyTorch, litert-torch), imported only on the paths that
need them, with one message saying which extra installs a missing one."""

from __future__ import annotations

import importlib
from typing import Any

from packager.errors import ToolMissingError


def require(module: str, purpose: str, extra: str) -> Any:
    """Import ``module`` or raise ToolMissingError naming ``purpose`` and the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ToolMissingError(
            f"{purpose} needs {module}", hint=f"pip install 'edgepack[{extra}]'"
        ) from exc
