"""--base archives as an attacker or a careless exporter writes them: layers labelled as what they
are not, and layers that inflate far past the device's storage. Generated here, streamed."""

from __future__ import annotations

import gzip
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from packager.errors import ExitCode, FitError, InputError
from packager.image import oci
from packager.image.builder import build_image, verify_image_archive
from packager.image.oci import (
    MEDIA_LAYER_GZIP,
    MEDIA_LAYER_TAR,
    MEDIA_LAYER_ZSTD,
    LayerTooLargeError,
    check_layer_media_type,
    layer_diff_id,
)
from packager.image.spec import (
    ArchiveBase,
    FileEntry,
    FileLayer,
    ImageConfig,
    ImageSpec,
    StorageBudget,
)
from tests.image_factory import MIB, Blob, base_archive, gzip_bomb, one_file_tar, plain_blob

DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def small_tar() -> bytes:
    return one_file_tar("etc/base-release", b"base\n")


def gzip_blob(tmp: Path, name: str = "layer.tgz") -> Blob:
    tar = small_tar()
    return plain_blob(tmp / name, gzip.compress(tar, mtime=0), diff_id_of=tar)


def zstd_blob(tmp: Path) -> Blob:
    tar = small_tar()
    # The test makes its input with the real zstd program (the one packager.tools.zstd drives).
    packed = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True)
    return plain_blob(tmp / "layer.zst", packed.stdout, diff_id_of=tar)


def spec_on(base: Path, budget: StorageBudget | None = None) -> ImageSpec:
    return ImageSpec(
        platform_os="linux", arch="amd64", variant=None,
        base=ArchiveBase(f"oci-archive:{base}", base, "oci-archive"),
        wheels=None,
        layers=(FileLayer("model", (FileEntry("/opt/edgepack/model/m.onnx", b"m" * 1000),)),),
        config=ImageConfig(user="10001:10001", entrypoint=("true",)),
        ref_name="edgepack/t:1", created_epoch=0, storage=budget,
    )


def build(tmp: Path, base: Path, budget: StorageBudget | None = None) -> Any:
    return build_image(spec_on(base, budget), tmp / "image.tar", tmp / "cache")


# --- media type against bytes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "media", "says"),
    [
        (gzip_blob, MEDIA_LAYER_TAR, "says tar, the bytes are gzip"),
        (lambda t: plain_blob(t / "l.tar", small_tar()), MEDIA_LAYER_GZIP,
         "says gzip, the bytes are tar"),
        (zstd_blob, MEDIA_LAYER_GZIP, "says gzip, the bytes are zstd"),
        (gzip_blob, MEDIA_LAYER_ZSTD, "says zstd, the bytes are gzip"),
        (lambda t: plain_blob(t / "l.bin", b"BZh91AY&SY" + bytes(600)), MEDIA_LAYER_TAR,
         "the bytes are bzip2"),
        (gzip_blob, "application/vnd.oci.image.layer.v1.tar+encrypted", "not a layer type"),
    ],
)
def test_layer_whose_bytes_are_not_its_media_type_is_refused(
    tmp_path: Path, make: Any, media: str, says: str
) -> None:
    blob = make(tmp_path)
    base = base_archive(tmp_path / "base.tar", [(blob, media)])
    with pytest.raises(InputError) as err:
        build(tmp_path, base)
    line = err.value.one_line()
    assert err.value.exit_code == ExitCode.INPUT
    assert says in line and f"layer 0 ({blob.digest})" in line and str(base) in line
    assert not (tmp_path / "image.tar").exists()
    # verify reads layers too, and names the same fault for the same archive.
    problems = verify_image_archive(base)
    assert any(says in p and "layer 0" in p for p in problems), problems


def test_correctly_labelled_layers_build_gzip_docker_gzip_tar_and_zstd(tmp_path: Path) -> None:
    layers = [
        (gzip_blob(tmp_path), MEDIA_LAYER_GZIP),
        (gzip_blob(tmp_path, "docker.tgz"), DOCKER_GZIP),
        (plain_blob(tmp_path / "l.tar", small_tar() + b"\0" * 512), MEDIA_LAYER_TAR),
        (zstd_blob(tmp_path), MEDIA_LAYER_ZSTD),
    ]
    base = base_archive(tmp_path / "base.tar", layers)
    assert verify_image_archive(base) == []
    result = build(tmp_path, base)
    assert [layer.uncompressed_size for layer in result.layers[:4]] == [
        b.uncompressed_size for b, _ in layers
    ]
    assert verify_image_archive(result.archive) == []


def test_a_remembered_layer_is_still_checked_against_its_new_label(tmp_path: Path) -> None:
    blob = gzip_blob(tmp_path)
    good = base_archive(tmp_path / "good.tar", [(blob, MEDIA_LAYER_GZIP)])
    build(tmp_path, good)  # the cache now remembers this blob's diff_id and size
    bad = base_archive(tmp_path / "bad.tar", [(blob, MEDIA_LAYER_TAR)])
    with pytest.raises(InputError, match="says tar, the bytes are gzip"):
        build(tmp_path, bad)


def test_gzip_that_holds_no_tar_is_refused(tmp_path: Path) -> None:
    inner = gzip.compress(small_tar(), mtime=0)  # gzip inside gzip: the layer is not a tar
    blob = plain_blob(tmp_path / "double.gz", gzip.compress(inner, mtime=0), diff_id_of=inner)
    base = base_archive(tmp_path / "base.tar", [(blob, MEDIA_LAYER_GZIP)])
    with pytest.raises(InputError, match="does not hold a tar archive"):
        build(tmp_path, base)


# --- bounded inflation, real sizes in the storage check -----------------------------------------


@contextmanager
def counting_inflation() -> Iterator[list[int]]:
    """Count every uncompressed byte the image code reads from a layer."""
    counted = [0]
    original = oci._decompressed

    @contextmanager
    def wrapped(raw: Any, compression: str) -> Iterator[Any]:
        with original(raw, compression) as stream:
            class Counting:
                def read(self, size: int = -1) -> bytes:
                    chunk: bytes = stream.read(size)
                    counted[0] += len(chunk)
                    return chunk

            yield Counting()

    oci._decompressed = wrapped  # type: ignore[assignment]
    try:
        yield counted
    finally:
        oci._decompressed = original  # type: ignore[assignment]


def test_layer_diff_id_stops_at_its_bound(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.gz", 512)
    with bomb.path.open("rb") as raw, pytest.raises(LayerTooLargeError) as err:
        layer_diff_id(raw, "gzip", limit=8 * MIB)
    assert err.value.limit == 8 * MIB
    assert 8 * MIB < err.value.read_bytes <= 9 * MIB  # one 1 MiB chunk past the bound, no more
    with bomb.path.open("rb") as raw:
        assert layer_diff_id(raw, "gzip") == (bomb.diff_id, bomb.uncompressed_size)


def test_gzip_bomb_base_is_refused_as_not_fitting_without_inflating_it(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.gz", 1024)  # 1 MiB on disk, 1 GiB of zeros
    base = base_archive(tmp_path / "base.tar", [(bomb, MEDIA_LAYER_GZIP)])
    budget = StorageBudget(target="tiny", available_bytes=64 * MIB, note="64 MB emmc - 0 MB")
    with counting_inflation() as inflated, pytest.raises(FitError) as err:
        build(tmp_path, base, budget)
    line = err.value.one_line()
    assert err.value.exit_code == ExitCode.FIT
    # Both numbers: what the base needs at least, and what the target has.
    assert "more than 32.0 MiB unpacked" in line and "tiny has 64.0 MiB of storage" in line
    assert bomb.digest in line and "64 MB emmc" in line
    assert inflated[0] <= 33 * MIB  # a 32 MiB bound per image (two copies in 64 MiB), not 1 GiB
    assert not (tmp_path / "image.tar").exists()


def test_force_keeps_a_hard_bound_of_the_whole_storage(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.gz", 48)
    base = base_archive(tmp_path / "base.tar", [(bomb, MEDIA_LAYER_GZIP)])
    forced = StorageBudget(target="tiny", available_bytes=64 * MIB, note="n", enforce=False)
    result = build(tmp_path, base, forced)  # 48 MiB: two copies do not fit, --force builds
    assert result.layers[0].uncompressed_size == 48 * MIB
    tighter = StorageBudget(target="tiny", available_bytes=40 * MIB, note="n", enforce=False)
    with pytest.raises(FitError, match=r"more than 40\.0 MiB"):
        build(tmp_path, base, tighter)  # the size the cache remembers is held to the bound too


def test_real_image_size_counts_every_layer_and_the_archive(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.gz", 20)
    base = base_archive(tmp_path / "base.tar", [(bomb, MEDIA_LAYER_GZIP)])
    roomy = build(tmp_path, base, StorageBudget(target="t", available_bytes=64 * MIB, note="n"))
    unpacked = roomy.uncompressed_bytes
    needed = 2 * unpacked + roomy.size_bytes
    assert unpacked > 20 * MIB and roomy.size_bytes < MIB
    # Each layer alone fits the per-image bound; the whole image, twice, plus its archive does not.
    short = StorageBudget(target="t", available_bytes=needed - 1, note="n")
    assert unpacked <= short.max_image_bytes
    with pytest.raises(FitError) as err:
        build(tmp_path, base, short)
    line = err.value.one_line()
    assert f"storage needs {needed / MIB:.1f} MiB ({needed} bytes" in line
    assert f"t has {(needed - 1) / MIB:.1f} MiB of storage" in line
    exact = StorageBudget(target="t", available_bytes=needed, note="n")
    assert build(tmp_path, base, exact).manifest_digest == roomy.manifest_digest


def test_verify_bounds_inflation_when_asked(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.gz", 64)
    base = base_archive(tmp_path / "base.tar", [(bomb, MEDIA_LAYER_GZIP)])
    with counting_inflation() as inflated:
        problems = verify_image_archive(base, max_layer_bytes=4 * MIB)
    assert any("inflates past 4194304 bytes" in p for p in problems), problems
    assert inflated[0] <= 5 * MIB


def test_media_type_check_reads_only_the_head() -> None:
    assert check_layer_media_type(MEDIA_LAYER_TAR, bytes(512)) == "tar"  # an empty tar
    with pytest.raises(ValueError, match="the bytes are empty"):
        check_layer_media_type(MEDIA_LAYER_TAR, b"")
    with pytest.raises(ValueError, match="unknown bytes"):
        check_layer_media_type(MEDIA_LAYER_TAR, b"x" * 512)


def test_zstd_layer_stops_at_its_bound_too(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.zst"
    with bomb.open("wb") as out:
        proc = subprocess.Popen(["zstd", "-q", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        for _ in range(256):
            proc.stdin.write(bytes(MIB))
        proc.stdin.close()
        assert proc.wait() == 0
    assert bomb.stat().st_size < MIB
    with bomb.open("rb") as raw, pytest.raises(LayerTooLargeError) as err:
        layer_diff_id(raw, "zstd", limit=8 * MIB)
    assert 8 * MIB < err.value.read_bytes <= 9 * MIB
    with bomb.open("rb") as raw:
        assert layer_diff_id(raw, "zstd")[1] == 256 * MIB
