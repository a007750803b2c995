"""packager.tools.ssh: what reaches ssh and scp (no connection is made here)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from packager.errors import UsageError
from packager.tools.ssh import (
    SshHost,
    SshOptions,
    check_option_path,
    parse_ssh_url,
    remote_command,
    remote_path,
    scp_argv,
    ssh_argv,
)


@pytest.mark.parametrize(("url", "host"), [
    ("ssh://orin-ref-01", SshHost("orin-ref-01")),
    ("ssh://nvidia@orin-ref-01.lab.example:2222", SshHost("orin-ref-01.lab.example", "nvidia",
                                                          2222)),
    ("ssh://root@127.0.0.1:19600", SshHost("127.0.0.1", "root", 19600)),
    ("ssh://[::1]:22", SshHost("::1", None, 22)),
    ("ssh://ci_user.2@[fe80::1]", SshHost("fe80::1", "ci_user.2", None)),
    ("ssh://host/", SshHost("host")),
])  # fmt: skip
def test_addresses_parse(url: str, host: SshHost) -> None:
    assert parse_ssh_url(url) == host
    assert parse_ssh_url(host.url) == host


@pytest.mark.parametrize("url", [
    "ssh://-oProxyCommand=touch${IFS}x",
    "ssh://-host",
    "ssh://root@-oProxyCommand=x",
    "ssh://-l@host",
    "ssh://host;rm -rf /",
    "ssh://host$(id)",
    "ssh://host`id`",
    "ssh://host|id",
    "ssh://ho st",
    "ssh://hôst",
    "ssh://host\n",
    "ssh://host\x00",
    "ssh://ro ot@host",
    "ssh://root@@host",
    "ssh://host:0",
    "ssh://host:065",
    "ssh://host:65536",
    "ssh://host:22;x",
    "ssh://[::1;id]",
    "ssh://[host]",
    "ssh://",
    "ssh://host/path",
    "http://host",
    "host",
    "ssh://" + "a" * 64,
])  # fmt: skip
def test_hostile_or_malformed_addresses_are_refused(url: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_ssh_url(url)
    assert info.value.one_line().startswith("--on: ")
    assert "\n" not in info.value.one_line()


def test_ssh_argv_puts_the_host_after_double_dash_with_the_safety_options() -> None:
    args = ssh_argv(SshHost("h", "u", 2222), SshOptions(), "true")
    assert args[-3:] == ["--", "h", "true"]
    assert args[args.index("-p") + 1] == "2222" and args[args.index("-l") + 1] == "u"
    options = {args[i + 1] for i, a in enumerate(args) if a == "-o"}
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", "ForwardAgent=no",
            "ClearAllForwardings=yes"} <= options
    assert not any(o.startswith("UserKnownHostsFile") for o in options)


def test_known_hosts_and_identity_are_the_only_ones_used(tmp_path: Path) -> None:
    (tmp_path / "known").write_text("")
    (tmp_path / "id").write_text("")
    opts = SshOptions(known_hosts=check_option_path(tmp_path / "known", "--known-hosts"),
                      identity=check_option_path(tmp_path / "id", "--identity"))
    args = scp_argv(SshHost("h", port=22), opts, ["a"], "h:/tmp/x/")
    options = {args[i + 1] for i, a in enumerate(args) if a == "-o"}
    assert f"UserKnownHostsFile={tmp_path / 'known'}" in options
    assert "GlobalKnownHostsFile=/dev/null" in options and "IdentitiesOnly=yes" in options
    assert args[args.index("-P") + 1] == "22" and args[-3:] == ["--", "a", "h:/tmp/x/"]


@pytest.mark.parametrize("name", ["with space", "50%d", "a\nb"])
def test_option_paths_ssh_would_split_or_expand_are_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("")
    with pytest.raises(UsageError, match="--known-hosts"):
        check_option_path(path, "--known-hosts")


def test_a_missing_option_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        check_option_path(tmp_path / "absent", "--identity")


def test_remote_commands_are_quoted_word_by_word() -> None:
    argv = ["sh", "-c", 'cd -- "$1" && exec "$@"', "sh", "/tmp/d x", "a;rm -rf /", "$(id)", "'"]
    assert shlex.split(remote_command(argv)) == argv


@pytest.mark.parametrize("path", ["relative", "/tmp/../etc", "/tmp/a b", "/tmp/$(id)", "/"])
def test_remote_paths_are_plain_and_absolute(path: str) -> None:
    with pytest.raises(ValueError):
        remote_path(SshHost("h"), path)


def test_remote_paths_name_the_host_as_scp_does() -> None:
    assert remote_path(SshHost("::1", "u"), "/tmp/x") == "u@[::1]:/tmp/x"
    assert remote_path(SshHost("h"), "/tmp/x.y/z") == "h:/tmp/x.y/z"
