"""The options build and optimize share mean the same thing and say the same words in --help:
each is defined once (packager.commands.options)."""

from __future__ import annotations

import click

from packager.commands.build import build_cmd
from packager.commands.optimize import optimize_cmd


def _option(command: click.Command, name: str) -> click.Option:
    (found,) = [p for p in command.params if isinstance(p, click.Option) and p.name == name]
    return found


def test_shared_options_are_one_definition() -> None:
    for name in ("calibration", "eval_dir", "trust_model_code"):
        built, optimized = _option(build_cmd, name), _option(optimize_cmd, name)
        assert built.opts == optimized.opts, name
        assert (built.type.name, built.is_flag) == (optimized.type.name, optimized.is_flag), name
    for name in ("calibration", "eval_dir"):
        assert _option(build_cmd, name).help == _option(optimize_cmd, name).help, name


def test_trust_model_code_names_what_each_command_loads() -> None:
    """optimize loads PyTorch only; build also loads TensorFlow SavedModels."""
    assert "SavedModel" in (_option(build_cmd, "trust_model_code").help or "")
    assert "SavedModel" not in (_option(optimize_cmd, "trust_model_code").help or "")
    for command in (build_cmd, optimize_cmd):
        assert "runs code from the file" in (_option(command, "trust_model_code").help or "")
