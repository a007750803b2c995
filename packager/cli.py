"""The ``edgepack`` command line: registers the commands and maps errors to exit codes.

This is the only place that catches :class:`EdgepackError`; it prints the one-line message (or a
JSON error document with ``--json``) and exits with the error's documented code.
"""

from __future__ import annotations

import sys

import click

from packager import __version__
from packager.console import console
from packager.errors import EdgepackError, ExitCode


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepack")
def cli() -> None:
    """Package an optimized model for an edge device as a verified, ready-to-flash bundle.

    \b
    Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input (model/data file),
    4 target, 5 does not fit, 6 tool missing, 7 tool failed, 8 verification failed,
    9 network, 10 unsupported, 11 accuracy gate, 12 runtime check failed.
    """


def _register() -> None:
    from packager.commands.build import build_cmd
    from packager.commands.inspect import inspect_cmd
    from packager.commands.optimize import optimize_cmd
    from packager.commands.ota import ota_group
    from packager.commands.run import run_cmd
    from packager.commands.targets import targets_group
    from packager.commands.verify import verify_cmd

    commands = (build_cmd, inspect_cmd, optimize_cmd, targets_group, verify_cmd, run_cmd, ota_group)
    for command in commands:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    _register()
    wants_json = "--json" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="edgepack", standalone_mode=False)
    except EdgepackError as exc:
        if wants_json:
            console.json(exc.to_json())
        else:
            console.error(exc.one_line())
            for line in exc.details:
                console.error(line)
        sys.exit(int(exc.exit_code))
    except click.exceptions.Abort:
        console.error("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.error("interrupted")
        sys.exit(130)
    sys.exit(int(ExitCode.OK))
