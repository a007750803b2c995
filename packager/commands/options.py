"""Options that more than one command takes, defined once so that a flag means the same thing,
with the same words in ``--help``, wherever it appears (``build`` runs the optimizer and the
converters with what ``optimize`` takes)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from packager.models.trust import TRUST_FLAG

_Command = TypeVar("_Command", bound=Callable[..., Any])

calibration_option = click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help="Directory of .npy/.npz tensors or images for static INT8.",
)
eval_option = click.option(
    "--eval",
    "eval_dir",
    type=click.Path(path_type=Path),
    help="Held-out inputs (.npy/.npz), optional reference outputs or labels.",
)


def trust_model_code_option(forms: str) -> Callable[[_Command], _Command]:
    """``--trust-model-code`` for a command that loads ``forms`` (e.g. "PyTorch"): the
    builder's word that they wrote a model file whose loading runs code from it
    (packager.models.trust)."""
    return click.option(
        TRUST_FLAG,
        "trust_model_code",
        is_flag=True,
        help=f"{forms}: load the model although loading it runs code from the file; only for a "
        "file you wrote yourself (see the README's security model).",
    )
