"""Rate-limited warnings: a flood of bad input must not become a flood of log lines."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """At most one line per ``interval`` seconds per kind, with the count it stood for."""

    def __init__(self, log: logging.Logger, interval: float) -> None:
        self._log = log
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -1e18) < self._interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            more = self._suppressed.pop(kind, 0)
        self._log.warning("%s%s", msg, f" (+{more} more since the last such line)" if more else "")
