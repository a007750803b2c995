"""Moving bytes: HTTP(S) with Range resume, or a local directory (a USB stick).

Every byte read from the repository goes through one :class:`Transport`, which counts it, so the
agent can report (and tests can check) exactly how much an update moved, and bounds every wait:
the connection and the response's header block must arrive within ``timeout_s`` in total, and
the body must move at least ``min_window_bytes`` in every ``window_s`` seconds (a socket timeout
alone is reset by every byte, so a mirror that drips one byte a second would never trip it).
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

log = logging.getLogger("edgepack.agent")
_CHUNK = 64 * 1024


class _HeaderDeadline(http.client.HTTPConnection):
    """Shuts the connection's socket down when the response headers have not all arrived
    ``deadline_s`` after connecting (a blocked read then fails at once). Mixed in before
    ``HTTPConnection`` or ``HTTPSConnection``: ``super()`` reaches the right one."""

    deadline_s: float = 30.0

    def connect(self) -> None:
        self._arm()
        super().connect()

    def getresponse(self) -> http.client.HTTPResponse:
        try:
            return super().getresponse()
        finally:
            self._disarm()

    def _arm(self) -> None:
        self._timer = threading.Timer(self.deadline_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _disarm(self) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()


class _HTTPConnection(_HeaderDeadline):
    pass


class _HTTPSConnection(_HeaderDeadline, http.client.HTTPSConnection):
    pass


def _opener(deadline_s: float) -> urllib.request.OpenerDirector:
    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(_with_deadline(_HTTPConnection, deadline_s), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            context = getattr(self, "_context", None)
            return self.do_open(_with_deadline(_HTTPSConnection, deadline_s), req, context=context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _with_deadline(cls: Any, deadline_s: float) -> Any:
    return type(cls.__name__, (cls,), {"deadline_s": deadline_s})


class _Pace:
    """Raises DownloadError when a window of ``window_s`` seconds moved fewer than
    ``min_bytes`` bytes; checked after every read, so a stalled body costs at most one window
    plus one socket timeout."""

    def __init__(self, url: str, min_bytes: int, window_s: float) -> None:
        self.url, self.min_bytes, self.window_s = url, min_bytes, window_s
        self.started = time.monotonic()
        self.moved = 0

    def add(self, count: int) -> None:
        self.moved += count
        elapsed = time.monotonic() - self.started
        if elapsed < self.window_s:
            return
        if self.moved < self.min_bytes:
            raise DownloadError(
                f"{self.url}: {self.moved} bytes in {elapsed:.0f}s, below the minimum of"
                f" {self.min_bytes} bytes per {self.window_s:.0f}s; will resume next cycle"
            )
        self.started, self.moved = time.monotonic(), 0


class Transport:
    """Opens ``http(s)://`` and ``file://`` URLs from a byte offset, counting what it reads."""

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        min_window_bytes: int = 32 * 1024,
        window_s: float = 30.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.min_window_bytes = min_window_bytes
        self.window_s = window_s
        self.bytes_fetched = 0
        self._opener = _opener(timeout_s)

    def iter_from(self, url: str, offset: int = 0) -> Iterator[bytes]:
        scheme = urllib.parse.urlparse(url).scheme
        if scheme == "file":
            yield from self._iter_file(url, offset)
        elif scheme in ("http", "https"):
            yield from self._iter_http(url, offset)
        else:
            raise DownloadError(f"{url}: unsupported URL scheme (use http, https or file)")

    def _iter_file(self, url: str, offset: int) -> Iterator[bytes]:
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        # A stick may hold a link to a device file or a FIFO (which would block forever):
        # read regular files only, never through a final symlink.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError as exc:
            raise DownloadHTTPError(f"{path}: not found", 404) from exc
        except OSError as exc:
            raise DownloadError(f"{path}: cannot open ({exc})") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise DownloadError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb") as handle:
            handle.seek(offset)
            while chunk := handle.read(_CHUNK):
                self.bytes_fetched += len(chunk)
                yield chunk

    def _iter_http(self, url: str, offset: int) -> Iterator[bytes]:
        request = urllib.request.Request(url)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = self._opener.open(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"{url}: {exc}") from exc
        with response:
            skip = 0
            if offset and response.status != 206:
                # The server ignored Range and sends the whole file: drop what we already have.
                skip = offset
            pace = _Pace(url, self.min_window_bytes, self.window_s)
            try:
                # read1: return what one recv brings, so the pace is checked while bytes drip.
                while chunk := response.read1(_CHUNK):
                    pace.add(len(chunk))
                    self.bytes_fetched += len(chunk)
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk = chunk[dropped:]
                        skip -= dropped
                        if not chunk:
                            continue
                    yield chunk
            except (OSError, http.client.HTTPException) as exc:
                # A body cut short raises IncompleteRead; what arrived is kept for the resume.
                raise DownloadError(f"{url}: connection lost ({exc})") from exc


class TufFetcher(FetcherInterface):
    """Lets tuf.ngclient fetch metadata through the agent's counting transport."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._transport.iter_from(url, 0)


def download_resumable(transport: Transport, url: str, part: Path, length: int) -> Path:
    """Fetch ``url`` into ``part``, continuing from the bytes already there.

    Returns ``part`` once it holds exactly ``length`` bytes (fsync'd). A file already longer than
    ``length`` is garbage from an older attempt and is started over. The caller verifies hashes.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    if offset > length:
        part.unlink()
        offset = 0
    if offset < length:
        log.info("fetching %s from byte %d of %d", url, offset, length)
        with part.open("ab") as handle:
            for chunk in transport.iter_from(url, offset):
                offset += len(chunk)
                if offset > length:
                    raise DownloadError(f"{url}: longer than the {length} bytes signed for it")
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    if offset != length:
        raise DownloadError(f"{url}: got {offset} of {length} bytes; will resume next cycle")
    return part
