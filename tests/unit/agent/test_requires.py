"""The agent installs a release only on a device that meets its ``compat.requires`` (issue 12
point 6): a Jetson release's L4T range and SM, read from the device's own
``/etc/nv_tegra_release`` and device tree (packager/agent/device.py), here from the fixture trees
in tests/data/jetson (``sysroot``). A release the device does not meet, or whose requirement the
agent does not know, is skipped with one reason line in the report and never downloaded.

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
from packager.agent.device import read_facts
from packager.ota.repo import Repository
from tests.ports import free_port_in
from tests.unit.agent.helpers import REPO_ROOT, assert_complete, reports, static_mirror
from tests.unit.ota.jetson_bundle import build_jetson_bundle

FIXTURES = Path(__file__).resolve().parents[2] / "data" / "jetson"
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

    def config(self, sysroot: Path = FIXTURES / "r36.3.0") -> AgentConfig:
        """The agent's configuration on this device, which reads its facts under ``sysroot``
        (default: an Orin on r36.3.0, the bundle's own device)."""
        return AgentConfig(
            root=self.root, repo_url=self.mirror, device_id="jetson-0001", platform=PLATFORM,
            device_class="jetson", engine=str(self.engine), port=self.port,
            ready_timeout_s=10.0, trial_s=0.3, poll_s=0.1, http_timeout_s=10.0,
            sysroot=sysroot,
        )  # fmt: skip

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
    # The release's confinement.json: the floor, the limits and exactly the NVIDIA flags.
    assert run[run.index("-p") + 2 : run.index("--")] == list(
        confinement.detached_args(jetson.root / "releases" / "1")
    )
    for flag in confinement.NVIDIA_JETSON:
        assert run.count(flag) == 1
    assert [r["outcome"] for r in reports(jetson.root)] == ["committed"]


CASES = {
    "r32.7.1": f"{ORIN_RANGE}, found r32.7.1; sm87 required, found sm53 (tegra210)",
    "r35.4.1": f"{ORIN_RANGE}, found r35.4.1; sm87 required, found sm72 (tegra194)",
    "r36.4.0": f"{ORIN_RANGE}, found r36.4.0",
    "r36.3.0-on-a-xavier": "sm87 required, found sm72 (tegra194)",
    "not-a-jetson": f"{ORIN_RANGE}, found no /etc/nv_tegra_release; sm87 required, found no"
    " Tegra SoC in /proc/device-tree/compatible or tegra_chip_id",
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


def test_the_cli_reads_the_device_under_sysroot(
    jetson_bundle: Path, repo: Repository, jetson: Jetson
) -> None:
    repo.publish(jetson_bundle)
    argv = [
        sys.executable, "-m", "packager.agent", "run", "--root", str(jetson.root),
        "--repo", jetson.mirror, "--device-id", "jetson-0002", "--platform", PLATFORM,
        "--device-class", "jetson", "--sysroot", str(FIXTURES / "r36.4.0"),
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
def test_the_agent_reads_each_fixture_device_as_the_preflight_does(
    name: str, l4t: tuple[int, int, int], sm: int
) -> None:
    from packager.runtime import jetson_preflight

    facts = read_facts(FIXTURES / name)
    assert (facts.l4t, facts.sm) == (l4t, sm)
    # One rule on both sides: the agent's own reader (it may not import packager.runtime)
    # agrees with the first-boot preflight's.
    assert facts.l4t == jetson_preflight.read_l4t(str(FIXTURES / name))[0]
    assert facts.sm == jetson_preflight.read_sm(str(FIXTURES / name))[0]


def test_device_reads_are_bounded_and_never_raise(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # A huge release file whose first line is valid: only the first MAX_READ bytes are read.
    (root / "etc" / "nv_tegra_release").write_bytes(
        b"# R36 (release), REVISION: 3.0, GCID: 1\n" + b"x" * (8 << 20))
    (root / "proc" / "device-tree").mkdir(parents=True)
    (root / "proc" / "device-tree" / "compatible").mkdir()  # a directory, not a file
    facts = read_facts(root)
    assert facts.l4t == (36, 3, 0)
    assert facts.sm is None
    (root / "etc" / "nv_tegra_release").write_text("R36 3.0\n")
    assert read_facts(root).l4t_found.startswith("an unreadable /etc/nv_tegra_release")
