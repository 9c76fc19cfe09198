"""The inline requests' deadline queues (server/deadlines.py): an entry expires when its own
timer would have, never once settled, and the queue holds about twice its live entries at
most, not a deadline's worth of settled ones. A fake loop (its clock moved by hand) makes the
structure's behaviour exact; on a real loop, one test checks it fires there and one that the
relay's inline requests leave no entries behind."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import cast

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.server.deadlines import _MIN_COMPACT, DeadlineQueue, Deadlines
from tests.conftest import Relay
from tests.server.http_peer import Received, Reply, peer_listener


class _Timer:
    def __init__(self, loop: _FakeLoop, when: float, callback: Callable[[], None]) -> None:
        self._loop = loop
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _FakeLoop:
    """time, call_at and call_soon, run by :meth:`advance` in the order a loop runs them."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, _Timer]] = []
        self._soon: list[Callable[[], None]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self, when, callback)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    def armed(self) -> int:
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def advance(self, to: float) -> None:
        """Run what is due up to ``to`` (timers at their time, then what they scheduled)."""
        while self._timers and self._timers[0][0] <= to:
            when, _, timer = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.callback()
            self._run_soon()
        self.now = to
        self._run_soon()

    def _run_soon(self) -> None:
        while self._soon:
            soon, self._soon = self._soon, []
            for callback in soon:
                callback()


class _Entry:
    def __init__(
        self,
        loop: _FakeLoop,
        queue: DeadlineQueue | None,
        name: int,
        expired: list[tuple[int, float]],
    ) -> None:
        self._loop = loop
        self.queue = queue
        self.name = name
        self.settled = False
        self._expired = expired

    def expire(self) -> None:
        # As _InlineWait does: an entry settled after its expiry was scheduled is not expired.
        assert self.queue is not None
        if self.queue.settle(self):
            self._expired.append((self.name, self._loop.now))


def _loop(fake: _FakeLoop) -> asyncio.AbstractEventLoop:
    return cast(asyncio.AbstractEventLoop, fake)


# A program: (time step, add a new entry?, settle which earlier entry (index mod count)?).
_steps = st.lists(
    st.tuples(
        st.floats(0, 3, allow_nan=False),
        st.booleans(),
        st.none() | st.integers(0, 10_000),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0.0, 0.25, 1.0, 2.5]), _steps)
def test_entries_expire_when_their_own_timer_would_and_never_once_settled(
    seconds: float, steps: list[tuple[float, bool, int | None]]
) -> None:
    fake = _FakeLoop()
    queue = DeadlineQueue(_loop(fake), seconds)
    expired: list[tuple[int, float]] = []
    entries: list[_Entry] = []
    added_at: dict[int, float] = {}
    settled_by_hand: set[int] = set()
    for step, add, settle in steps:
        fake.advance(fake.now + step)
        if add:
            entry = _Entry(fake, queue, len(entries), expired)
            entries.append(entry)
            added_at[entry.name] = fake.now
            queue.add(entry)
        if settle is not None and entries and queue.settle(entries[settle % len(entries)]):
            settled_by_hand.add(entries[settle % len(entries)].name)
        live = sum(1 for entry in entries if not entry.settled)
        # Bounded: twice the live entries and the slack below which it never compacts, plus
        # the one just added; never a deadline's worth of settled ones.
        assert len(queue) <= 2 * live + _MIN_COMPACT + 1
    fake.advance(fake.now + seconds + 1)
    for name, at in expired:
        assert name not in settled_by_hand
        # On time: at its deadline, or within the granularity the queue allows for.
        assert added_at[name] + seconds - 0.001 <= at <= added_at[name] + seconds + 1e-9
    assert {name for name, _ in expired} | settled_by_hand == set(added_at)
    assert len(queue) == 0 and fake.armed() == 0


def test_one_timer_for_many_entries_and_settled_ones_do_not_pile_up() -> None:
    fake = _FakeLoop()
    queue = DeadlineQueue(_loop(fake), 60.0)
    expired: list[tuple[int, float]] = []
    slow = _Entry(fake, queue, -1, expired)  # waits the whole deadline: the others are behind it
    queue.add(slow)
    for name in range(100_000):
        entry = _Entry(fake, queue, name, expired)
        queue.add(entry)
        queue.settle(entry)  # answered at once
        fake.advance(fake.now + 0.0001)
        assert len(queue) <= 2 + _MIN_COMPACT + 1
        assert fake.armed() == 1
    fake.advance(61.0)
    assert expired == [(-1, 60.0)]
    assert len(queue) == 0 and fake.armed() == 0


def test_deadlines_keeps_a_queue_per_value_only_while_it_holds_entries() -> None:
    fake = _FakeLoop()
    deadlines = Deadlines()
    expired: list[tuple[int, float]] = []
    short, long = _Entry(fake, None, 1, expired), _Entry(fake, None, 2, expired)
    short.queue = deadlines.add(_loop(fake), 0.5, short)
    long.queue = deadlines.add(_loop(fake), 60.0, long)
    assert len(deadlines) == 2 and deadlines.held() == 2
    fake.advance(0.5)
    assert expired == [(1, 0.5)]
    assert len(deadlines) == 1
    assert long.queue.settle(long) and not long.queue.settle(long)
    fake.advance(60.0)
    assert expired == [(1, 0.5)]
    assert len(deadlines) == 0 and deadlines.held() == 0 and fake.armed() == 0


def test_close_stops_the_timers() -> None:
    fake = _FakeLoop()
    deadlines = Deadlines()
    expired: list[tuple[int, float]] = []
    entry = _Entry(fake, None, 1, expired)
    entry.queue = deadlines.add(_loop(fake), 1.0, entry)
    deadlines.close()
    fake.advance(2.0)
    assert expired == [] and len(deadlines) == 0 and fake.armed() == 0


async def test_fires_on_a_real_loop() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    class Waiting:
        settled = False

        def expire(self) -> None:
            done.set_result(None)

    deadlines = Deadlines()
    deadlines.add(loop, 0.01, Waiting())
    await asyncio.wait_for(done, 5)
    assert len(deadlines) == 0


async def test_answered_inline_requests_leave_no_deadline_entries_behind(relay: Relay) -> None:
    """On the relay: 200 inline requests answered one after the other hold at most the last
    one's entry (each add drops the settled ones before it), and one queue for the one
    deadline value in use."""

    async def handler(received: Received) -> Reply:
        return Reply(status=200, body=b"ok")

    deadlines = relay.server.http._deadlines
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
        async with httpx.AsyncClient(base_url=relay.http_url, timeout=30) as http:
            for _ in range(200):
                response = await http.get(
                    "/hc/x", headers={"ServiceBusAuthorization": relay.token("hc")}
                )
                assert response.status_code == 200
                assert deadlines.held() <= 1
    assert len(deadlines) == 1
