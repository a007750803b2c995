"""The one error hierarchy of edgepack.

Every error carries the process exit code the CLI uses for it and a one-line message that names
the file or field at fault and, where there is one, the fix. Only ``packager.cli.main`` catches
these and prints them; core code raises and never prints.
"""

from __future__ import annotations

from enum import IntEnum


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

    exit_code: ExitCode = ExitCode.FAILURE
    kind: str = "error"

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


class UsageError(EdgepackError):
    exit_code = ExitCode.USAGE
    kind = "usage"


class InputError(EdgepackError):
    """A model or data file is missing, unreadable or malformed."""

    exit_code = ExitCode.INPUT
    kind = "input"


class TargetError(EdgepackError):
    """An unknown target name or a target file that fails validation."""

    exit_code = ExitCode.TARGET
    kind = "target"


class FitError(EdgepackError):
    """The model needs more memory, storage or flash than the target has."""

    exit_code = ExitCode.FIT
    kind = "fit"


class ToolMissingError(EdgepackError):
    exit_code = ExitCode.TOOL_MISSING
    kind = "tool-missing"


class ToolFailedError(EdgepackError):
    exit_code = ExitCode.TOOL_FAILED
    kind = "tool-failed"


class VerifyError(EdgepackError):
    exit_code = ExitCode.VERIFY
    kind = "verify"


class NetworkError(EdgepackError):
    exit_code = ExitCode.NETWORK
    kind = "network"


class UnsupportedError(EdgepackError):
    exit_code = ExitCode.UNSUPPORTED
    kind = "unsupported"


class AccuracyError(EdgepackError):
    exit_code = ExitCode.ACCURACY
    kind = "accuracy"


class RuntimeCheckError(EdgepackError):
    """A bundle's runtime did not become ready or answered wrongly."""

    exit_code = ExitCode.RUNTIME
    kind = "runtime"
