"""OTA publishes Jetson bundles like Pi bundles, and the release's compatibility carries the L4T
range and SM the bundle was built for (issue 12, point 6).

The bundle is a real one, ``edgepack build`` of mnist for a TEST-ONLY copy of jetson-orin-nano on
a STAND-IN base (tests/unit/ota/jetson_bundle.py says why); the repository is a real TUF
repository (packager.ota.repo), read back with python-tuf's own Metadata class.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Targets

from packager.agent import confinement
from packager.agent.protocol import CUSTOM_KEY, RELEASE_PREFIX, ReleaseInfo
from packager.bundle.manifest import MANIFEST
from packager.errors import ExitCode, VerifyError
from packager.ota.bundle import plan_release
from packager.ota.repo import Repository
from tests.cli_runner import run_cli
from tests.unit.ota.jetson_bundle import build_jetson_bundle
from tests.unit.ota.synth import make_bundle

# jetson-orin-nano: L4T r36.3.0, whose JetPack containers run on r36.0.0 up to (not incl.)
# r36.4.0 (packager.runtime.jetson_preflight.supported_l4t_range); Orin's GPU is SM 8.7.
ORIN_REQUIRES = {"l4t_min": "r36.0.0", "l4t_below": "r36.4.0", "sm": "87"}


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_jetson_bundle(tmp_path_factory.mktemp("jetson"))


def _signed_custom(repo: Repository, sequence: int) -> dict[str, Any]:
    """The release target's custom metadata as signed in the repository's newest targets.json
    (consistent snapshots: N.targets.json)."""
    newest = max(repo.metadata_dir.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    targets: Metadata[Targets] = Metadata.from_file(str(newest))
    names = [n for n in targets.signed.targets if n.startswith(RELEASE_PREFIX)]
    name = next(n for n in names if n.endswith(f"/{sequence:012d}.json"))
    custom = targets.signed.targets[name].custom
    assert isinstance(custom, dict)
    return custom


def test_a_jetson_bundle_is_published_with_its_l4t_range_and_sm(
    jetson_bundle: Path, tmp_path: Path
) -> None:
    manifest = json.loads((jetson_bundle / MANIFEST).read_text())
    assert manifest["target"]["device_class"] == "jetson"
    assert manifest["device"]["l4t"] == {"release": "r36.3.0", "min": "r36.0.0",
                                         "below": "r36.4.0"}  # fmt: skip
    repo = Repository.init(tmp_path / "repo")
    plan = repo.publish(jetson_bundle, channel="stable", percent=100)
    custom = _signed_custom(repo, plan.sequence)[CUSTOM_KEY]
    assert custom["compat"] == {
        "platform": "linux/arm64/v8",
        "device_class": "jetson",
        "requires": ORIN_REQUIRES,
    }
    # What every device reads from it (the one contract, packager.agent.protocol).
    (release,) = repo.releases()
    assert release.requires == ORIN_REQUIRES
    assert (release.platform, release.device_class) == ("linux/arm64/v8", "jetson")
    # The release document (its own signed target) says the same.
    document = json.loads(plan.document)
    assert document["compat"]["requires"] == ORIN_REQUIRES
    # Halting re-signs the target: the requirements stay.
    repo.set_release("stable", plan.sequence, halted=True)
    assert _signed_custom(repo, plan.sequence)[CUSTOM_KEY]["compat"]["requires"] == ORIN_REQUIRES


def test_a_linux_release_carries_no_requirements(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "linux").path
    repo = Repository.init(tmp_path / "repo")
    plan = repo.publish(bundle)
    compat = _signed_custom(repo, plan.sequence)[CUSTOM_KEY]["compat"]
    assert compat == {"platform": "linux/amd64", "device_class": "linux-container"}
    assert plan.requires == ()
    assert repo.releases()[0].requires == {}


def _tampered(bundle: Path, tmp_path: Path, change: Any) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    document = json.loads((copy / MANIFEST).read_text())
    change(document["device"])
    (copy / MANIFEST).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("sm"), "device.sm: is required"),
        (lambda d: d["l4t"].pop("below"), "device.l4t.below: is required"),
        (lambda d: d.update(sm=True), "device.sm: must be an integer"),
        (lambda d: d.update(sm=7), "device.sm: must be at least 10"),
        (lambda d: d["l4t"].update(min="r36.0.0; reboot"), "device.l4t.min: must match"),
        (lambda d: d["l4t"].update(min="r36.4.0"), "is not in min r36.4.0 .. below r36.4.0"),
    ],
    ids=["no-sm", "no-l4t-below", "bool-sm", "sm-7", "l4t-injection", "empty-range"],
)
def test_a_jetson_manifest_whose_requirements_are_missing_or_bad_is_not_published(
    jetson_bundle: Path, tmp_path: Path, change: Any, message: str
) -> None:
    bundle = _tampered(jetson_bundle, tmp_path, change)
    with pytest.raises(VerifyError) as raised:
        plan_release(bundle, sequence=1, channel="stable", percent=100)
    assert raised.value.exit_code == ExitCode.VERIFY
    assert str(bundle / MANIFEST) in str(raised.value)
    assert message in str(raised.value)


def test_release_info_keeps_unknown_keys_for_the_agent_to_judge_and_drops_malformed_ones() -> None:
    def custom(requires: object) -> dict[str, Any]:
        compat = {"platform": "linux/arm64", "device_class": "jetson", "requires": requires}
        return {CUSTOM_KEY: {"kind": "release", "channel": "stable", "sequence": 1,
                             "name": "mnist", "version": "1.0.0", "compat": compat,
                             "percent": 100, "halted": False}}  # fmt: skip

    known = ReleaseInfo.from_custom("t", custom(ORIN_REQUIRES))
    assert known is not None and known.requires == ORIN_REQUIRES
    # A newer publisher's key: kept, so the agent can say why it skips the release.
    newer = ReleaseInfo.from_custom("t", custom({**ORIN_REQUIRES, "npu_cores": "2"}))
    assert newer is not None and newer.requires["npu_cores"] == "2"
    for bad in ([], {"SM": "87"}, {"sm": 87}, {"sm": "8\n7"}, {f"k{i}": "1" for i in range(17)},
                {"sm": "x" * 65}):
        assert ReleaseInfo.from_custom("t", custom(bad)) is None, bad


# --- the GPU confinement the release's devices start it with ------------------------------------


ENGINES_RO = "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:ro"
# Written out by hand (not computed by the code under test): each engine's GPU access.
DEVICE = {
    "docker": ["--runtime=nvidia", "--group-add=video", ENGINES_RO],
    "podman": ["--device=nvidia.com/gpu=all", "--group-add=video", ENGINES_RO],
}


def test_the_jetson_bundle_starts_with_the_gpu_flags_everywhere(jetson_bundle: Path) -> None:
    """confinement.json (the OTA agent), supervise.py (the unit) and install-container.sh
    --no-systemd carry one list: the floor, the limits, and exactly the NVIDIA flags as the
    engine gives them (docker: the NVIDIA runtime; podman: CDI), by the engine's file name.
    (The supervisor and install-container.sh are RUN with stand-in engines in
    tests/unit/backends/jetson/test_install.py.)"""
    document = json.loads((jetson_bundle / confinement.FILE).read_text())
    assert document["schema"] == "edgepack.confinement/v2"
    assert document["device_args"] == DEVICE
    shared = confinement.detached_args(jetson_bundle)[:-1]
    for engine, device in DEVICE.items():
        expected = confinement.detached_args(jetson_bundle, f"/usr/bin/{engine}")
        assert expected == (*shared, *device, "--restart=unless-stopped")

    supervise = (jetson_bundle / "supervise.py").read_text()
    assignments = [n for n in ast.parse(supervise).body if isinstance(n, ast.Assign)]
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=assignments, type_ignores=[]), "supervise.py", "exec"), namespace)
    supervised = namespace["RUN_ARGS"]
    assert isinstance(supervised, list)
    assert [a for a in supervised if a.startswith("--") and a in shared] == list(shared)
    assert namespace["DEVICE_ARGS"] == DEVICE

    install = (jetson_bundle / "install-container.sh").read_text()
    for engine, device in DEVICE.items():
        assert f"    {engine}) DEVICE_ARGS={shlex.quote(' '.join(device))} ;;" in install
    lines = install.splitlines()
    start = next(i for i, line in enumerate(lines) if '"$ENGINE" run -d' in line)
    command = " ".join(line.rstrip("\\") for line in lines[start : start + 6])
    words = shlex.split(command.split("||")[0])
    assert [w for w in words if w.startswith("--") and w in shared] == list(shared)
    assert "$DEVICE_ARGS" in words
    # The engines directory the bind needs exists on either install path.
    install = (jetson_bundle / "install.sh").read_text()
    assert 'mkdir -p "$ROOT/var/lib/edgepack/engines"' in install


@pytest.mark.parametrize(
    "flag",
    [
        "--runtime=runc",
        "--privileged",
        "--volume=/:/host",
        "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines",
        "--volume=/var/lib/edgepack/engines:/var/lib/edgepack/engines:rw",
        "--volume=/var/lib/edgepack:/var/lib/edgepack:ro",
        "--group-add=root",
        "--device=/dev/nvhost-ctrl",
        "--runtime=nvidia --privileged",
    ],
)
@pytest.mark.parametrize("where", ["run_args", "docker", "podman"])
def test_verify_refuses_any_other_device_flag(
    jetson_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, where: str
) -> None:
    bundle = Path(shutil.copytree(jetson_bundle, tmp_path / "bundle"))
    assert run_cli(["verify", str(bundle)], capsys)[0] == 0
    path = bundle / confinement.FILE
    document = json.loads(path.read_text())
    listed = document["run_args"] if where == "run_args" else document["device_args"][where]
    listed.append(flag)
    path.write_text(json.dumps(document))
    code, out, err = run_cli(["verify", str(bundle), "--json"], capsys)
    assert code == ExitCode.VERIFY, (out, err)
    assert repr(flag) in out + err
    with pytest.raises(VerifyError):
        plan_release(bundle, sequence=1, channel="stable", percent=100)


@pytest.mark.parametrize(("engine", "other"), [("podman", "docker"), ("docker", "podman")])
def test_verify_refuses_an_engine_given_the_other_engines_gpu_flag(
    jetson_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: str,
    other: str,
) -> None:
    bundle = Path(shutil.copytree(jetson_bundle, tmp_path / "bundle"))
    path = bundle / confinement.FILE
    document = json.loads(path.read_text())
    document["device_args"][engine] = DEVICE[other]
    path.write_text(json.dumps(document))
    code, out, err = run_cli(["verify", str(bundle), "--json"], capsys)
    assert code == ExitCode.VERIFY, (out, err)
    assert f"device_args.{engine}: {DEVICE[other][0]!r} is {other}'s GPU flag" in out + err
    with pytest.raises(VerifyError):
        plan_release(bundle, sequence=1, channel="stable", percent=100)


def test_release_plans_compare_their_requirements(jetson_bundle: Path) -> None:
    plan = plan_release(jetson_bundle, sequence=1, channel="stable", percent=100)
    assert dict(plan.requires) == ORIN_REQUIRES
    assert plan.custom[CUSTOM_KEY]["compat"]["requires"] == ORIN_REQUIRES
    other = dataclasses.replace(plan, requires=(("sm", "72"),))
    assert other.custom[CUSTOM_KEY]["compat"]["requires"] == {"sm": "72"}


@pytest.mark.parametrize(
    ("target", "gpu"), [("jetson-orin-nano", True), ("jetson-nano", False)]
)
def test_the_ota_agent_a_jetson_bundle_installs_asks_for_jetson_releases(
    tmp_path: Path, target: str, gpu: bool
) -> None:
    """install-container.sh writes the agent's configuration with this bundle's device class and
    platform (the release's compat), and its --no-systemd start uses the confinement with the
    GPU flags exactly when the bundle serves on the GPU (JetPack 4's fallback does not)."""
    from packager.agent.__main__ import _parser, config_from
    from packager.backends.base import BuildRequest
    from packager.backends.jetson.backend import JetsonBackend
    from packager.image.spec import ImageResult
    from packager.models import inspect_model
    from packager.render import render
    from packager.targets import load_target_file, resolve_target
    from tests.jetson_standin import stand_in_base, target_copy
    from tests.unit.ota.jetson_bundle import MNIST

    # The GPU path: the test-only copy (CPython 3.11); JetPack 4: the shipped target (3.6).
    loaded = load_target_file(target_copy(target, tmp_path / "targets")) if gpu \
        else resolve_target(target)
    (tmp_path / "root.json").write_text("{}")
    request = BuildRequest(model=MNIST, target=str(loaded.source), version="1.0.0",
                           base=None, ota_repo="https://updates.example.com/edgepack/",
                           ota_root=tmp_path / "root.json")  # fmt: skip
    backend = JetsonBackend()
    model = inspect_model(MNIST)
    if gpu:  # the test-only copy's base is unpinned: --base, as the bundle builds above
        base = stand_in_base(tmp_path / "base.tar")
        request = dataclasses.replace(request, base=f"oci-archive:{base}")
    plan = backend.plan(request, model, loaded, backend.fit(request, model, loaded))
    image = ImageResult(archive=tmp_path / "image.tar", manifest_digest="sha256:" + "1" * 64,
                        config_digest="sha256:" + "2" * 64, size_bytes=1, layers=(),
                        ref_name="edgepack/mnist:1.0.0")  # fmt: skip
    context = backend.context(plan, image)
    device_flags = {flag for flags in DEVICE.values() for flag in flags}
    assert not device_flags & set(context["confinement_args"])
    assert context["device_access"] == (DEVICE if gpu else {})
    script = render("linux/install.sh.jinja", context)
    body = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    # The preflight the agent runs for the device's facts: in the bundle (with or without an
    # engine build), installed by install.sh, named in the agent's configuration.
    preflight = f"/opt/edgepack/{context['name']}/jetson_preflight.py"
    assert {c.path for c in plan.copied} >= {"jetson_preflight.py"}
    assert f'FACTS_PREFLIGHT="$ROOT"{preflight}' in script.splitlines()
    installer = render("jetson/install.sh.jinja", context)
    lines = installer.splitlines()
    # Unindented: whether or not an engine unit is installed, before the agent's first run.
    installed = lines.index(f'install -m 0755 "$HERE/jetson_preflight.py" "$ROOT{preflight}"')
    started = next(i for i, line in enumerate(lines) if 'install-container.sh" --timeout' in line)
    assert installed < started
    for text in (script, installer):
        checked = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True,
                                 check=False)  # fmt: skip
        assert checked.returncode == 0, checked.stderr
    config_path = tmp_path / "ota-agent.json"
    namespace = {"__name__": "__main__"}
    argv = [str(config_path), str(tmp_path / "state"), "/usr/bin/docker", "8080", "", preflight]
    saved = sys.argv
    sys.argv = ["-", *argv]
    try:
        exec(compile(body, "install.sh:python", "exec"), namespace)
    finally:
        sys.argv = saved
    cfg = config_from(_parser().parse_args(["run", "--config", str(config_path)]))
    assert (cfg.device_class, cfg.platform) == ("jetson", "linux/arm64/v8")
    assert cfg.facts_probe == ("/usr/bin/python3", preflight, "--facts")
    # Without OTA, install-container.sh --no-systemd starts the container itself.
    plain = render("linux/install.sh.jinja", {**context, "ota": None})
    words = shlex.split(plain.split('"$ENGINE" run -d', 1)[1].split("||")[0].replace("\\\n", " "))
    assert not device_flags & set(words)
    assert ("$DEVICE_ARGS" in words) == gpu
    assert ("DEVICE_ARGS=" in plain) == gpu


def test_the_publisher_signs_only_known_requirements_with_valid_values() -> None:
    from packager.agent.protocol import check_requires

    assert check_requires(ORIN_REQUIRES) == ORIN_REQUIRES
    for bad, message in (
        ({**ORIN_REQUIRES, "npu_cores": "2"}, "requires.npu_cores: unknown requirement"),
        ({"sm": "087"}, "requires.sm: '087' is not a valid value"),
        ({"l4t_min": "r36.4.0", "l4t_below": "r36.0.0"}, "is not below l4t_below"),
        ({"l4t_min": "36.0.0"}, "requires.l4t_min: '36.0.0' is not a valid value"),
    ):
        with pytest.raises(ValueError, match=message):
            check_requires(bad)
