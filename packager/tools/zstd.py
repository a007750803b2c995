"""zstd: decompresses ``+zstd`` image layers (Python 3.11's standard library has no zstd).

The compressed bytes are fed from a thread and the output is read as a stream, so a caller that
bounds what it reads can stop a zstd bomb after that bound: leaving the ``with`` block early kills
the process.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO

from packager.digest import CHUNK
from packager.tools.base import Tool

ZSTD = Tool("zstd", "zstd", "zstd")


class _Output:
    """zstd's stdout; at its end, a failed decompression reads as OSError (a corrupt layer)."""

    def __init__(self, proc: subprocess.Popen[bytes], errors: IO[bytes]) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self._stdout = proc.stdout
        self._errors = errors

    def read(self, size: int = -1) -> bytes:
        chunk = self._stdout.read(size)
        if not chunk and self._proc.wait() != 0:
            self._errors.seek(0)
            tail = self._errors.read()[-300:].decode("utf-8", "replace").strip()
            raise OSError(f"zstd: {tail or f'exit {self._proc.returncode}'}")
        return chunk


@contextmanager
def decompressing(source: IO[bytes]) -> Iterator[_Output]:
    """``zstd -dc`` over ``source``; yields a stream with ``read(size)``."""
    with tempfile.TemporaryFile() as errors:
        proc = ZSTD.popen(
            ["-d", "-c", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors.fileno(),
        )
        assert proc.stdin is not None
        stdin = proc.stdin

        def feed() -> None:
            # A reader that stops early kills zstd: the broken pipe ends this thread.
            with suppress(OSError, ValueError):
                while chunk := source.read(CHUNK):
                    stdin.write(chunk)
            with suppress(OSError):
                stdin.close()

        feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
        feeder.start()
        try:
            yield _Output(proc, errors)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            feeder.join()
            if proc.stdout is not None:
                proc.stdout.close()
