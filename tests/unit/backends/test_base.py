"""packager.backends.base.created_epoch: SOURCE_DATE_EPOCH in ASCII digits, or a usage error."""

from __future__ import annotations

import pytest

from packager.backends.base import created_epoch
from packager.errors import UsageError
from packager.image.oci import iso_time


@pytest.mark.parametrize(
    ("value", "epoch"), [(None, 0), ("", 0), ("0", 0), ("1700000000", 1700000000)]
)
def test_source_date_epoch_is_read(
    monkeypatch: pytest.MonkeyPatch, value: str | None, epoch: int
) -> None:
    if value is None:
        monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    else:
        monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    assert created_epoch() == epoch


def test_the_latest_epoch_accepted_is_one_an_image_can_carry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "253402300799")
    assert iso_time(created_epoch()) == "9999-12-31T23:59:59Z"


# '²' passes str.isdigit() and int() refused it (an internal error); '١٧' int() read as 17; the
# rest were silently built as 1970 although the spec says a malformed value SHOULD fail.
@pytest.mark.parametrize(
    "value", ["\u00b2", "\u0661\u0667", "-1", "+5", "1_000", " 5", "5\n", "now", "253402300800"]
)
def test_a_malformed_source_date_epoch_is_one_usage_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(UsageError, match=r"^SOURCE_DATE_EPOCH=.*ASCII digits") as raised:
        created_epoch()
    assert "\n" not in raised.value.one_line()
