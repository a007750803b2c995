"""Golden trtexec command lines: TensorRT 8.2 / 8.5 / 8.6 / 10.x x fp16 / int8 (Q/DQ) / fp32
x DLA off / on (flags from trtexec's help in NVIDIA/TensorRT samples/common/sampleOptions.cpp)."""

from __future__ import annotations

import pytest

from packager.runtime.engine_key import EngineKey, EngineKeyError
from packager.runtime.trtexec import (
    UnsupportedTensorRT,
    build_command,
    form,
    version_from_output,
)

SHA = "cd" * 32
HEAD = ["/usr/src/tensorrt/bin/trtexec", "--onnx=/m/model.onnx", "--saveEngine=/e/p.plan"]
CACHE = "--timingCacheFile=/e/t.cache"

# (tensorrt, precision, dla_core) -> everything after HEAD, as trtexec's help spells it;
# {C} is the timing-cache flag, {DLA0}/{DLA1} `--useDLACore=N --allowGPUFallback`.
_GOLDEN_LINES: dict[tuple[str, str, int | None], str] = {
    ("8.2.1", "fp16", None): "--workspace=1024 {C} --fp16 --buildOnly",
    ("8.2.1", "int8", None): "--workspace=1024 {C} --int8 --fp16 --buildOnly",
    ("8.2.1", "fp32", None): "--workspace=1024 {C} --buildOnly",
    ("8.2.1", "fp16", 0): "--workspace=1024 {C} --fp16 {DLA0} --buildOnly",
    ("8.2.1", "int8", 1): "--workspace=1024 {C} --int8 --fp16 {DLA1} --buildOnly",
    ("8.5.2", "fp16", None): "--memPoolSize=workspace:1024 {C} --fp16 --buildOnly",
    ("8.5.2", "int8", None): "--memPoolSize=workspace:1024 {C} --int8 --fp16 --buildOnly",
    ("8.5.2", "fp32", None): "--memPoolSize=workspace:1024 {C} --buildOnly",
    ("8.5.2", "fp16", 0): "--memPoolSize=workspace:1024 {C} --fp16 {DLA0} --buildOnly",
    ("8.5.2", "int8", 1): "--memPoolSize=workspace:1024 {C} --int8 --fp16 {DLA1} --buildOnly",
    ("8.6.2", "fp16", None): "--memPoolSize=workspace:1024 {C} --fp16 --skipInference",
    ("8.6.2", "int8", None): "--memPoolSize=workspace:1024 {C} --int8 --fp16 --skipInference",
    ("8.6.2", "fp32", None): "--memPoolSize=workspace:1024 {C} --skipInference",
    ("8.6.2", "fp16", 0): "--memPoolSize=workspace:1024 {C} --fp16 {DLA0} --skipInference",
    ("8.6.2", "int8", 1): "--memPoolSize=workspace:1024 {C} --int8 --fp16 {DLA1} --skipInference",
    ("10.3.0", "fp16", None): "--memPoolSize=workspace:1024M {C} --fp16 --skipInference",
    ("10.3.0", "int8", None): "--memPoolSize=workspace:1024M {C} --stronglyTyped --skipInference",
    ("10.3.0", "fp32", None): "--memPoolSize=workspace:1024M {C} --skipInference",
    ("10.3.0", "fp16", 0): "--memPoolSize=workspace:1024M {C} --fp16 {DLA0} --skipInference",
    ("10.3.0", "int8", 1): "--memPoolSize=workspace:1024M {C} --int8 --fp16 {DLA1} --skipInference",
}
_DLA = {f"DLA{n}": f"--useDLACore={n} --allowGPUFallback" for n in (0, 1)}
GOLDEN = {case: line.format(C=CACHE, **_DLA).split() for case, line in _GOLDEN_LINES.items()}


def _key(tensorrt: str, precision: str, dla: int | None) -> EngineKey:
    return EngineKey(
        model_sha256=SHA,
        tensorrt=tensorrt,
        sm=87,
        precision=precision,
        dla_core=dla,
        workspace_mib=1024,
    )


@pytest.mark.parametrize(("case", "tail"), list(GOLDEN.items()), ids=lambda v: str(v))
def test_golden_command_lines(case: tuple[str, str, int | None], tail: list[str]) -> None:
    argv = build_command(
        _key(*case), onnx="/m/model.onnx", plan="/e/p.plan", timing_cache="/e/t.cache"
    )
    assert argv == HEAD + tail


def test_the_matrix_covers_every_release_precision_and_dla_setting() -> None:
    releases = {case[0] for case in GOLDEN}
    assert releases == {"8.2.1", "8.5.2", "8.6.2", "10.3.0"}
    for release in releases:
        assert {(p, d is not None) for (r, p, d) in GOLDEN if r == release} == {
            ("fp16", False),
            ("int8", False),
            ("fp32", False),
            ("fp16", True),
            ("int8", True),
        }


def test_no_release_gets_a_flag_its_trtexec_lacks() -> None:
    for (release, _p, _d), tail in GOLDEN.items():
        if release.startswith("10."):
            assert not any(a.startswith(("--workspace", "--buildOnly")) for a in tail)
        if release.startswith(("8.2", "8.5")):
            assert "--skipInference" not in tail and "--stronglyTyped" not in tail
        if release.startswith("8.2"):
            assert not any(a.startswith("--memPoolSize") for a in tail)


def test_fp32_on_dla_is_refused_before_any_command_line() -> None:
    with pytest.raises(EngineKeyError, match="DLA runs fp16 or int8 only"):
        _key("8.6.2", "fp32", 0)


def test_paths_stay_single_arguments_and_custom_trtexec() -> None:
    argv = build_command(
        _key("8.6.2", "fp16", None),
        onnx="/m/a b;rm -rf.onnx",
        plan="/e/x y.plan",
        timing_cache="/e/c",
        trtexec="/opt/trtexec",
    )
    assert argv[:3] == ["/opt/trtexec", "--onnx=/m/a b;rm -rf.onnx", "--saveEngine=/e/x y.plan"]


@pytest.mark.parametrize("release", ["7.1.3", "8.0.1", "9.3.0", "11.0.0"])
def test_unknown_releases_are_refused(release: str) -> None:
    with pytest.raises(UnsupportedTensorRT, match=f"tensorrt: {release} has no known trtexec"):
        form(release)


def test_forms_per_release() -> None:
    assert [form(v) for v in ("8.2.1", "8.4.1", "8.5.2", "8.6.2", "10.0.1", "10.7.0")] == [
        "8.2",
        "8.5",
        "8.5",
        "8.6",
        "10",
        "10",
    ]


@pytest.mark.parametrize(
    ("line", "version"),
    [
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v8201] # trtexec --onnx=a", "8.2.1"),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # /usr/src/tensorrt/bin/trtexec", "8.5.2"),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v8602] # trtexec", "8.6.2"),
        ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec", "10.3.0"),
        ("[09/13/2024-04:36:44] [I] TensorRT version: 10.3.0", "10.3.0"),
        ("[I] [TRT] Loaded engine size: 12 MiB", None),
    ],
)
def test_version_from_trtexec_output(line: str, version: str | None) -> None:
    assert version_from_output(line) == version
