"""Preflight against fixture Jetson root trees (tests/data/jetson: stand-ins, no Jetson here)
and a stand-in `docker`/`podman` script; every outcome of fixture x target in targets/*.toml."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from packager.runtime import jetson_preflight as pf
from packager.runtime.engine_key import sm_from_compute_capability, tensorrt_release

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "data" / "jetson"
SCRIPT = REPO / "packager" / "runtime" / "jetson_preflight.py"
TARGETS = ("jetson-nano", "jetson-xavier-nx", "jetson-orin-nano")
RELEASES = ("r32.7.1", "r35.4.1", "r36.3.0", "r36.4.0")


def _engine(tmp_path: Path, name: str, runtimes: str = '{"nvidia":{},"runc":{}}',
            libs: str = "libnvinfer.so.8.6.2") -> Path:
    """A STAND-IN container engine: answers `info` and `run` the way preflight asks them."""
    folder = tmp_path / f"engine-{name}"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(
        "#!/bin/sh\n# stand-in for docker/podman (no daemon, no Jetson here)\n"
        f'echo "$@" >> "{folder}/calls"\n'
        f"case \"$1\" in\n  info) echo '{runtimes}' ;;\n  run) echo '{libs}' ;;\nesac\n"
    )
    path.chmod(0o755)
    return path


def _target_args(target: str) -> list[str]:
    data = tomllib.loads((REPO / "targets" / f"{target}.toml").read_text())
    low, below = pf.supported_l4t_range(data["runtime"]["l4t"])
    return [
        "--l4t-min", pf.show(low), "--l4t-below", pf.show(below),
        "--tensorrt", tensorrt_release(data["runtime"]["tensorrt"]),
        "--sm", str(sm_from_compute_capability(data["accelerator"]["compute_capability"])),
    ]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = pf.main(args)
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


# fixture -> target -> the checks that fail (each one line).
OUTCOMES = {
    "r32.7.1": {"jetson-nano": [], "jetson-xavier-nx": ["L4T release", "TensorRT", "SM"],
                "jetson-orin-nano": ["L4T release", "TensorRT", "SM"]},
    "r35.4.1": {"jetson-nano": ["L4T release", "TensorRT", "SM"], "jetson-xavier-nx": [],
                "jetson-orin-nano": ["L4T release", "TensorRT", "SM"]},
    "r36.3.0": {"jetson-nano": ["L4T release", "TensorRT", "SM"],
                "jetson-xavier-nx": ["L4T release", "TensorRT", "SM"], "jetson-orin-nano": []},
    "r36.4.0": {"jetson-nano": ["L4T release", "TensorRT", "SM"],
                "jetson-xavier-nx": ["L4T release", "TensorRT", "SM"],
                "jetson-orin-nano": ["L4T release", "TensorRT"]},
}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("target", TARGETS)
def test_fixture_against_target(release: str, target: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker")
    code, lines, out = _run(
        [*_target_args(target), "--engine", str(docker), "--root", str(FIXTURES / release)],
        capsys)
    failing = [line.split(": ")[1] for line in lines]
    assert failing == OUTCOMES[release][target], lines
    assert code == (1 if failing else 0)
    assert all(line.startswith("preflight: ") and ", found " in line for line in lines)
    assert ("preflight: ok" in out) == (not failing)


def test_r36_4_refused_for_a_target_pinned_to_tensorrt_8_6_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker")
    code, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(docker),
                           "--root", str(FIXTURES / "r36.4.0")], capsys)
    assert code == pf.EXIT_MISMATCH
    assert lines == [
        "preflight: L4T release: expected r36.x below r36.4.0, found r36.4.0",
        "preflight: TensorRT: expected 8.6.2, found 10.3.0 (shipped with L4T r36.4.0)",
    ]


def test_each_line_names_expected_and_found(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker")
    _, lines, _ = _run([*_target_args("jetson-nano"), "--engine", str(docker),
                        "--root", str(FIXTURES / "r35.4.1")], capsys)
    assert lines == [
        "preflight: L4T release: expected r32.x from r32.7.0, found r35.4.1",
        "preflight: TensorRT: expected 8.2.1, found 8.5.2 (shipped with L4T r35.4.1)",
        "preflight: SM: expected sm53, found sm72 (tegra194)",
    ]


def test_jetpack4_tensorrt_comes_from_the_hosts_package(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "r32.7.1", root)
    status = root / "var/lib/dpkg/status"
    status.write_text(status.read_text().replace("8.2.1-1+cuda10.2", "8.0.1-1+cuda10.2"))
    _, lines, _ = _run([*_target_args("jetson-nano"), "--engine", str(_engine(tmp_path, "docker")),
                        "--root", str(root)], capsys)
    assert lines == ["preflight: TensorRT: expected 8.2.1, found 8.0.1 "
                     "(host libnvinfer8 package, mounted into the container)"]


def test_docker_without_the_nvidia_runtime(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker", runtimes='{"io.containerd.runc.v2":{},"runc":{}}')
    code, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(docker),
                           "--root", str(FIXTURES / "r36.3.0")], capsys)
    assert code == 1
    assert lines == ["preflight: container runtime: expected the nvidia runtime in docker info, "
                     "found io.containerd.runc.v2, runc (install nvidia-container-runtime)"]


def test_podman_needs_a_cdi_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    podman = _engine(tmp_path, "podman")
    code, _, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(podman),
                       "--root", str(FIXTURES / "r36.3.0")], capsys)
    assert code == 0
    code, lines, _ = _run([*_target_args("jetson-xavier-nx"), "--engine", str(podman),
                           "--root", str(FIXTURES / "r35.4.1")], capsys)
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(
        "preflight: container runtime: expected a CDI spec for nvidia.com/gpu")


def test_missing_or_foreign_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(tmp_path / "docker"),
                        "--root", str(FIXTURES / "r36.3.0")], capsys)
    assert lines == [f"preflight: container runtime: expected docker at {tmp_path / 'docker'}, "
                     "found no executable there"]
    _, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", "/bin/sh",
                        "--root", str(FIXTURES / "r36.3.0")], capsys)
    assert lines == ["preflight: container runtime: expected docker or podman, found '/bin/sh'"]


@pytest.mark.parametrize(("libs", "line"), [
    ("libnvinfer.so.8.6.2", None),
    ("libnvinfer.so.10.3.0", "preflight: TensorRT in the container: expected 8.6.2, found 10.3.0 "
                             "(libnvinfer.so.10.3.0 in edgepack/x:1)"),
    ("libcudart.so.12", "preflight: TensorRT in the container: expected 8.6.2, found none "
                        "(no libnvinfer.so.X.Y.Z in edgepack/x:1)"),
])
def test_container_tensorrt_probe(libs: str, line: str | None, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker", libs=libs)
    _, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(docker),
                        "--image", "edgepack/x:1", "--root", str(FIXTURES / "r36.3.0")], capsys)
    assert lines == ([] if line is None else [line])
    calls = (docker.parent / "calls").read_text().splitlines()
    assert calls[-1].startswith("run --rm --network none --runtime nvidia --entrypoint /bin/sh "
                                "edgepack/x:1 -c ls ")


def test_free_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker")
    _, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(docker),
                        "--min-free-mib", "999999999", "--root", str(FIXTURES / "r36.3.0")],
                       capsys)
    assert len(lines) == 1
    assert lines[0].startswith("preflight: free disk: expected 999999999 MiB free under ")
    assert lines[0].endswith(" MiB") and "var/lib/edgepack/engines, found " in lines[0]


def test_not_a_jetson(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docker = _engine(tmp_path, "docker")
    _, lines, _ = _run([*_target_args("jetson-orin-nano"), "--engine", str(docker),
                        "--root", str(tmp_path / "empty")], capsys)
    assert lines == [
        "preflight: L4T release: expected r36.x below r36.4.0, found no "
        "/etc/nv_tegra_release (not a Jetson, or L4T not installed)",
        "preflight: SM: expected sm87, found no Tegra SoC (no nvidia,tegra* in "
        "/proc/device-tree/compatible, no tegra_chip_id)",
    ]


def test_a_fifo_as_nv_tegra_release_does_not_block(tmp_path: Path) -> None:
    """Before: open() of a FIFO waited for a writer forever (the boot's preflight hung)."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "r36.3.0", root)
    (root / "etc" / "nv_tegra_release").unlink()
    os.mkfifo(root / "etc" / "nv_tegra_release")
    script = (f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import jetson_preflight "
              f"as pf; print(pf.read_l4t({str(root)!r}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no /etc/nv_tegra_release" in proc.stdout


def test_hostile_nv_tegra_release_contents_are_one_ascii_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    release = root / "etc" / "nv_tegra_release"
    for content in (b"", b"\xff\xfe\x00\x1b[31m binary", b"# R36 (release)\n",
                    b"\n# R36 (release), REVISION: 3.0\n", b"x" * (pf.MAX_READ * 3)):
        release.write_bytes(content)
        found, text = pf.read_l4t(str(root))
        assert found is None and text.startswith("an unreadable /etc/nv_tegra_release (")
        assert text.isascii() and text.isprintable() and len(text) < 200


def test_a_relative_root_that_does_not_exist_is_measured_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the walk up from a relative path ended at "" and disk_usage("") raised."""
    monkeypatch.chdir(tmp_path)
    free, measured = pf.free_mib("no-such-root", pf.ENGINES_DIR)
    assert free > 0 and measured == str(tmp_path)


def test_sm_falls_back_to_the_tegra_chip_id(tmp_path: Path) -> None:
    fuse = tmp_path / "sys/module/tegra_fuse/parameters"
    fuse.mkdir(parents=True)
    (fuse / "tegra_chip_id").write_text("25\n")
    assert pf.read_sm(str(tmp_path)) == (72, "sm72 (tegra194, chip id 25)")
    (fuse / "tegra_chip_id").write_text("99\n")
    assert pf.read_sm(str(tmp_path)) == (None, "an unknown Tegra chip id '99'")


def test_l4t_parsing_and_ranges() -> None:
    assert pf.read_l4t(str(FIXTURES / "r32.7.1")) == ((32, 7, 1), "r32.7.1")
    assert pf.read_l4t(str(FIXTURES / "r36.4.0")) == ((36, 4, 0), "r36.4.0")
    assert pf.supported_l4t_range("r32.7.1") == ((32, 7, 0), (33, 0, 0))
    assert pf.supported_l4t_range("r35.4.1") == ((35, 0, 0), (36, 0, 0))
    assert pf.supported_l4t_range("r36.3.0") == ((36, 0, 0), (36, 4, 0))
    assert pf.supported_l4t_range("r36.4.0") == ((36, 4, 0), (37, 0, 0))
    assert pf.supported_l4t_range("r32.6.1") == ((32, 6, 1), (32, 6, 2))
    with pytest.raises(ValueError, match="not a release"):
        pf.parse_version("r36.3.0\n;")


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        pf.main(["--l4t-min", "r36", "--l4t-below", "r37.0.0", "--tensorrt", "8.6.2",
                 "--sm", "87", "--engine", "docker"])
    assert exc.value.code == pf.EXIT_USAGE
    code = pf.main(["--l4t-min", "r36.4.0", "--l4t-below", "r36.0.0", "--tensorrt", "8.6.2",
                    "--sm", "87", "--engine", "docker"])
    assert code == pf.EXIT_USAGE


def test_runs_standalone_as_a_script_and_keeps_to_python_3_6(tmp_path: Path) -> None:
    """JetPack 4 hosts have Python 3.6: the file must parse with its grammar, import nothing
    from edgepack, and run by path in isolated mode."""
    source = SCRIPT.read_text()
    tree = ast.parse(source, feature_version=(3, 6))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"argparse", "json", "os", "re", "shutil", "stat", "subprocess", "sys"}
    docker = _engine(tmp_path, "docker")
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", str(SCRIPT), *_target_args("jetson-orin-nano"),
         "--engine", str(docker), "--root", str(FIXTURES / "r36.4.0")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "TensorRT: expected 8.6.2, found 10.3.0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(json.dumps(proc.stdout)) == ""


@pytest.mark.parametrize("release", RELEASES)
def test_facts_mode_prints_what_the_readers_read(release: str) -> None:
    """``--facts``: one JSON object on stdout, exit 0, by path with the host's python3 in
    isolated mode (as the OTA agent runs the bundle's copy); the readers' own answers."""
    root = str(FIXTURES / release)
    proc = subprocess.run(["/usr/bin/python3", "-I", str(SCRIPT), "--facts", "--root", root],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.count("\n") == 1 and proc.stdout.isascii()
    l4t, l4t_found = pf.read_l4t(root)
    sm, sm_found = pf.read_sm(root)
    assert json.loads(proc.stdout) == {
        "schema": "edgepack.device-facts/v1", "l4t": release, "l4t_found": l4t_found,
        "sm": sm, "sm_found": sm_found,
    }  # fmt: skip
    assert l4t is not None and pf.show(l4t) == release


def test_facts_mode_on_a_device_that_is_not_a_jetson(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, out = _run(["--facts", "--root", str(tmp_path / "empty")], capsys)
    assert (code, err) == (pf.EXIT_OK, [])
    assert json.loads(out) == {
        "schema": pf.FACTS_SCHEMA, "l4t": None,
        "l4t_found": "no /etc/nv_tegra_release (not a Jetson, or L4T not installed)",
        "sm": None,
        "sm_found": "no Tegra SoC (no nvidia,tegra* in /proc/device-tree/compatible, no "
                    "tegra_chip_id)",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--facts", "--sm", "87"], "--facts takes only --root, not --sm"),
     (["--facts", "--engine", "docker", "--image", ""],
      "--facts takes only --root, not --engine, --image"),
     (["--sm", "87", "--engine", "docker"],
      "the following arguments are required: --l4t-min, --l4t-below, --tensorrt"),
     ([], "the following arguments are required: --l4t-min, --l4t-below, --tensorrt, --sm,"
      " --engine")],
)  # fmt: skip
def test_check_options_are_required_without_facts_and_refused_with_it(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        pf.main(argv)
    assert exc.value.code == pf.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"jetson_preflight.py: error: {message}"
