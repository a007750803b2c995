"""The path policy over --base layers and image.tar layers: every member name of every layer is
checked as it is read (packager.agent.paths.LayerWalk, via packager.image.oci.layer_diff_id).
The layers are real tars written by tarfile, as an attacker would write them."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from packager.agent.paths import LayerWalk, PathError, normalize_member
from packager.errors import ExitCode, InputError
from packager.image.builder import verify_image_archive
from packager.image.cache import ContentCache
from packager.image.oci import MEDIA_LAYER_GZIP
from tests.image_factory import Blob, base_archive, plain_blob
from tests.unit.image.test_base_layers import build

Member = tuple[str, bytes, str]  # (name, type, link name)


def layer(tmp: Path, name: str, members: list[Member]) -> Blob:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member_name, kind, link in members:
            info = tarfile.TarInfo(member_name)
            info.type, info.linkname, info.mode = kind, link, 0o755
            data = b"x" if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    raw = buf.getvalue()
    return plain_blob(tmp / name, gzip.compress(raw, mtime=0), diff_id_of=raw)


F, D, S, H = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE

ATTACKS: dict[str, tuple[list[Member], str]] = {
    "dotdot": ([("bin", D, ""), ("../../../tmp/x", F, "")], "'..' component"),
    "dotdot-inside": ([("a/../../x", F, "")], "'..' component"),
    "absolute": ([("/tmp/x", F, "")], "absolute member name"),
    "below-symlink": ([("s", S, "/tmp/attack"), ("s/file", F, "")], "below 's', a symbolic link"),
    "below-symlink-dir-redefined": (
        [("s", S, "/tmp"), ("s", D, ""), ("s/file", F, "")], "below 's'"),
    "hardlink-absolute": ([("h", H, "/etc/shadow")], "hard link to '/etc/shadow'"),
    "hardlink-dotdot": ([("h", H, "../../etc/shadow")], "hard link to"),
    "hardlink-through-symlink": ([("s", S, "/etc"), ("h", H, "s/shadow")], "hard link to"),
    "device": ([("dev/sda", tarfile.CHRTYPE, "")], "device node members are refused"),
    "fifo": ([("p", tarfile.FIFOTYPE, "")], "FIFO members are refused"),
}


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_base_layer_member_outside_the_root_is_refused(tmp_path: Path, kind: str) -> None:
    members, says = ATTACKS[kind]
    blob = layer(tmp_path, "l.tgz", members)
    base = base_archive(tmp_path / "base.tar", [(blob, MEDIA_LAYER_GZIP)])
    with pytest.raises(InputError) as err:
        build(tmp_path, base)
    line = err.value.one_line()
    assert err.value.exit_code == ExitCode.INPUT
    assert says in line and f"layer 0 ({blob.digest})" in line and "member " in line, line
    assert not (tmp_path / "image.tar").exists()
    problems = verify_image_archive(base)  # verify walks the same members of image.tar layers
    assert any(says in p and "layer 0" in p for p in problems), problems


def test_member_below_a_symlink_of_a_lower_layer_is_refused(tmp_path: Path) -> None:
    lower = layer(tmp_path, "lower.tgz", [("s", S, "/tmp/attack")])
    upper = layer(tmp_path, "upper.tgz", [("s/file", F, "")])
    base = base_archive(tmp_path / "base.tar",
                        [(lower, MEDIA_LAYER_GZIP), (upper, MEDIA_LAYER_GZIP)])
    with pytest.raises(InputError, match=f"layer 1 \\({upper.digest}\\).*below 's'"):
        build(tmp_path, base)
    assert any("layer 1" in p and "below 's'" in p for p in verify_image_archive(base))


def test_a_lower_symlink_replaced_or_whited_out_no_longer_counts(tmp_path: Path) -> None:
    lower = layer(tmp_path, "lower.tgz", [("s", S, "/tmp"), ("t", S, "/tmp"),
                                          ("usr", D, ""), ("bin", S, "usr/bin")])
    upper = layer(tmp_path, "upper.tgz", [("s", D, ""), ("s/file", F, ""), (".wh.t", F, ""),
                                          ("t", D, ""), ("t/file", F, ""), ("usr/bin/ls", F, ""),
                                          ("./etc/", D, ""), ("./etc/hosts", F, "")])
    base = base_archive(tmp_path / "base.tar",
                        [(lower, MEDIA_LAYER_GZIP), (upper, MEDIA_LAYER_GZIP)])
    build(tmp_path, base)  # a merged-/usr link and replaced links are ordinary rootfs content
    assert verify_image_archive(tmp_path / "image.tar") == []


def test_a_layer_remembered_before_the_member_check_is_walked_again(tmp_path: Path) -> None:
    blob = layer(tmp_path, "l.tgz", [("../../tmp/x", F, "")])
    base = base_archive(tmp_path / "base.tar", [(blob, MEDIA_LAYER_GZIP)])
    cache = ContentCache(tmp_path / "cache")
    # What the cache held for this layer when only its diff_id and size were checked.
    cache.put_record("base-layer", blob.digest.removeprefix("sha256:"), {
        "diff_id": blob.diff_id, "uncompressed_size": blob.uncompressed_size,
        "compression": "gzip"})
    with pytest.raises(InputError, match=r"'\.\.' component"):
        build(tmp_path, base)


@pytest.mark.parametrize(("name", "normal"), [("./etc/", "etc"), ("./", ""), ("a/b", "a/b"),
                                              ("././x", "x")])
def test_member_names_are_normalised_as_tar_does(name: str, normal: str) -> None:
    assert normalize_member(name) == normal


def test_a_symlink_stays_a_symlink_for_the_rest_of_its_layer() -> None:
    walk = LayerWalk()
    walk.check("s", "symlink")
    walk.check("s", "dir")
    with pytest.raises(PathError, match="below 's'"):
        walk.check("s/x", "file")
    walk.next_layer()
    walk.check("s", "dir")  # a lower layer's link replaced by a directory
    assert walk.check("s/x", "file") == "s/x"
