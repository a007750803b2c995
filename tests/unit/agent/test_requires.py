"""The agent installs a release only on a device that meets its ``compat.requires`` (issue 12
point 6): a Jetson release's L4T range and SM, which the agent learns by running its facts probe
(packager/agent/device.py): here the REAL packager/runtime/jetson_preflight.py, run with this
interpreter as ``--facts --root FIXTURE`` on the fixture trees in tests/data/jetson, exactly as
the device runs the bundle's copy. A release the device does not meet, whose requirement the
agent does not know, or for which the facts are unknown (no probe, a probe that fails, hangs,
floods or prints anything but the schema) is skipped with one reason line in the report and
never downloaded.

The release is a real Jetson bundle (``edgepack build`` on a STAND-IN base for a TEST-ONLY copy of
jetson-orin-nano: tests/unit/ota/jetson_bundle.py) published into a real TUF repository served
on loopback (ports 19700-19749; the runtime's port from 19750-19799); the container engine is
the agent tests' fake engine (tests/unit/agent/fake_engine.py), which loads the real image.tar.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from packager.agent import confinement
from packager.agent.agent import Agent, AgentConfig, CycleResult, init_device
from packager.agent.device import FACTS_MAX_BYTES, DeviceFacts, parse_facts, probe_facts
from packager.ota.repo import Repository
from tests.ports import free_port_in
from tests.unit.agent.helpers import REPO_ROOT, assert_complete, reports, static_mirror
from tests.unit.ota.jetson_bundle import build_jetson_bundle

FIXTURES = Path(__file__).resolve().parents[2] / "data" / "jetson"
PREFLIGHT = REPO_ROOT / "packager" / "runtime" / "jetson_preflight.py"
ORIN_RANGE = "L4T >= r36.0.0 and < r36.4.0 required"
PLATFORM = "linux/arm64/v8"


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_jetson_bundle(tmp_path_factory.mktemp("jetson"))


@pytest.fixture
def mirror(repo: Repository) -> Iterator[str]:
    """The repository's files over HTTP on loopback (a mirror: nothing but static files)."""
    with static_mirror(repo.path / "repository", range(19700, 19750)) as url:
        yield url


def probe(root: Path) -> tuple[str, ...]:
    """The facts probe a Jetson bundle configures (``/usr/bin/python3 /opt/edgepack/NAME/
    jetson_preflight.py --facts``), on the real preflight, reading the fixture tree ``root``."""
    return (sys.executable, str(PREFLIGHT), "--facts", "--root", str(root))


def _sysroot(name: str, tmp_path: Path) -> Path:
    """A fixture device tree: one of tests/data/jetson, or a variant of r36.3.0 made here."""
    if name == "not-a-jetson":
        (tmp_path / "plain").mkdir()
        return tmp_path / "plain"
    if name == "r36.3.0-on-a-xavier":  # the right L4T release, the wrong GPU (SM 7.2)
        root = Path(shutil.copytree(FIXTURES / "r36.3.0", tmp_path / "xavier"))
        (root / "proc/device-tree/compatible").write_bytes(
            b"nvidia,p3668-0001\0nvidia,tegra194\0")
        (root / "sys/module/tegra_fuse/parameters/tegra_chip_id").write_text("25\n")
        return root
    return FIXTURES / name


@dataclasses.dataclass(frozen=True)
class Jetson:
    """A device initialised to trust the repository, nothing installed yet: its root, its
    runtime's port, the fake engine and the mirror it reads."""

    root: Path
    port: int
    engine: Path
    mirror: str

    def config(self, sysroot: Path = FIXTURES / "r36.3.0", **probe_config: object) -> AgentConfig:
        """The agent's configuration on this device, whose facts probe (the real preflight)
        reads ``sysroot`` (default: an Orin on r36.3.0, the bundle's own device);
        ``probe_config`` replaces ``facts_probe`` / ``facts_timeout_s``."""
        config = AgentConfig(
            root=self.root, repo_url=self.mirror, device_id="jetson-0001", platform=PLATFORM,
            device_class="jetson", engine=str(self.engine), port=self.port,
            ready_timeout_s=10.0, trial_s=0.3, poll_s=0.1, http_timeout_s=10.0,
            facts_probe=probe(sysroot),
        )  # fmt: skip
        return dataclasses.replace(config, **probe_config)  # type: ignore[arg-type]

    def run_once(self, sysroot: Path = FIXTURES / "r36.3.0") -> CycleResult:
        return Agent(self.config(sysroot)).run_once()


@pytest.fixture
def jetson(tmp_path: Path, repo: Repository, engine: Path, mirror: str) -> Jetson:
    root = tmp_path / "device"
    init_device(root, repo.trusted_root)
    return Jetson(root, free_port_in(range(19750, 19800)), engine, mirror)


def _calls(engine: Path) -> list[str]:
    log = engine.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def _nothing_fetched(jetson: Jetson) -> None:
    state = json.loads((jetson.root / "state.json").read_text())
    assert state["installed"] is None and state["pending"] is None
    assert list((jetson.root / "store" / "objects").iterdir()) == []
    assert not (jetson.root / "releases" / "1").exists()
    assert not any(call.startswith("load") for call in _calls(jetson.engine))


def test_a_matching_jetson_installs_the_release_with_the_gpu_flags(
    jetson_bundle: Path, repo: Repository, jetson: Jetson
) -> None:
    repo.publish(jetson_bundle)
    result = jetson.run_once()
    assert (result.outcome, result.sequence) == ("committed", 1), result.reason
    assert_complete(jetson.root, 1, jetson.port)
    # The bundle's prepare step (the engine build, tests/unit/agent/test_prepare.py), then serving.
    prepare, run = [call.split() for call in _calls(jetson.engine) if call.startswith("run ")]
    assert prepare[:2] == ["run", "--rm"] and run[:2] == ["run", "-d"]
    # The release's confinement.json: the floor, the limits and exactly the NVIDIA flags as the
    # engine (the stand-in is named podman) gives them: CDI, not docker's NVIDIA runtime.
    assert run[run.index("-p") + 2 : run.index("--")] == list(
        confinement.detached_args(jetson.root / "releases" / "1", "podman")
    )
    for flag in confinement.NVIDIA_JETSON["podman"]:
        assert run.count(flag) == 1
    assert "--runtime=nvidia" not in run
    assert [r["outcome"] for r in reports(jetson.root)] == ["committed"]


CASES = {
    "r32.7.1": f"{ORIN_RANGE}, found r32.7.1; sm87 required, found sm53 (tegra210)",
    "r35.4.1": f"{ORIN_RANGE}, found r35.4.1; sm87 required, found sm72 (tegra194)",
    "r36.4.0": f"{ORIN_RANGE}, found r36.4.0",
    "r36.3.0-on-a-xavier": "sm87 required, found sm72 (tegra194)",
    "not-a-jetson": f"{ORIN_RANGE}, found no /etc/nv_tegra_release (not a Jetson, or L4T not"
    " installed); sm87 required, found no Tegra SoC (no nvidia,tegra* in"
    " /proc/device-tree/compatible, no tegra_chip_id)",
}


@pytest.mark.parametrize("device", sorted(CASES))
def test_a_device_of_another_l4t_or_sm_skips_the_release_with_the_reason(
    jetson_bundle: Path, repo: Repository, jetson: Jetson, tmp_path: Path, device: str
) -> None:
    repo.publish(jetson_bundle)
    cfg = jetson.config(_sysroot(device, tmp_path))
    for _ in range(2):  # reported once, skipped every time
        result = Agent(cfg).run_once()
        assert (result.outcome, result.sequence, result.reason) == (
            "not-eligible", 1, f"release skipped here: {CASES[device]}"
        )
    _nothing_fetched(jetson)
    (report,) = reports(jetson.root)
    assert (report["outcome"], report["sequence"], report["reason"]) == (
        "not-eligible", 1, CASES[device]
    )
    state = json.loads((jetson.root / "state.json").read_text())
    assert state["skipped"] == {"1": CASES[device]}


def test_an_unknown_requirement_is_never_guessed(
    jetson_bundle: Path, repo: Repository, jetson: Jetson
) -> None:
    """A newer publisher's requirement this agent does not know: skipped, even on a device that
    meets every requirement it knows."""
    plan = repo.plan(jetson_bundle)
    repo.apply(dataclasses.replace(plan, requires=(*plan.requires, ("npu_cores", "2"))))
    result = jetson.run_once()
    reason = "requires.npu_cores: unknown requirement (this agent knows l4t_below, l4t_min, sm)"
    assert (result.outcome, result.reason) == ("not-eligible", f"release skipped here: {reason}")
    _nothing_fetched(jetson)
    assert [(r["outcome"], r["reason"]) for r in reports(jetson.root)] == [
        ("not-eligible", reason)
    ]


def test_a_newer_release_for_other_devices_does_not_hide_this_devices_release(
    jetson_bundle: Path, repo: Repository, jetson: Jetson
) -> None:
    """One channel, two releases: 1 for Orin (this device), 2 for an SM 7.2 device. The Orin
    installs 1 and reports 2 skipped; later cycles keep 1."""
    repo.publish(jetson_bundle)
    plan = repo.plan(jetson_bundle)
    other = dict(plan.requires) | {"sm": "72"}
    repo.apply(dataclasses.replace(plan, requires=tuple(sorted(other.items()))))
    first = jetson.run_once()
    assert (first.outcome, first.sequence) == ("committed", 1), first.reason
    again = jetson.run_once()
    assert (again.outcome, again.sequence, again.reason) == (
        "not-eligible", 2, "release skipped here: sm72 required, found sm87 (tegra234)"
    )
    assert_complete(jetson.root, 1, jetson.port)
    assert [(r["outcome"], r["sequence"]) for r in reports(jetson.root)] == [
        ("not-eligible", 2), ("committed", 1)
    ]


def test_the_cli_runs_the_facts_probe_it_is_given(
    jetson_bundle: Path, repo: Repository, jetson: Jetson
) -> None:
    repo.publish(jetson_bundle)
    words = [f"--facts-probe-arg={word}" for word in probe(FIXTURES / "r36.4.0")]
    argv = [
        sys.executable, "-m", "packager.agent", "run", "--root", str(jetson.root),
        "--repo", jetson.mirror, "--device-id", "jetson-0002", "--platform", PLATFORM,
        "--device-class", "jetson", *words,
        "--engine", str(jetson.engine), "--port", str(jetson.port), "--once",
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert (result["outcome"], result["reason"]) == (
        "not-eligible", f"release skipped here: {ORIN_RANGE}, found r36.4.0"
    )


@pytest.mark.parametrize(
    ("name", "l4t", "sm"),
    [("r32.7.1", (32, 7, 1), 53), ("r35.4.1", (35, 4, 1), 72), ("r36.3.0", (36, 3, 0), 87),
     ("r36.4.0", (36, 4, 0), 87)],
)  # fmt: skip
def test_the_agent_learns_each_fixture_device_from_the_preflight(
    name: str, l4t: tuple[int, int, int], sm: int
) -> None:
    """One reader: the agent's facts are what the first-boot preflight's own readers say."""
    from packager.runtime import jetson_preflight

    facts = probe_facts(probe(FIXTURES / name), timeout_s=60)
    assert isinstance(facts, DeviceFacts), facts
    assert (facts.l4t, facts.sm) == (l4t, sm)
    assert (facts.l4t, facts.l4t_found) == jetson_preflight.read_l4t(str(FIXTURES / name))
    assert (facts.sm, facts.sm_found) == jetson_preflight.read_sm(str(FIXTURES / name))


def test_hostile_device_files_reach_the_agent_as_bounded_facts(tmp_path: Path) -> None:
    """The preflight's bounded reads, through the probe: a huge release file whose first line is
    valid, and a directory where the device tree's compatible file should be."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_bytes(
        b"# R36 (release), REVISION: 3.0, GCID: 1\n" + b"x" * (8 << 20))
    (root / "proc" / "device-tree" / "compatible").mkdir(parents=True)
    facts = probe_facts(probe(root), timeout_s=60)
    assert isinstance(facts, DeviceFacts), facts
    assert (facts.l4t, facts.sm) == ((36, 3, 0), None)
    (root / "etc" / "nv_tegra_release").write_bytes(b"\x1b[31mR36 3.0\n")
    facts = probe_facts(probe(root), timeout_s=60)
    assert isinstance(facts, DeviceFacts), facts
    assert facts.l4t is None
    assert facts.l4t_found == "an unreadable /etc/nv_tegra_release ('\\x1b[31mR36 3.0')"


# --- the facts are unknown: the release is skipped with one reason, the agent goes on ---------

GOOD = {"schema": "edgepack.device-facts/v1", "l4t": "r36.3.0", "l4t_found": "r36.3.0",
        "sm": 87, "sm_found": "sm87 (tegra234)"}  # fmt: skip


def _script(tmp_path: Path, body: str) -> tuple[str, ...]:
    """A STAND-IN probe (a tiny Python script run with this interpreter) that misbehaves."""
    path = tmp_path / "probe.py"
    path.write_text("import json, os, sys, time\n" + body + "\n")
    return (sys.executable, str(path))


def _prints(document: object) -> str:
    return f"sys.stdout.write({json.dumps(json.dumps(document))})"


BAD_PROBES = {
    "exits non-zero": (
        "sys.stderr.write('starting\\npreflight: cannot read the device\\n'); sys.exit(3)",
        "exit 3: preflight: cannot read the device",
    ),
    "floods stdout": (
        "chunk = b'{' * 65536\nwhile True:\n    sys.stdout.buffer.write(chunk)",
        f"printed more than {FACTS_MAX_BYTES} bytes",
    ),
    "wrong schema": (
        _prints(GOOD | {"schema": "edgepack.device-facts/v2"}),
        'printed schema "edgepack.device-facts/v2", expected edgepack.device-facts/v1',
    ),
    "extra key": (_prints(GOOD | {"gpu": "orin"}), 'printed unexpected keys ["gpu"]'),
    "missing key": (_prints({k: v for k, v in GOOD.items() if k != "sm"}), "printed no sm"),
    "l4t with a trailing newline": (
        _prints(GOOD | {"l4t": "r36.3.0\n"}),
        'printed l4t "r36.3.0\\n": not null or a release like r36.3.0',
    ),
    "sm as a string": (
        _prints(GOOD | {"sm": "87"}), 'printed sm "87": not null or a whole number 10-999'
    ),
    "two objects": (
        _prints(GOOD) + "; " + _prints(GOOD),
        "printed something that is not one JSON object (Extra data: line 1 column",
    ),
    "nested too deep": (
        "sys.stdout.write('[' * 60000)",
        "printed something that is not one JSON object (",
    ),
    "not UTF-8": ("sys.stdout.buffer.write(b'\\xff')", "printed something that is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROBES))
def test_a_probe_that_misbehaves_skips_the_release_with_one_reason(
    jetson_bundle: Path, repo: Repository, jetson: Jetson, tmp_path: Path, case: str
) -> None:
    body, why = BAD_PROBES[case]
    argv = _script(tmp_path, body)
    _skipped_for(jetson, jetson_bundle, repo, jetson.config(facts_probe=argv),
                 f"device facts unknown: facts probe {' '.join(argv)}: {why}")  # fmt: skip


def _skipped_for(
    jetson: Jetson, bundle: Path, repo: Repository, cfg: AgentConfig, reason: str
) -> None:
    """Two cycles skip release 1 with ``reason`` (a prefix of it when the probe's own text
    follows), report it once and fetch nothing."""
    repo.publish(bundle)
    for _ in range(2):
        result = Agent(cfg).run_once()
        assert (result.outcome, result.sequence) == ("not-eligible", 1), result.reason
        assert result.reason.startswith(f"release skipped here: {reason}"), result.reason
        assert "\n" not in result.reason and len(result.reason) < 600
    _nothing_fetched(jetson)
    (report,) = reports(jetson.root)
    assert (report["outcome"], report["sequence"]) == ("not-eligible", 1)
    assert report["reason"].startswith(reason)


def _alive(pid: int) -> bool:
    """The process runs (a zombie is dead: it waits only to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def test_a_probe_that_hangs_is_killed_with_its_children_and_the_release_skipped(
    jetson_bundle: Path, repo: Repository, jetson: Jetson, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    argv = _script(tmp_path, (
        "import subprocess\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(120)"
    ))  # fmt: skip
    # 3 s, not 1: on a loaded 2-core machine the probe (an interpreter that starts a second
    # one) needs more than a second before it writes its pids, and the test needs them.
    cfg = jetson.config(facts_probe=argv, facts_timeout_s=3.0)
    _skipped_for(jetson, jetson_bundle, repo, cfg,
                 f"device facts unknown: facts probe {' '.join(argv)}: timed out after 3 s")
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid), f"probe process {pid} outlived its timeout"


def test_a_missing_probe_skips_the_release(
    jetson_bundle: Path, repo: Repository, jetson: Jetson, tmp_path: Path
) -> None:
    argv = (str(tmp_path / "opt" / "jetson_preflight.py"), "--facts")
    _skipped_for(jetson, jetson_bundle, repo, jetson.config(facts_probe=argv),
                 f"device facts unknown: facts probe {' '.join(argv)}: did not start: No such"
                 " file or directory")  # fmt: skip


@pytest.mark.parametrize(
    ("facts_probe", "why"),
    [((), "no facts probe configured (facts_probe in the agent's configuration)"),
     (("python3", "jetson_preflight.py", "--facts"),
      "facts_probe in the agent's configuration the program 'python3' must be an absolute path"),
     ("/usr/bin/python3 jetson_preflight.py --facts",
      "facts_probe in the agent's configuration must be a non-empty list of strings"),
     (("/usr/bin/python3", "a\nb"),
      "facts_probe in the agent's configuration argument 1 ('a\\nb') is not 1-4096 printable"
      " characters")],
)  # fmt: skip
def test_no_probe_or_a_malformed_one_skips_the_release(
    jetson_bundle: Path, repo: Repository, jetson: Jetson, facts_probe: object, why: str
) -> None:
    _skipped_for(jetson, jetson_bundle, repo, jetson.config(facts_probe=facts_probe),
                 f"device facts unknown: {why}")  # fmt: skip


def test_unknown_facts_fail_only_a_valid_requirement() -> None:
    from packager.agent.device import unmet

    assert unmet({}, "no facts probe configured") == ""
    assert unmet({"sm": "87"}, "x") == "device facts unknown: x"
    # An invalid requirement is named before the unknown facts.
    assert unmet({"sm": "8.7"}, "x") == "requires.sm: '8.7' is not a valid value"


def test_parse_facts_takes_exactly_the_preflights_object() -> None:
    from packager.runtime import jetson_preflight

    raw = (json.dumps(jetson_preflight.facts(str(FIXTURES / "r35.4.1"))) + "\n").encode()
    assert parse_facts(raw) == DeviceFacts((35, 4, 1), "r35.4.1", 72, "sm72 (tegra194)")
    nothing = GOOD | {"l4t": None, "l4t_found": "no /etc/nv_tegra_release", "sm": None}
    assert parse_facts(json.dumps(nothing).encode()).l4t is None
    for bad, why in [
        (GOOD | {"sm": True}, "sm true"),
        (GOOD | {"sm": 87.0}, "sm 87.0"),
        (GOOD | {"sm": 9}, "sm 9"),
        (GOOD | {"sm": 1000}, "sm 1000"),
        (GOOD | {"l4t": "r36.3"}, 'l4t "r36.3"'),
        (GOOD | {"l4t": "r36.3.0.1"}, 'l4t "r36.3.0.1"'),
        (GOOD | {"l4t": " r36.3.0"}, 'l4t " r36.3.0"'),
        (GOOD | {"l4t": "r\u0663\u0666.3.0"}, "l4t"),  # Arabic-Indic digits: not [0-9]
        # Leading zeros: not the requirements' rule (protocol.L4T_RELEASE), which the facts
        # share; the preflight prints canonical ints, so only a foreign probe prints these.
        (GOOD | {"l4t": "r36.03.0"}, 'l4t "r36.03.0": not null or a release like r36.3.0'),
        (GOOD | {"l4t": "r036.3.0"}, 'l4t "r036.3.0"'),
        (GOOD | {"l4t": "r36.3.00"}, 'l4t "r36.3.00"'),
        (GOOD | {"l4t": 36}, "l4t 36"),
        (GOOD | {"l4t_found": ""}, "l4t_found"),
        (GOOD | {"sm_found": "sm87\n(tegra234)"}, "sm_found"),
        (GOOD | {"sm_found": "x" * 1001}, "sm_found"),
        (GOOD | {"l4t_found": None}, "l4t_found null"),
        ([GOOD], "not a JSON object"),
    ]:
        with pytest.raises(ValueError, match="printed") as exc:
            parse_facts(json.dumps(bad).encode())
        assert why in str(exc.value), (bad, str(exc.value))
    with pytest.raises(ValueError, match='key "sm" appears twice'):
        parse_facts(b'{"schema": "edgepack.device-facts/v1", "l4t": null, "l4t_found": "x",'
                    b' "sm": 87, "sm": 87, "sm_found": "y"}')
    with pytest.raises(ValueError, match="NaN is not JSON"):
        parse_facts(json.dumps(GOOD).replace("87,", "NaN,").encode())


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 1e300, "30", True, 0, -1.0])
def test_a_facts_timeout_that_is_not_seconds_is_a_reason_not_a_crash(timeout: object) -> None:
    """facts_timeout_s comes from the agent's JSON configuration or --facts-timeout (float():
    "inf", "nan"). Before: inf/1e300 (OverflowError), nan (ValueError) and "30" (TypeError)
    escaped probe_facts and ended the agent's cycle with a traceback."""
    from packager.agent.engine import capture

    why = probe_facts(probe(FIXTURES / "r36.3.0"), timeout)  # type: ignore[arg-type]
    assert isinstance(why, str)
    assert why == (f"facts_timeout_s in the agent's configuration is {timeout!r}, not a number"
                   " of seconds above 0, at most 86400")
    ran = capture(("/bin/true",), timeout_s=timeout, max_stdout=1)  # type: ignore[arg-type]
    assert not ran.ok and ran.line.startswith("timeout is ")
