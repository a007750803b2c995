"""Every bundle template, rendered with the worst values validation allows, parses as what it is.

The real parsers judge: `sh -n` (dash) and `bash -n` for install.sh, `systemd-analyze verify` for
the units (both the docker and the podman form install.sh writes), `python -m py_compile` and the
`ast` module for supervise.py, the host C/C++ compiler for the MCU sources that compile on their
own. And no rendered file holds a line its template does not own: its structure (line count,
unit sections and keys, Python syntax tree, shell line shapes) equals a render with plain values.

The escaping holds without validation too: rendered with hostile values straight in the context
(as if a check were missed), every code template either keeps its structure with the value intact
or refuses the value (UnsafeValue); none gains a line.

`systemd-analyze security --offline=true` measures the exposure of both units, per engine: the
README's "Security model" quotes these numbers (before this test: 8.3 runtime, 9.0 agent).
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from packager.backends.base import BuildRequest
from packager.backends.linux.backend import LinuxContainerBackend, template_context
from packager.backends.linux.fit import linux_fit
from packager.backends.mcu.backend import McuBackend
from packager.image.spec import ImageResult, ImageSpec
from packager.models import inspect_model
from packager.render import UnsafeValue, render
from packager.resources import templates_dir
from packager.targets import INT_MAX, NAME_FORM, TEXT_FORM, TOKEN_FORM, VERSION_FORM, parse_target

pytestmark = [pytest.mark.integration]

TFLM = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "tflm"

# The worst values each form allows: every punctuation character it takes, at its longest.
# Every separator the OCI repository grammar allows ('.', '_', '__', runs of '-'), 62 characters.
WORST_NAME = "0" + ".z_9__z---0" * 5 + ".z_9_z"
WORST_VERSION = "_" + "._-" * 15 + "Z"
WORST_TEXT = "0 .,()/+_- (a)/b+c,d.e_f-g  " * 7
WORST_TOKEN = "0" + "._+/-" * 12 + "z"
WORST_REPO = "https://[::1]:65535/~+-._/a/"
WORST_CHANNEL = "0" + "._-" * 20 + "z"
PLAIN = {"name": "mnist", "version": "1.0.0", "text": "Raspberry Pi 4", "token": "cortex-a72",
         "repo": "http://127.0.0.1:8000/repo/", "channel": "stable"}
WORST = {"name": WORST_NAME, "version": WORST_VERSION, "text": WORST_TEXT, "token": WORST_TOKEN,
         "repo": WORST_REPO, "channel": WORST_CHANNEL}

# (security exposure) measured with systemd 252 for the units as install.sh writes them.
EXPOSURE_LIMITS = {
    ("runtime", "podman"): 5.8,
    ("runtime", "docker"): 1.5,
    ("agent", "podman"): 5.8,
    ("agent", "docker"): 1.7,
}


def test_the_worst_values_are_allowed() -> None:
    assert NAME_FORM.matches(WORST_NAME) and len(WORST_NAME) == 62
    assert VERSION_FORM.matches(WORST_VERSION)
    assert TEXT_FORM.matches(WORST_TEXT[:200])
    assert TOKEN_FORM.matches(WORST_TOKEN)


def _linux_target(values: dict[str, str], worst_ints: bool) -> Any:
    big = INT_MAX if worst_ints else None
    return parse_target(
        {
            "name": values["name"],
            "description": values["text"][:200],
            "vendor": values["text"][:200],
            "device_class": "linux-container",
            "platform": {"arch": "arm64", "variant": "v99" if worst_ints else "v8"},
            "cpu": {"cores": 4, "model": values["token"], "isa": [values["token"]]},
            "memory": {"ram_mb": 4096, "reserved_mb": 512},
            "storage": {"kind": "sd", "size_mb": 32768},
            "accelerator": {"name": values["text"][:200]},
            "runtime": {"port": 65535 if worst_ints else 8080},
            "service": {
                "memory_max_mb": 1024 * 1024 if worst_ints else 2048,
                "cpu_quota_percent": 256 * 100 if worst_ints else 350,
                "restart_sec": big or 5,
                "watchdog_sec": big or 30,
            },
        },
        "t.toml",
    )


def _linux_context(onnx_dir: Path, tmp_path: Path, values: dict[str, str],
                   worst_ints: bool) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    root = tmp_path / "root.json"
    root.write_text("{}")
    model = onnx_dir / "mnist.onnx"
    request = BuildRequest(model=model, target="t.toml", name=values["name"],
                           version=values["version"], ota_repo=values["repo"], ota_root=root,
                           ota_channel=values["channel"])
    info = inspect_model(model)
    loaded = _linux_target(values, worst_ints)
    plan = LinuxContainerBackend().plan(request, info, loaded, linux_fit(info, loaded))
    spec = plan.payload
    assert isinstance(spec, ImageSpec)
    image = ImageResult(archive=tmp_path / "image.tar", manifest_digest="sha256:" + "a" * 64,
                        config_digest="sha256:" + "b" * 64, size_bytes=1, layers=(),
                        ref_name=spec.ref_name)
    context = template_context(plan, image)
    return context, [(f.path, f.template) for f in plan.rendered]


def _render_all(context: dict[str, Any], files: list[tuple[str, str]]) -> dict[str, str]:
    return {Path(path).name: render(template, context) for path, template in files}


def _unit_structure(text: str) -> list[str]:
    """Sections and keys, in order: what systemd would act on."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        keys.append(line if line.startswith("[") else line.partition("=")[0])
    return keys


def _python_structure(text: str) -> str:
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            node.value = None
    return ast.dump(tree)


def _shell_shape(text: str) -> list[str]:
    """The script's tokens as POSIX shell quoting splits them, each word as 'w' (comments gone).

    A value that lands as one quoted word is one 'w' whatever it holds; a value that breaks out
    of its quotes or adds a command adds tokens or operators.
    """
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.wordchars += ":+@%,[]{}^!=$*?~#/.-"
    shape = [tok if tok and all(ch in "();<>|&" for ch in tok) else "w" for tok in lexer]
    return [*shape, f"substitutions={_substitutions(text)}"]


def _substitutions(text: str) -> int:
    """Command substitutions the shell would run: outside comments, quoted heredocs and
    single quotes (a double-quoted "$(...)" is one word to shlex but still runs)."""
    text = re.sub(r"(?ms)<<'(\w+)'\n.*?^\1$", "", text)
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    count, quoted, i = 0, False, 0
    while i < len(code):
        ch = code[i]
        if quoted:
            quoted = ch != "'"
        elif ch == "'" and not _in_double_quotes(code, i):
            quoted = True
        elif ch == "\\":
            i += 1  # an escaped character is literal
        elif ch == "`" or code.startswith("$(", i):
            count += 1
        i += 1
    return count


def _in_double_quotes(code: str, index: int) -> bool:
    """Whether position ``index`` of a line lies inside "..." (a ' there is literal)."""
    start = code.rfind("\n", 0, index) + 1
    inside, quoted, i = False, False, start
    while i < index:
        ch = code[i]
        if quoted:
            quoted = ch != "'"
        elif ch == "\\":
            i += 1
        elif ch == '"':
            inside = not inside
        elif ch == "'" and not inside:
            quoted = True
        i += 1
    return inside


def _line_shape(text: str) -> list[str]:
    """Per line: a comment, or the line with every run of word characters as one 'w'."""
    shapes = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            shapes.append("#")
        else:
            shapes.append(re.sub(r"[A-Za-z0-9_.+~/:\[\]@-]+", "w", line))
    return shapes


def _install_forms(unit: str) -> dict[str, str]:
    """The unit as install.sh writes it for each engine ("#docker-only" kept or dropped)."""
    def fill(text: str, engine: str) -> str:
        return text.replace("@ENGINE@", f"/usr/bin/{engine}").replace("@ENGINE_ARGS@", "")

    docker = re.sub(r"(?m)^#docker-only ", "", unit)
    podman = re.sub(r"(?m)^#docker-only .*\n", "", unit)
    return {"docker": fill(docker, "docker"), "podman": fill(podman, "podman")}


def _verify_units(files: dict[str, str], unit_name: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    for engine in ("docker", "podman"):
        folder = tmp_path / f"units-{engine}"
        folder.mkdir(exist_ok=True)
        runtime = _install_forms(files[f"{unit_name}.service"])[engine]
        (folder / f"{unit_name}.service").write_text(runtime)
        agent = _install_forms(files["edgepack-ota-agent.service"])[engine]
        (folder / "edgepack-ota-agent.service").write_text(agent)
        (folder / "edgepack-ota-agent.timer").write_text(files["edgepack-ota-agent.timer"])
        for name in (f"{unit_name}.service", "edgepack-ota-agent.timer"):
            proc = subprocess.run(["systemd-analyze", "verify", str(folder / name)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0 and proc.stderr.strip() == "", (engine, name, proc.stderr)


def _parse_shell(text: str, tmp_path: Path) -> None:
    script = tmp_path / "install.sh"
    script.write_text(text)
    for shell in ("sh", "bash"):
        if shutil.which(shell):
            proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, (shell, proc.stderr)


def _compile_python(text: str, tmp_path: Path) -> None:
    source = tmp_path / "supervise.py"
    source.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "py_compile", str(source)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_linux_templates_with_the_worst_allowed_values_parse_and_keep_their_structure(
    onnx_dir: Path, tmp_path: Path
) -> None:
    plain_ctx, files = _linux_context(onnx_dir, tmp_path, PLAIN, worst_ints=False)
    worst_ctx, worst_files = _linux_context(onnx_dir, tmp_path, WORST, worst_ints=True)
    plain, worst = _render_all(plain_ctx, files), _render_all(worst_ctx, worst_files)
    assert set(worst) == {"edgepack-" + WORST_NAME + ".service", "install.sh", "supervise.py",
                          "README.md", "edgepack-ota-agent.service", "edgepack-ota-agent.timer"}
    unit = f"edgepack-{WORST_NAME}"
    _verify_units(worst, unit, tmp_path)
    _parse_shell(worst["install.sh"], tmp_path)
    _compile_python(worst["supervise.py"], tmp_path)
    assert _shell_shape(worst["install.sh"]) == _shell_shape(plain["install.sh"])
    assert _python_structure(worst["supervise.py"]) == _python_structure(plain["supervise.py"])
    for name in ("edgepack-ota-agent.service", "edgepack-ota-agent.timer"):
        assert _unit_structure(worst[name]) == _unit_structure(plain[name])
    runtime_plain = _unit_structure(plain["edgepack-mnist.service"])
    assert _unit_structure(worst[f"{unit}.service"]) == runtime_plain
    for name in plain:
        other = name.replace("mnist", WORST_NAME)
        assert worst[other].count("\n") == plain[name].count("\n"), name
    # The values arrive intact: the shell and Python read back exactly what the target said.
    assert _shell_value(worst["install.sh"], "NAME") == WORST_NAME
    assert _shell_value(worst["install.sh"], "VERSION") == WORST_VERSION
    assert f'"repo": "{WORST_REPO}", "channel": "{WORST_CHANNEL}"' in worst["install.sh"]


def _shell_value(script: str, variable: str) -> str:
    line = next(ln for ln in script.splitlines() if ln.startswith(f"{variable}="))
    proc = subprocess.run(["sh", "-c", f'{line}\nprintf %s "${variable}"'],
                          capture_output=True, text=True, check=True)
    return proc.stdout


HOSTILE = (
    "$(touch /tmp/pwned)",
    "`id`",
    "a'b",
    'a"b"',
    "a;b",
    "[Service]",
    "%n",
    "a\\",
    "x\nExecStartPre=/bin/sh -c id",
    "x\n[Service]\nExecStart=/bin/sh",
    "a\x00b",
    "v\nrm -rf /\n",
    "a\nPY\nimport os",
)


@pytest.mark.parametrize("value", HOSTILE)
def test_escaping_holds_even_if_validation_were_bypassed(
    onnx_dir: Path, tmp_path: Path, value: str
) -> None:
    context, files = _linux_context(onnx_dir, tmp_path, PLAIN, worst_ints=False)
    plain = _render_all(context, files)
    keys = ("name", "version", "target", "platform", "unit", "container", "image_ref")
    checks: dict[str, Callable[[str, str], object]] = {
        "install.sh": lambda new, old: _shell_shape(new) == _shell_shape(old),
        "supervise.py": lambda new, old: _python_structure(new) == _python_structure(old),
        "edgepack-mnist.service": lambda new, old: _unit_structure(new) == _unit_structure(old),
        "edgepack-ota-agent.service": lambda new, old: _unit_structure(new) == _unit_structure(old),
        "edgepack-ota-agent.timer": lambda new, old: _unit_structure(new) == _unit_structure(old),
    }
    for key in (*keys, "ota.repo", "ota.channel"):
        hostile = dict(context)
        if key.startswith("ota."):
            hostile["ota"] = {**context["ota"], key.removeprefix("ota."): value}
        else:
            hostile[key] = value
        for path, template in files:
            name = Path(path).name
            if name not in checks:
                continue  # README.md: prose, not code
            try:
                text = render(template, hostile)
            except UnsafeValue:
                continue  # refused: nothing is written
            assert checks[name](text, plain[name]), (key, value, name)
            if name == "install.sh":
                _parse_shell(text, tmp_path)
                if key in ("name", "version", "image_ref", "unit", "container"):
                    assert _shell_value(text, key.upper()) == value
            if name == "supervise.py":
                _compile_python(text, tmp_path)


def test_mcu_sources_with_the_worst_allowed_values_compile_and_keep_their_structure(
    tmp_path: Path,
) -> None:
    model = TFLM / "hello_world_int8.tflite"
    if not model.is_file():
        pytest.skip(f"{model} not found")
    if shutil.which("g++") is None:
        pytest.fail("no C++ compiler: apt-get install g++")

    def project(values: dict[str, str], folder: Path) -> Path:
        target = parse_target(
            {
                "name": values["name"], "description": values["text"][:200],
                "vendor": values["text"][:200], "device_class": "mcu",
                "mcu": {"core": "cortex-m4", "freq_mhz": 64, "isa": [values["token"]]},
                "memory": {"ram_kb": 256, "flash_kb": 1024},
                "runtime": {"sdk": "zephyr", "board": values["token"]},
            },
            "m.toml",
        )
        request = BuildRequest(model=model, target="m.toml", name=values["name"])
        info = inspect_model(model)
        backend = McuBackend()
        plan = backend.plan(request, info, target, backend.fit(request, info, target))
        folder.mkdir()
        backend.execute(plan, folder, tmp_path)
        return folder

    plain = project(PLAIN, tmp_path / "plain")
    worst = project(WORST, tmp_path / "worst")
    rendered = (".h", ".cc", ".c", ".txt", ".conf", ".yml", ".md")  # not the model or images
    for path in sorted(p for p in worst.rglob("*") if p.is_file() and p.suffix in rendered):
        rel = path.relative_to(worst)
        twin = plain / str(rel).replace(WORST_NAME, "mnist")
        if not twin.exists():
            twin = next(plain.rglob(rel.name.replace(WORST_NAME, "mnist")))
        text, other = path.read_text(), twin.read_text()
        assert text.count("\n") == other.count("\n"), rel
        if path.suffix in (".h", ".cc", ".c", ".txt", ".conf", ".yml"):
            assert _line_shape(_code_lines(text)) == _line_shape(_code_lines(other)), rel
    src = worst / "src"
    # The host compiler for C++ (the Arm toolchain here has no C++ library headers); the C
    # update code with both.
    runs = [("g++", "c++", "model_settings.h"), ("g++", "c++", "model_data.cc")]
    runs += [(cc, "c", "model_update.c") for cc in ("gcc", "arm-none-eabi-gcc") if shutil.which(cc)]
    for cc, lang, unit in runs:
        proc = subprocess.run([cc, "-fsyntax-only", "-x", lang, "-I", str(src), str(src / unit)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, (cc, unit, proc.stderr)


def _code_lines(text: str) -> str:
    """C, CMake and Kconfig lines with their comments cut (a comment is one shape, '#')."""
    out = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("//", "/*", "*", "#")) and not stripped.startswith("#include"):
            out.append("# comment")
        else:
            out.append(line)
    return "\n".join(out)


def _exposure(unit: Path) -> float:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match[1])


def test_unit_exposure_is_at_most_what_was_measured(onnx_dir: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    context, files = _linux_context(onnx_dir, tmp_path, PLAIN, worst_ints=False)
    rendered = _render_all(context, files)
    install = rendered["install.sh"]
    # install.sh keeps the "#docker-only" lines for docker, drops them for podman, for both units.
    assert "docker) UNIT_SED='s/^#docker-only //'" in install
    assert "*) UNIT_SED='/^#docker-only /d'" in install
    template = (templates_dir() / "linux" / "install.sh.jinja").read_text()
    assert template.count('sed -e "$UNIT_SED"') == 2  # the runtime unit and the agent's
    scores = {}
    for kind, name in (("runtime", "edgepack-mnist.service"),
                       ("agent", "edgepack-ota-agent.service")):
        for engine, text in _install_forms(rendered[name]).items():
            unit = tmp_path / engine / name
            unit.parent.mkdir(exist_ok=True)
            unit.write_text(text)
            scores[(kind, engine)] = _exposure(unit)
    for key, limit in EXPOSURE_LIMITS.items():
        assert scores[key] <= limit, (key, scores[key], limit)
