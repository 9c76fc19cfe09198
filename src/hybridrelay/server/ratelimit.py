"""Back-pressure on failing listeners (PROTOCOL.md 4.5).

hyco-ws reconnects at once after a refused listen, and each failure starts two new attempts,
so one misconfigured listener can flood the relay. After ``limit`` failures from one source
within ``window`` seconds, further listen attempts from it are answered 429 at once, without
the cost of a signature check, until the window has passed.

Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["FailureLimiter"]


class FailureLimiter:
    def __init__(self, limit: int = 20, window: float = 10.0, max_sources: int = 10_000) -> None:
        self._limit = limit
        self._window = window
        self._max_sources = max_sources
        # source -> (window start, failures in it); oldest first so the map stays bounded
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def blocked(self, source: str, now: float) -> bool:
        entry = self._failures.get(source)
        if entry is None:
            return False
        start, count = entry
        if now - start >= self._window:
            del self._failures[source]
            return False
        return count >= self._limit

    def record_failure(self, source: str, now: float) -> None:
        start, count = self._failures.pop(source, (now, 0))
        if now - start >= self._window:
            start, count = now, 0
        self._failures[source] = (start, count + 1)
        while len(self._failures) > self._max_sources:
            self._failures.popitem(last=False)
