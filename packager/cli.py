"""The ``edgepack`` command line: registers the commands and maps errors to exit codes.

This is the only place that catches :class:`EdgepackError`; it prints the one-line message (or a
JSON error document with ``--json``) and exits with the error's documented code. Click's own usage
errors get the same treatment (exit 2; a JSON document under ``--json``). Any other exception is a
bug: it gets one line too (exit 1), never a bare traceback.

This module imports only the standard library at load time: click, rich and the commands (which
pull in numpy, onnx, ...) are imported inside :func:`main`, under its KeyboardInterrupt handler,
so Ctrl-C at any moment of a run, the first second of imports included, ends with
``error: aborted`` and exit 130, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from functools import cache
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import click

# 128 + SIGINT, what shells report for a command ended by Ctrl-C.
EXIT_INTERRUPTED = 130

_HELP = """Package an optimized model for an edge device as a verified, ready-to-flash bundle.

    \b
    Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input (model/data file),
    4 target, 5 does not fit, 6 tool missing, 7 tool failed, 8 verification failed,
    9 network, 10 unsupported, 11 accuracy gate, 12 runtime check failed.
    """


@cache
def _make_cli() -> click.Group:
    import click

    from packager import __version__

    @click.group(context_settings={"help_option_names": ["-h", "--help"]}, help=_HELP)
    @click.version_option(__version__, prog_name="edgepack")
    def cli() -> None:
        pass

    return cli


def __getattr__(name: str) -> object:
    """``packager.cli.cli``: the click group (built on first use, with every command)."""
    if name == "cli":
        group = _make_cli()
        _register(group)
        return group
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register(group: click.Group) -> None:
    from packager.commands.bake import bake_cmd
    from packager.commands.build import build_cmd
    from packager.commands.engine import engine_group
    from packager.commands.inspect import inspect_cmd
    from packager.commands.keys import keys_group
    from packager.commands.optimize import optimize_cmd
    from packager.commands.ota import ota_group
    from packager.commands.push import push_cmd
    from packager.commands.run import run_cmd
    from packager.commands.targets import targets_group
    from packager.commands.verify import verify_cmd

    commands = (build_cmd, inspect_cmd, optimize_cmd, targets_group, verify_cmd, run_cmd,
                ota_group, push_cmd, bake_cmd, keys_group, engine_group)
    for command in commands:
        if command.name not in group.commands:
            group.add_command(command)


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``edgepack`` entry point: run the command line ``argv`` (None: ``sys.argv[1:]``) and
    exit with its code (packager.errors.ExitCode), 130 after Ctrl-C."""
    wants_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        _main(argv, wants_json=wants_json)
    except KeyboardInterrupt:
        _aborted(wants_json=wants_json)
    # _main always exits; this is only reached if it returned (it does not).
    sys.exit(0)  # pragma: no cover


def _aborted(*, wants_json: bool) -> NoReturn:
    """Ctrl-C: one line (or a JSON document), exit 130. Plain writes: rich may not be loaded."""
    try:
        if wants_json:
            document = {"error": "aborted", "message": "aborted", "exit_code": EXIT_INTERRUPTED}
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
            sys.stdout.flush()
        else:
            sys.stderr.write("error: aborted\n")
            sys.stderr.flush()
    except (KeyboardInterrupt, OSError):  # a second Ctrl-C or a closed pipe: exit all the same
        pass
    sys.exit(EXIT_INTERRUPTED)


def _main(argv: list[str] | None, *, wants_json: bool) -> NoReturn:
    import click

    from packager.console import console, printable
    from packager.errors import EdgepackError, ExitCode

    try:
        group = _make_cli()
        _register(group)
        group.main(args=argv, prog_name="edgepack", standalone_mode=False)
    except EdgepackError as exc:
        if wants_json:
            console.json(exc.to_json())
        else:
            console.error(_escape(exc.one_line()))
            for line in exc.details:  # the further problems, indented under the one error line
                console.err.print("  " + _escape(printable(line)))
        sys.exit(int(exc.exit_code))
    except click.exceptions.Abort:
        raise KeyboardInterrupt from None  # click's Ctrl-C at a prompt: the same as ours
    except click.ClickException as exc:
        if wants_json:
            console.json(
                {
                    "error": "usage" if exc.exit_code == ExitCode.USAGE else "error",
                    "message": " ".join(exc.format_message().split()),
                    "exit_code": exc.exit_code,
                }
            )
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: one line (or a JSON document), never a bare traceback
        _internal_error(exc, wants_json=wants_json)
        sys.exit(int(ExitCode.FAILURE))
    sys.exit(int(ExitCode.OK))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _internal_error(exc: Exception, *, wants_json: bool) -> None:
    """Report an unexpected exception: what it was and how to get the traceback for a report.

    ``EDGEPACK_DEBUG=1`` prints the traceback on stderr (never stdout, which --json owns).
    """
    from packager.console import console
    from packager.errors import ExitCode

    detail = " ".join(str(exc).split())[:300]
    message = f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else "")
    hint = "this is a bug in edgepack; rerun with EDGEPACK_DEBUG=1 for the traceback and report it"
    if os.environ.get("EDGEPACK_DEBUG"):
        traceback.print_exception(exc, file=sys.stderr)
    if wants_json:
        console.json(
            {
                "error": "internal",
                "message": f"{message} ({hint})",
                "exception": type(exc).__name__,
                "exit_code": int(ExitCode.FAILURE),
            }
        )
    else:
        # Escaped: exception text such as "[ONNXRuntimeError]" is not rich markup.
        console.error(_escape(f"{message} ({hint})"))
