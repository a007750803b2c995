"""Structured logs: one JSON object per line on stderr, which journald and docker both collect."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "edgepack.runtime"
logger = logging.getLogger(LOGGER_NAME)
# Bounds on one log line: a client's URL, a message or a traceback cannot fill the journal.
MAX_FIELD_CHARS = 256
MAX_EXCEPTION_CHARS = 4096


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked with how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more]"


class JsonFormatter(logging.Formatter):
    """A record as one JSON line: ts (epoch seconds, to the ms), time (UTC), level, event, the
    record's ``fields`` (strings clipped) and any traceback as ``exception`` (clipped)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                document[key] = clip(value) if isinstance(value, str) else value
        if record.exc_info:
            # json.dumps escapes the newlines, so a traceback stays on the event's one line.
            document["exception"] = clip(self.formatException(record.exc_info), MAX_EXCEPTION_CHARS)
        return json.dumps(document, default=str)


def configure(level: str) -> None:
    """Send the runtime's events to stderr as JSON lines from ``level`` (config.LOG_LEVELS) up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def event(
    name: str, level: int = logging.INFO, *, exc_info: bool | BaseException = False, **fields: Any
) -> None:
    """Log event ``name`` at ``level``; ``fields`` become keys of its JSON line."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


class Throttle:
    """At most ``per_second`` events a second (a token bucket); ``allow`` returns how many were
    refused since the last allowed one (to log with it), or None to drop this one. Clients
    choose how often errors happen: their events must not flood the journal."""

    def __init__(self, per_second: float, burst: int) -> None:
        self.per_second = per_second
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._dropped = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens < 1:
            self._dropped += 1
            return None
        self._tokens -= 1
        dropped, self._dropped = self._dropped, 0
        return dropped
