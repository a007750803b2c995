"""Moving bytes: HTTP(S) with Range resume, or a local directory (a USB stick).

Every byte read from the repository goes through one :class:`Transport`, which counts it, so the
agent can report (and tests can check) exactly how much an update moved.
"""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

log = logging.getLogger("edgepack.agent")
_CHUNK = 64 * 1024


class Transport:
    """Opens ``http(s)://`` and ``file://`` URLs from a byte offset, counting what it reads."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.bytes_fetched = 0

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
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise DownloadHTTPError(f"{path}: not found", 404) from exc
        with handle:
            handle.seek(offset)
            while chunk := handle.read(_CHUNK):
                self.bytes_fetched += len(chunk)
                yield chunk

    def _iter_http(self, url: str, offset: int) -> Iterator[bytes]:
        request = urllib.request.Request(url)
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            raise DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"{url}: {exc}") from exc
        with response:
            skip = 0
            if offset and response.status != 206:
                # The server ignored Range and sends the whole file: drop what we already have.
                skip = offset
            try:
                while chunk := response.read(_CHUNK):
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
