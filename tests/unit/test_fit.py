from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from packager.backends.linux.fit import linux_fit
from packager.errors import ExitCode, FitError
from packager.fit import enforce
from packager.models.onnx import inspect_onnx
from packager.targets import resolve_target
from tests.model_factory import too_big_model

MIB = 2**20


def _toml(repo_root: Path, name: str) -> dict[str, Any]:
    return tomllib.loads((repo_root / "targets" / f"{name}.toml").read_text(encoding="utf-8"))


def test_mnist_fits_rpi4(onnx_dir: Path, repo_root: Path) -> None:
    info = inspect_onnx(onnx_dir / "mnist.onnx")
    raw = _toml(repo_root, "rpi4")
    report = linux_fit(info, resolve_target("rpi4"))
    assert report.fits
    memory = next(r for r in report.resources if r.name == "memory")
    overhead = raw.get("runtime", {}).get("overhead_mb", 96) * MIB
    assert memory.needed_bytes == info.weights_bytes + info.activation_bytes + overhead
    ram = raw["memory"]["ram_mb"] - raw["memory"]["reserved_mb"]
    assert memory.available_bytes == min(ram, raw["service"]["memory_max_mb"]) * MIB
    enforce(report, force=False, model_label="mnist.onnx")  # must not raise
    assert report.to_json()["fits"] is True


def test_activations_over_rpi_zero_2w_refused(tmp_path: Path, repo_root: Path) -> None:
    info = inspect_onnx(too_big_model(tmp_path / "big.onnx"))
    raw = _toml(repo_root, "rpi-zero-2w")
    report = linux_fit(info, resolve_target("rpi-zero-2w"))
    assert not report.fits
    with pytest.raises(FitError) as err:
        enforce(report, force=False, model_label="big.onnx")
    assert err.value.exit_code == ExitCode.FIT
    line = err.value.one_line()
    needed = info.weights_bytes + info.activation_bytes + raw["runtime"]["overhead_mb"] * MIB
    available = min(
        raw["memory"]["ram_mb"] - raw["memory"]["reserved_mb"], raw["service"]["memory_max_mb"]
    )
    assert needed > 2**30  # the estimate saw the 1 GiB tensors
    assert f"needs {needed / 2**30:.1f} GiB" in line
    assert f"has {available:.1f} MiB" in line
    assert "big.onnx" in line and "rpi-zero-2w" in line and "memory" in line
    enforce(report, force=True, model_label="big.onnx")  # --force builds anyway


def test_storage_from_the_built_image_replaces_the_estimate(
    onnx_dir: Path, repo_root: Path
) -> None:
    from packager.backends.linux.fit import storage_available, with_image_storage

    target = resolve_target("rpi-zero-2w")
    raw = _toml(repo_root, "rpi-zero-2w")["storage"]
    report = linux_fit(inspect_onnx(onnx_dir / "mnist.onnx"), target)
    assert report.fits  # the estimate (160 MiB base + model) fits
    available, note = storage_available(target)
    assert available == (raw["size_mb"] - raw.get("reserved_mb", 2048)) * MIB  # targets.py default
    # A base whose 8 MiB layer unpacks to 8 GiB: the real size is what counts.
    real = with_image_storage(report, target, unpacked_bytes=8 * 2**30, archive_bytes=5 * MIB)
    storage = next(r for r in real.resources if r.name == "storage")
    assert storage.needed_bytes == 2 * 8 * 2**30 + 5 * MIB
    assert dict(storage.needed_parts)["image.tar"] == 5 * MIB
    assert storage.available_note == note and "built image" in storage.estimate_source
    assert [r.name for r in real.resources] == [r.name for r in report.resources]
    assert not real.fits
    with pytest.raises(FitError, match=r"storage needs 16\.0 GiB"):
        enforce(real, force=False, model_label="mnist.onnx")
