"""Model forms whose loading runs code from the file, and the one refusal of such a file.

Model files are untrusted (README, "Security model"). For most formats edgepack parses the file
(ONNX, TFLite) or loads it so that no code from it runs (Keras ``.keras``/``.h5`` with
``safe_mode=True``, packager.models.keras). For the forms in :data:`RUNS_CODE` the framework's
own loader runs code or graph operations from the file, so edgepack loads them only with the
builder's explicit word, :data:`TRUST_FLAG`; without it :func:`check_trusted` refuses the file
before a byte of it is loaded. Where each form runs code, with the sources read, is documented
next to its loader: packager.models.torch_export (the three PyTorch kinds) and
packager.models.keras (a TensorFlow SavedModel directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from packager.errors import InputError

# The flag by which the builder vouches for a model file (edgepack build / optimize).
TRUST_FLAG = "--trust-model-code"

# The PyTorch file kinds (packager.models.torch_export.TorchKind) and a SavedModel directory.
CodeForm = Literal["torch-pickle", "torchscript", "exported-program", "saved-model"]

_ONNX_FIX = "export it to ONNX (torch.onnx.export) where the file is trusted and build the .onnx"
# Form -> (what the file is and why loading it runs code, where the file is trusted instead).
_RUNS_CODE: dict[CodeForm, tuple[str, str]] = {
    "torch-pickle": (
        "a torch.save pickle, and unpickling it runs code from the file",
        _ONNX_FIX,
    ),
    "exported-program": (
        "a torch.export program, and torch 2.13's torch.export.load runs code from the file "
        "(it unpickles parts of it with weights_only=False and eval()s its shape expressions)",
        _ONNX_FIX,
    ),
    "torchscript": (
        "TorchScript, and torch.jit.load runs code from the file (its TorchScript, which "
        "can overwrite files on this host)",
        _ONNX_FIX,
    ),
    "saved-model": (
        "a TensorFlow SavedModel, and loading it runs graph operations from the file (its "
        "init op and resource initializers, which can write files on this host)",
        "convert it to .tflite (tf.lite.TFLiteConverter) or save it as .keras where the model "
        "is trusted and build that file",
    ),
}

# The model forms whose loading runs code from the file: loaded only with TRUST_FLAG.
RUNS_CODE: frozenset[CodeForm] = frozenset(_RUNS_CODE)


def untrusted_error(path: Path, form: CodeForm) -> InputError:
    """The one-line refusal (exit 3) of a ``form`` file the builder has not vouched for: the
    file, why loading it runs code, and the two fixes (a trusted format, or :data:`TRUST_FLAG`)."""
    why, fix = _RUNS_CODE[form]
    return InputError(
        f"{path}: refused: this is {why}; model files are untrusted",
        hint=f"{fix}, or pass {TRUST_FLAG} if you wrote this file yourself",
    )


def check_trusted(path: Path, form: CodeForm | None, trusted: bool) -> None:
    """InputError (:func:`untrusted_error`) when loading ``path``, of ``form`` (None: a form
    that runs no code, packager.models.code_form), runs code from it and ``trusted`` (the
    builder's :data:`TRUST_FLAG`) is False; nothing otherwise."""
    if form is not None and form in RUNS_CODE and not trusted:
        raise untrusted_error(path, form)
