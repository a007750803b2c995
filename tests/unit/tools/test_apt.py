from __future__ import annotations

from packager.tools.apt import fetched_package


def test_fetched_package_reads_apt_get_download_lines() -> None:
    # Lines as apt-get 2.6 (Debian 12) prints them while downloading.
    assert fetched_package(
        "Get:2 http://deb.debian.org/debian bookworm/main arm64 zlib1g arm64 "
        "1:1.2.13.dfsg-1 [82.7 kB]"
    ) == "zlib1g"
    assert fetched_package(
        "Get:1 http://deb.debian.org/debian bookworm/main arm64 media-types all 10.0.0 [26.1 kB]"
    ) == "media-types"
    assert fetched_package("Fetched 109 kB in 0s (4441 kB/s)") is None
    assert fetched_package("") is None
