"""Shared fixtures: where the repository and the external test data live."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = REPO_ROOT.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def testdata() -> Path:
    """``../shared/testdata`` (README there): real models nobody on this project wrote."""
    if not TESTDATA.is_dir():
        pytest.skip(f"test data not found at {TESTDATA}")
    return TESTDATA


@pytest.fixture(scope="session")
def onnx_dir(testdata: Path) -> Path:
    return testdata / "onnx"


@pytest.fixture(scope="session", autouse=True)
def testdata_is_left_untouched() -> Iterator[None]:
    """No test may change the external test data (an optimizer once rewrote its input in place)."""
    import hashlib

    def digests() -> dict[Path, str]:
        if not TESTDATA.is_dir():
            return {}
        return {p: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(TESTDATA.rglob("*")) if p.is_file()}

    before = digests()
    yield
    changed = [str(p) for p, d in digests().items() if before.get(p) != d]
    assert not changed, f"tests modified the shared test data: {changed}"
