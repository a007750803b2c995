"""Built bundles as tests handle them."""

from __future__ import annotations

import shutil
from pathlib import Path


def writable_copy(bundle: Path | str, parent: Path) -> Path:
    """A copy of a built bundle at ``parent/bundle``, to tamper with or install from while the
    (module-scoped) build stays as built."""
    return Path(shutil.copytree(bundle, parent / "bundle"))
