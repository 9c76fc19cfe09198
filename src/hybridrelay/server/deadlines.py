"""Many deadlines of the same length on one timer: the inline HTTP requests' response deadline.

Each relayed inline request waits at most its entity's response deadline (60 s by default)
for the listener's answer, and nearly always gets it within a millisecond. A timer per request
(``loop.call_later`` and its ``cancel``: ~2.3 us on uvloop, plus the handle's closing) was the
largest single part of what waiting for that answer cost. Requests that wait the *same* number
of seconds expire in the order they began (the loop's clock only moves forward), so they can
wait in one FIFO per deadline value with one timer, armed for the oldest entry still in it.

* An entry settled (answered, its sender gone: :meth:`DeadlineQueue.settle`) is not removed
  then: whoever next looks at the front of the queue (an :meth:`DeadlineQueue.add`, the timer)
  drops it. Settled entries behind a live one (a request slower than those after it) are
  dropped by a compaction once they outnumber the live ones by :data:`_MIN_COMPACT`, so the
  queue holds at most twice its live entries plus that, never a whole deadline's worth of
  answered requests (and the compaction's cost is at most two steps per entry settled).
* An entry expires when the loop's time reaches ``added + seconds`` (within :data:`_EARLY`,
  libuv's millisecond), as its own timer would have fired: the timer is armed with ``call_at``
  for that time (short deadlines fire on time).
  Each expiry runs as its own callback (``call_soon``), so one that raises is reported by the
  loop like a timer's and does not stop the others, and an entry settled in between is not
  expired (its ``expire`` sees it settled).
* An empty queue drops its timer and leaves :class:`Deadlines`, so deadline values that are no
  longer used (a reloaded configuration) hold nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["DeadlineQueue", "Deadlines", "Expiring"]

#: Settled entries beyond the live ones that a queue may hold before it is compacted (the
#: dropping at its front keeps it shorter still when the oldest entries are answered first).
_MIN_COMPACT = 64
#: Entries due within this much of the loop's time when the timer fires expire then: libuv's
#: timers have a millisecond's granularity, and the timer must not be re-armed for a time it
#: is already at (a loop that fires a timer a hair early would spin).
_EARLY = 0.001


class Expiring(Protocol):
    """What waits in a :class:`DeadlineQueue`."""

    #: Set by :meth:`DeadlineQueue.settle` (False when added): the entry is then never expired.
    settled: bool

    def expire(self) -> None:
        """The deadline passed: called from the event loop once, unless settled before. The
        entry's own :meth:`DeadlineQueue.settle` may still find it settled (it settled between
        the timer and this call) and should then do nothing."""


class DeadlineQueue:
    """Entries that each expire ``seconds`` after they were added, unless settled first, on
    one timer. ``on_empty`` is called when the last entry has left (no timer is armed then)."""

    __slots__ = ("_entries", "_live", "_loop", "_on_empty", "_timer", "seconds")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        seconds: float,
        on_empty: Callable[[DeadlineQueue], None] | None = None,
    ) -> None:
        self._loop = loop
        self.seconds = seconds
        self._on_empty = on_empty
        #: (when it expires, the entry), oldest first: ``when`` never decreases.
        self._entries: deque[tuple[float, Expiring]] = deque()
        #: Entries added and not settled (some may have left ``_entries``, their expiry due).
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Entries held, settled ones not yet dropped included (the memory it holds)."""
        return len(self._entries)

    def add(self, entry: Expiring) -> None:
        """``entry`` expires ``seconds`` from now unless it is settled first."""
        entries = self._entries
        while entries and entries[0][1].settled:
            entries.popleft()
        if len(entries) - self._live > self._live + _MIN_COMPACT:
            # More settled than live: keep the live ones, in order.
            entries = self._entries = deque(item for item in entries if not item[1].settled)
        entry.settled = False
        self._live += 1
        when = self._loop.time() + self.seconds
        entries.append((when, entry))
        if self._timer is None:
            self._timer = self._loop.call_at(when, self._fire)

    def settle(self, entry: Expiring) -> bool:
        """The wait of ``entry`` (added here) is over: it will not expire. False if it was
        settled already (the caller then does nothing: something else settled it first)."""
        if entry.settled:
            return False
        entry.settled = True
        self._live -= 1
        return True

    def _fire(self) -> None:
        self._timer = None
        entries = self._entries
        loop = self._loop
        due = loop.time() + _EARLY
        while entries:
            when, entry = entries[0]
            if entry.settled:
                entries.popleft()
            elif when <= due:
                entries.popleft()
                loop.call_soon(entry.expire)
            else:
                self._timer = loop.call_at(when, self._fire)
                return
        if self._on_empty is not None:
            self._on_empty(self)

    def close(self) -> None:
        """Stop the timer and forget every entry (none expires)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entries.clear()


class Deadlines:
    """One :class:`DeadlineQueue` per deadline value in use, made when first needed and
    dropped once empty (so the values a configuration no longer has hold nothing)."""

    __slots__ = ("_queues",)

    def __init__(self) -> None:
        self._queues: dict[float, DeadlineQueue] = {}

    def add(
        self, loop: asyncio.AbstractEventLoop, seconds: float, entry: Expiring
    ) -> DeadlineQueue:
        """``entry`` expires ``seconds`` from now on ``loop`` unless it is settled first (by
        the queue returned: :meth:`DeadlineQueue.settle`)."""
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = DeadlineQueue(loop, seconds, self._emptied)
        queue.add(entry)
        return queue

    def _emptied(self, queue: DeadlineQueue) -> None:
        if self._queues.get(queue.seconds) is queue:
            del self._queues[queue.seconds]

    def __len__(self) -> int:
        """Deadline values with a queue."""
        return len(self._queues)

    def held(self) -> int:
        """Entries held in all queues, settled ones not yet dropped included."""
        return sum(len(queue) for queue in self._queues.values())

    def close(self) -> None:
        """Stop every timer (none of the entries expires)."""
        for queue in self._queues.values():
            queue.close()
        self._queues.clear()
