from __future__ import annotations

import typing

import pytest

from packager.agent import protocol
from packager.agent.protocol import BUCKETS, ReleaseInfo, check_percent, cohort_bucket, in_cohort
from packager.errors import UsageError
from packager.ota import bundle as ota_bundle
from packager.ota import repo


def test_the_publisher_uses_the_agents_contract_not_a_copy() -> None:
    """One OTA contract: the publisher's release type and layout names are the agent's."""
    for name in ("CUSTOM_KEY", "METADATA_DIR", "TARGETS_DIR", "USB_SUBDIR", "release_target"):
        assert getattr(repo, name) is getattr(protocol, name), name
    for name in ("BLOB_PREFIX", "FILE_PREFIX", "RELEASE_SCHEMA", "CUSTOM_KEY"):
        assert getattr(ota_bundle, name) is getattr(protocol, name), name
    assert not hasattr(repo, "Release")
    assert typing.get_type_hints(repo.Repository.release)["return"] is ReleaseInfo


def test_percent_is_one_whole_number_type_on_both_sides() -> None:
    custom = {"edgepack": {"kind": "release", "channel": "stable", "sequence": 3, "name": "m",
                           "version": "1", "compat": {"platform": "linux/arm64",
                                                      "device_class": "linux-container"},
                           "percent": 25, "halted": False}}  # fmt: skip
    release = ReleaseInfo.from_custom("t", custom)
    assert release is not None and release.percent == 25 and type(release.percent) is int
    assert release.to_json()["percent"] == 25
    for bad in (25.5, True, "25", 101, -1, float("nan")):
        custom["edgepack"]["percent"] = bad  # type: ignore[index]
        assert ReleaseInfo.from_custom("t", custom) is None, bad
    assert check_percent(50.0) == 50
    with pytest.raises(UsageError, match=r"--percent 12\.5: must be a whole number"):
        ota_bundle.check_percent(12.5)


def test_raising_the_percentage_only_adds_devices() -> None:
    devices = [f"dev-{i}" for i in range(2000)]
    previous: set[str] = set()
    for percent in (0, 1, 5, 10, 25, 50, 99, 100):
        chosen = {d for d in devices if in_cohort(d, percent)}
        assert previous <= chosen
        previous = chosen
    assert previous == set(devices)
    # Roughly proportional (a broken hash would put everyone in one bucket).
    ten = sum(in_cohort(d, 10) for d in devices)
    assert 120 < ten < 280


def test_cohort_is_stable_and_in_range() -> None:
    assert cohort_bucket("abc") == cohort_bucket("abc")
    assert 0 <= cohort_bucket("abc") < BUCKETS
    assert not in_cohort("abc", 0)


def test_malformed_custom_fields_are_not_a_release() -> None:
    assert ReleaseInfo.from_custom("x", {"edgepack": {"kind": "release"}}) is None
    assert ReleaseInfo.from_custom("x", None) is None
