"""A deadline that is set again and again and rarely passes, on one timer moved lazily.

A timeout armed per request (``loop.call_later`` and its ``cancel``: ~2 us on uvloop, plus the
handle's closing in the loop) is most of what the timeout costs when requests take a
millisecond and the timeout is a minute. :class:`LazyDeadline` keeps one timer: setting the
deadline later only records it, and when the timer fires before the deadline recorded then,
it is armed again for that deadline. A deadline only ever moved later (``now + timeout``) so
costs one timer per ``timeout`` seconds, whatever the number of requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["LazyDeadline"]


class LazyDeadline:
    """Calls ``callback`` once the loop's time reaches the deadline last :meth:`set` (unless
    :meth:`clear` came first). Not earlier than the deadline; later by at most the loop's
    timer granularity. The callback runs from the event loop and must not raise."""

    __slots__ = ("_at", "_callback", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> bool:
        """A deadline is set and has not passed."""
        return self._at is not None

    def set(self, at: float) -> None:
        """The deadline is ``at`` (the loop's time) from now on."""
        self._at = at
        timer = self._timer
        if timer is None or at < timer.when():  # earlier than armed: arm anew
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(at, self._fire)

    def clear(self) -> None:
        """No deadline (the timer, if armed, finds none when it fires and stops)."""
        self._at = None

    def cancel(self) -> None:
        """No deadline, and the timer stopped now (the owner is going away)."""
        self._at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at:  # moved later since armed
            self._timer = self._loop.call_at(at, self._fire)
            return
        self._at = None
        self._callback()
