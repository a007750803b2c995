"""Shared fixtures: where the repository and the external test data live."""

from __future__ import annotations

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
