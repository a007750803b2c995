"""Reading a bundle into a release: the command line's channel and percent, checked whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from packager.agent.protocol import CHANNEL, ReleaseInfo
from packager.cli import main
from packager.errors import ExitCode, UsageError
from packager.ota.bundle import check_channel, check_percent
from packager.ota.repo import Repository
from packager.targets import CHANNEL_FORM
from tests.unit.ota.synth import make_bundle

GOOD_CHANNELS = ("stable", "a", "0", "beta-2", "x.y_z", "a" * 63, "0" + "._-" * 20 + "z")
# A trailing newline (which `$` lets through), 64 characters, path and shell characters.
BAD_CHANNELS = (
    "stable\n", "stable\r\n", "\nstable", "a" * 64, "", ".hidden", "-x", "_x", "Stable",
    "a/b", "..", "a b", "a\x00", "$(id)", "stable\n/../x",
)  # fmt: skip


def _custom(channel: str) -> dict[str, object]:
    return {"edgepack": {"kind": "release", "channel": channel, "sequence": 1, "name": "m",
                         "version": "1", "compat": {"platform": "linux/arm64",
                                                    "device_class": "linux-container"},
                         "percent": 100, "halted": False}}  # fmt: skip


@pytest.mark.parametrize("channel", BAD_CHANNELS)
def test_a_bad_channel_is_a_usage_error_naming_the_option(channel: str) -> None:
    with pytest.raises(UsageError) as raised:
        check_channel(channel)
    assert raised.value.exit_code == ExitCode.USAGE
    line = raised.value.one_line()
    assert line.startswith(f"--channel {channel!r}: must match ") and "at most 63" in line


def test_publisher_build_and_agent_accept_exactly_the_same_channels() -> None:
    """One form: what `ota publish --channel` signs is what `build --ota-channel` writes into
    the agent's config and what the agent reads back from signed metadata, and nothing else."""
    assert CHANNEL_FORM.pattern == CHANNEL.pattern
    for channel in GOOD_CHANNELS + BAD_CHANNELS:
        published = True
        try:
            assert check_channel(channel) == channel
        except UsageError:
            published = False
        built = CHANNEL_FORM.matches(channel)
        read = ReleaseInfo.from_custom("t", _custom(channel)) is not None
        assert published == built == read == (channel in GOOD_CHANNELS), repr(channel)


@pytest.mark.parametrize("percent", [101, -1, 12.5, float("nan"), float("inf")])
def test_a_bad_percent_is_a_usage_error_naming_the_option(percent: float) -> None:
    with pytest.raises(UsageError, match=r"^--percent .*: must be a whole number from 0 to 100"):
        check_percent(percent)
    assert check_percent(100.0) == 100 and check_percent(0) == 0


def test_cli_bad_channel_or_percent_exits_2_with_one_line_and_publishes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle(tmp_path / "b").path
    repo = Repository.init(tmp_path / "r")
    published = repo.publish(bundle)
    metadata = sorted(p.name for p in repo.metadata_dir.iterdir())
    runs = (
        (["ota", "publish", str(bundle), "--repo", str(repo.path), "--channel", "stable\n"],
         "--channel 'stable\\n'"),
        (["ota", "publish", str(bundle), "--repo", str(repo.path), "--channel", "c" * 64],
         "--channel 'ccc"),
        (["ota", "publish", str(bundle), "--repo", str(repo.path), "--percent", "101"],
         "--percent 101"),
        (["ota", "rollout", "--repo", str(repo.path), "--percent", "101"], "--percent 101"),
        (["ota", "rollout", "--repo", str(repo.path), "--channel", "stable\n", "--percent", "5"],
         "--channel 'stable\\n'"),
        (["ota", "halt", "--repo", str(repo.path), "--channel", "../x"], "--channel '../x'"),
        # status only filters by the channel: a typo was an empty table, now one line.
        (["ota", "status", "--repo", str(repo.path), "--channel", "Stable"], "--channel 'Stable'"),
    )  # fmt: skip
    for args, named in runs:
        with pytest.raises(SystemExit) as exited:
            main(args)
        captured = capsys.readouterr()
        assert exited.value.code == ExitCode.USAGE, (args, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], (args, captured.err)
        assert "Traceback" not in captured.err + captured.out
    assert sorted(p.name for p in repo.metadata_dir.iterdir()) == metadata
    assert [(r.sequence, r.percent, r.halted) for r in repo.releases()] == [
        (published.sequence, 100, False)
    ]
