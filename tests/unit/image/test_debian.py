from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from packager.errors import NetworkError
from packager.image.cache import ContentCache
from packager.image.debian import (
    DEFAULT_PYTHON_PACKAGES,
    build_base_layer,
    dpkg_status_stanza,
    group_text,
    is_excluded,
    lock_key,
    merge_package_tar,
    merged_usr_path,
    parse_stanzas,
    passwd_text,
    skeleton_entries,
    split_deb_filename,
)
from packager.image.layer import TarEntry
from packager.image.spec import DebianBase
from packager.tools.apt import parse_print_uris


@pytest.mark.parametrize(
    ("path", "arch", "expected"),
    [
        ("./bin/ls", "arm64", "usr/bin/ls"),
        ("./sbin/ldconfig", "arm64", "usr/sbin/ldconfig"),
        ("./lib/ld-linux-aarch64.so.1", "arm64", "usr/lib/ld-linux-aarch64.so.1"),
        ("./lib64/ld-linux-x86-64.so.2", "amd64", "usr/lib64/ld-linux-x86-64.so.2"),
        ("./lib64/x", "arm64", "lib64/x"),  # arm64 has no lib64 link (debootstrap)
        ("./usr/bin/python3.11", "arm64", "usr/bin/python3.11"),
        ("./library/x", "arm64", "library/x"),  # only whole components are mapped
        ("./etc/ld.so.conf.d/x.conf", "amd64", "etc/ld.so.conf.d/x.conf"),
        ("./", "arm64", ""),
    ],
)
def test_merged_usr_mapping(path: str, arch: str, expected: str) -> None:
    assert merged_usr_path(path, arch) == expected


def test_exclusions_keep_licence_notices() -> None:
    exclude = DebianBase().exclude
    assert is_excluded("usr/share/doc/libc6/changelog.Debian.gz", exclude)
    assert is_excluded("usr/share/doc", exclude)
    assert is_excluded("usr/share/man/man1/python3.11.1.gz", exclude)
    assert not is_excluded("usr/share/doc/libc6/copyright", exclude)
    assert not is_excluded("usr/share/docs-not-really/x", exclude)
    assert not is_excluded("usr/lib/python3.11/os.py", exclude)


def test_deb_filenames_and_print_uris_parse() -> None:
    assert split_deb_filename("libc6_2.36-9+deb12u14_arm64.deb") == (
        "libc6", "2.36-9+deb12u14", "arm64")
    assert split_deb_filename("dpkg_1%3a1.21.22_arm64.deb") == ("dpkg", "1:1.21.22", "arm64")
    text = (
        "Reading package lists...\n"
        "'http://deb.debian.org/debian/pool/main/g/glibc/libc6_2.36-9%2bdeb12u14_arm64.deb' "
        "libc6_2.36-9+deb12u14_arm64.deb 2324660 MD5Sum:96654eb25919c6f15deb9848c0f06601\n"
        "'http://x/pool/m/media-types_10.0.0_all.deb' media-types_10.0.0_all.deb 26 \n"
    )
    planned = parse_print_uris(text)
    assert [(p.filename, p.size) for p in planned] == [
        ("libc6_2.36-9+deb12u14_arm64.deb", 2324660), ("media-types_10.0.0_all.deb", 26)]


def test_control_stanzas_and_dpkg_status() -> None:
    text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nSHA256: AB\n"
    assert parse_stanzas(text) == [
        {"Package": "a", "Version": "1", "Description": "x\n more"},
        {"Package": "b", "SHA256": "AB"},
    ]
    status = dpkg_status_stanza("Package: a\nVersion: 1\n")
    assert status.splitlines()[:2] == ["Package: a", "Status: install ok installed"]


def test_users_files() -> None:
    users = (("edgepack", 10001),)
    assert passwd_text(users).splitlines() == [
        "root:x:0:0:root:/root:/bin/sh",
        "edgepack:x:10001:10001::/nonexistent:/usr/sbin/nologin",
    ]
    assert group_text(users).splitlines() == ["root:x:0:", "edgepack:x:10001:"]


def test_lock_key_depends_on_arch_and_packages_not_their_order() -> None:
    a = DebianBase(packages=DEFAULT_PYTHON_PACKAGES)
    b = DebianBase(packages=tuple(reversed(DEFAULT_PYTHON_PACKAGES)))
    assert lock_key(a, "arm64") == lock_key(b, "arm64")
    assert lock_key(a, "arm64") != lock_key(a, "amd64")
    assert lock_key(a, "arm64") != lock_key(DebianBase(packages=("libc6",)), "arm64")


def _package_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> tarfile.TarFile:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return tarfile.open(fileobj=buf, mode="r:")


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "",
          mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, size, link, mode
    return info


def test_merge_maps_paths_copies_hardlinks_and_excludes() -> None:
    tf = _package_tar([
        (_info("./", tarfile.DIRTYPE, mode=0o755), None),
        (_info("./bin", tarfile.DIRTYPE, mode=0o755), None),
        (_info("./bin/tool", size=4, mode=0o755), b"tool"),
        (_info("./bin/tool-again", tarfile.LNKTYPE, link="./bin/tool"), None),
        (_info("./lib/libx.so.1", tarfile.SYMTYPE, link="aarch64-linux-gnu/libx.so.1"), None),
        (_info("./usr/share/doc/x/changelog.gz", size=1), b"c"),
        (_info("./usr/share/doc/x/copyright", size=1), b"l"),
    ])
    entries: dict[str, TarEntry] = {}
    merge_package_tar(tf, entries, arch="arm64", exclude=DebianBase().exclude)
    assert sorted(entries) == ["usr/bin", "usr/bin/tool", "usr/bin/tool-again",
                               "usr/lib/libx.so.1", "usr/share/doc/x/copyright"]
    again = entries["usr/bin/tool-again"]
    assert again.kind == "file" and again.size == 4 and again.mode == 0o755
    assert callable(again.data) and again.data().read() == b"tool"
    assert entries["usr/lib/libx.so.1"].linkname == "aarch64-linux-gnu/libx.so.1"


def test_skeleton_adds_merged_links_users_and_python3_only_when_missing() -> None:
    present = {"usr/bin/python3.11": TarEntry("usr/bin/python3.11", "file", 0o755)}
    extra = {e.path: e for e in skeleton_entries("amd64", "bookworm", (("svc", 5),), present)}
    assert extra["lib64"].linkname == "usr/lib64" and extra["bin"].linkname == "usr/bin"
    assert extra["usr/bin/python3"].linkname == "python3.11"
    assert extra["tmp"].mode == 0o1777
    assert isinstance(extra["etc/passwd"].data, bytes) and b"svc:x:5:5" in extra["etc/passwd"].data
    assert isinstance(extra["usr/lib/os-release"].data, bytes)
    assert b'VERSION_ID="12"' in extra["usr/lib/os-release"].data
    present["usr/bin/python3"] = TarEntry("usr/bin/python3", "symlink", 0o777,
                                          linkname="python3.11")
    arm = {e.path for e in skeleton_entries("arm64", "bookworm", (), present)}
    assert "usr/bin/python3" not in arm and "lib64" not in arm


def test_offline_without_a_lock_fails_before_touching_the_network(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path / "cache")
    with pytest.raises(NetworkError, match="offline"):
        build_base_layer(DebianBase(packages=DEFAULT_PYTHON_PACKAGES), "arm64", (), 0, cache,
                         offline=True)
    assert not (tmp_path / "cache" / "apt").exists()  # apt was never set up, let alone run
