from __future__ import annotations

from packager.agent import protocol
from packager.agent.protocol import BUCKETS, ReleaseInfo, cohort_bucket, in_cohort
from packager.ota import layout


def test_agent_and_publisher_agree_on_the_layout() -> None:
    for name in (
        "METADATA_DIR", "TARGETS_DIR", "RELEASE_PREFIX", "BLOB_PREFIX", "FILE_PREFIX",
        "RELEASE_SCHEMA", "CUSTOM_KEY", "USB_SUBDIR",
    ):  # fmt: skip
        assert getattr(protocol, name) == getattr(layout, name), name
    assert protocol.release_target("beta", 7) == layout.release_target("beta", 7)


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
