"""The one error hierarchy of edgepack.

Every error carries the process exit code the CLI uses for it and a one-line message that names
the file or field at fault and, where there is one, the fix. Only ``packager.cli.main`` catches
these and prints them; core code raises and never prints.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar


class ExitCode(IntEnum):
    """Documented process exit codes (README.md, "Exit codes")."""

    OK = 0
    FAILURE = 1  # an unexpected internal error (a bug): please report it
    USAGE = 2  # bad command line (click's own code for usage errors)
    INPUT = 3  # a model or other input file is missing, unreadable or malformed
    TARGET = 4  # unknown target name or a malformed target file
    FIT = 5  # the model does not fit the target (memory, storage, flash)
    TOOL_MISSING = 6  # an external program edgepack drives is not installed
    TOOL_FAILED = 7  # an external program ran and failed
    VERIFY = 8  # a bundle failed verification (checksum, digest, signature)
    NETWORK = 9  # a download failed (package mirror, PyPI)
    UNSUPPORTED = 10  # the request is valid but not supported (e.g. an unsupported operator)
    ACCURACY = 11  # an optimized model failed the accuracy gate
    RUNTIME = 12  # a bundle's runtime did not start or answer health checks


class EdgepackError(Exception):
    """Base of every error edgepack reports to the user."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE
    kind: ClassVar[str] = "error"  # the JSON document's "error" field

    def __init_subclass__(cls, *, code: ExitCode | None = None, **kwargs: Any) -> None:
        """``class FitError(EdgepackError, code=ExitCode.FIT)``: the subclass's exit code, and
        its ``kind`` spelled from the code's name (FIT -> "fit", TOOL_MISSING ->
        "tool-missing"), so that the two cannot disagree."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.exit_code = code
            cls.kind = code.name.lower().replace("_", "-")

    def __init__(
        self, message: str, *, hint: str | None = None, details: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # Further problems of the same kind (e.g. every damaged file), shown after the line.
        self.details = details

    def one_line(self) -> str:
        text = self.message
        if self.hint:
            text = f"{text} ({self.hint})" if not text.endswith(")") else f"{text}; {self.hint}"
        return " ".join(text.split())

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {
            "error": self.kind,
            "message": self.one_line(),
            "exit_code": int(self.exit_code),
        }
        if self.details:
            document["details"] = list(self.details)
        return document


class UsageError(EdgepackError, code=ExitCode.USAGE):
    """A bad command line: a flag's value or a combination of flags (exit 2, click's own code)."""


class InputError(EdgepackError, code=ExitCode.INPUT):
    """A model or data file is missing, unreadable or malformed."""


class TargetError(EdgepackError, code=ExitCode.TARGET):
    """An unknown target name or a target file that fails validation."""


class FitError(EdgepackError, code=ExitCode.FIT):
    """The model needs more memory, storage or flash than the target has."""


class ToolMissingError(EdgepackError, code=ExitCode.TOOL_MISSING):
    """An external program edgepack drives is not installed; the hint names the Debian package
    (:meth:`packager.tools.base.Tool.require`)."""


class ToolFailedError(EdgepackError, code=ExitCode.TOOL_FAILED):
    """An external program ran and failed: a non-zero exit, a timeout, or an answer edgepack
    cannot accept; the message carries the tail of its output where there is one."""


class VerifyError(EdgepackError, code=ExitCode.VERIFY):
    """Something edgepack checks is not what it claims: a bundle's checksum, digest, signature
    or manifest, an OTA repository's metadata, a downloaded file's hash."""


class NetworkError(EdgepackError, code=ExitCode.NETWORK):
    """A download failed or was impossible (Debian mirror, PyPI, a registry; ``--offline`` with
    the cache lacking what is needed)."""


class UnsupportedError(EdgepackError, code=ExitCode.UNSUPPORTED):
    """A well-formed request edgepack cannot carry out (e.g. an operator the target's runtime
    lacks, a model format a device class cannot deploy)."""


class AccuracyError(EdgepackError, code=ExitCode.ACCURACY):
    """An optimized or converted model disagrees with the model it came from beyond the
    accuracy gate (cosine similarity, top-1 agreement: packager.optimize, packager.models)."""


class RuntimeCheckError(EdgepackError, code=ExitCode.RUNTIME):
    """A bundle's runtime did not become ready or answered wrongly."""
