"""The one place that writes to the terminal.

Human output (progress bars, status lines, tables) goes to stderr so that stdout stays clean for
``--json`` documents that CI parses. Nothing else in the package prints.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich import table as rich_table
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

# C0 and C1 control characters but tab and newline (ESC and CSI start terminal escape sequences,
# which rich passes through), DEL, and the Unicode bidirectional overrides and isolates (they
# reorder what a reader sees: CVE-2021-42574).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character (:data:`_CONTROL`) shown as ``\\xNN`` /
    ``\\uNNNN``: names and values read from target files, bundles, reports and devices never drive
    the terminal they are shown on. Tab and newline are kept."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


class Table(rich_table.Table):
    """rich's Table whose title and string cells pass through :func:`printable` (every table the
    commands print shows values from files edgepack does not trust) and are plain text, never
    rich markup (a tensor named "[/x]" would stop the command with a MarkupError, one named
    "[link=URL]" would print a hyperlink escape sequence)."""

    def __init__(self, *headers: Any, title: str | None = None, **options: Any) -> None:
        shown = None if title is None else Text(printable(title), style="table.title")
        super().__init__(*headers, title=shown, **options)

    def add_row(self, *renderables: Any, **options: Any) -> None:
        super().add_row(
            *(Text(printable(cell)) if isinstance(cell, str) else cell for cell in renderables),
            **options,
        )


class Reporter:
    """Progress and status output; quiet when ``--json`` is in force or stderr is no terminal."""

    def __init__(self) -> None:
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = Console(highlight=False, soft_wrap=True)
        self.quiet = False

    def configure(self, *, quiet: bool) -> None:
        self.quiet = quiet

    # status and warn take plain text (a device's output line, an error naming a model's node),
    # never rich markup: printable, then escaped. error takes markup: its callers escape.
    def status(self, message: str) -> None:
        if not self.quiet:
            self.err.print(f"[bold cyan]>[/] {escape(printable(message))}")

    def warn(self, message: str) -> None:
        self.err.print(f"[bold yellow]warning:[/] {escape(printable(message))}")

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/] {printable(message)}", markup=True)

    def result(self, text: str) -> None:
        """Human-readable command result on stdout."""
        self.out.print(printable(text), markup=False)

    def table(self, renderable: Any) -> None:
        self.out.print(renderable)

    def json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()

    @contextmanager
    def progress(self, description: str, total: int | None, *, bytes_: bool = True) -> Iterator[
        ProgressTask
    ]:
        """A progress bar for long work (downloads, layer writing); a no-op when quiet."""
        if self.quiet or not self.err.is_terminal:
            yield ProgressTask(None, None)
            return
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if bytes_:
            columns += [DownloadColumn(), TransferSpeedColumn()]
        columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield ProgressTask(bar, task)


class ProgressTask:
    """The handle :meth:`Reporter.progress` yields: advance the bar by an amount (bytes, or items)
    or set its total; a no-op when there is no bar."""

    def __init__(self, bar: Progress | None, task: TaskID | None) -> None:
        self._bar = bar
        self._task = task

    def advance(self, amount: float) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, amount)

    def set_total(self, total: float) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, total=total)


@contextmanager
def capture_fd(fd: int) -> Iterator[list[str]]:
    """Collect what native code writes straight to file descriptor ``fd`` (1 or 2).

    TensorFlow's converter and the TFLM interpreter write to the process's stdout/stderr from
    C++, past ``sys.stdout``; on stdout that would corrupt ``--json`` documents. The captured
    text is in the yielded list once the block ends.
    """
    sink: list[str] = []
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield sink
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            sink.append(tmp.read().decode("utf-8", "replace"))


console = Reporter()
