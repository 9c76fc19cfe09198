"""``bridge/deadline.py``: a deadline set per request on one timer moved lazily.

Times are short but the assertions are about order (never before the deadline, once, not
after a clear), never about speed."""

from __future__ import annotations

import asyncio

import pytest

from hybridrelay.bridge.deadline import LazyDeadline

pytestmark = [pytest.mark.timeout(30), pytest.mark.both_loops]


def _deadline() -> tuple[LazyDeadline, list[float], asyncio.Event]:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    event = asyncio.Event()

    def callback() -> None:
        fired.append(loop.time())
        event.set()

    return LazyDeadline(loop, callback), fired, event


async def test_it_fires_once_not_before_the_deadline() -> None:
    deadline, fired, event = _deadline()
    at = asyncio.get_running_loop().time() + 0.05
    deadline.set(at)
    assert deadline.pending
    await asyncio.wait_for(event.wait(), 10)
    await asyncio.sleep(0.1)
    assert len(fired) == 1 and fired[0] >= at
    assert not deadline.pending


async def test_a_deadline_moved_later_fires_at_the_last_one_only() -> None:
    loop = asyncio.get_running_loop()
    deadline, fired, event = _deadline()
    deadline.set(loop.time() + 0.05)
    last = loop.time() + 0.05
    for step in range(1, 6):  # moved later while the first timer is armed
        last = loop.time() + 0.05 + 0.03 * step
        deadline.set(last)
    await asyncio.wait_for(event.wait(), 10)
    await asyncio.sleep(0.1)
    assert len(fired) == 1 and fired[0] >= last


async def test_a_deadline_moved_earlier_fires_at_the_earlier_time() -> None:
    loop = asyncio.get_running_loop()
    deadline, fired, event = _deadline()
    deadline.set(loop.time() + 60)
    early = loop.time() + 0.05
    deadline.set(early)
    await asyncio.wait_for(event.wait(), 10)
    assert len(fired) == 1 and early <= fired[0] < early + 30


async def test_clear_and_cancel_stop_it() -> None:
    loop = asyncio.get_running_loop()
    cleared, fired_cleared, _ = _deadline()
    cancelled, fired_cancelled, _ = _deadline()
    control, _, control_fired = _deadline()
    for deadline in (cleared, cancelled, control):
        deadline.set(loop.time() + 0.05)
    cleared.clear()
    cancelled.cancel()
    assert not cleared.pending and not cancelled.pending
    await asyncio.wait_for(control_fired.wait(), 10)  # the same time has passed for all
    await asyncio.sleep(0.05)
    assert fired_cleared == [] and fired_cancelled == []


async def test_set_again_after_it_fired() -> None:
    loop = asyncio.get_running_loop()
    deadline, fired, event = _deadline()
    deadline.set(loop.time() + 0.02)
    await asyncio.wait_for(event.wait(), 10)
    event.clear()
    again = loop.time() + 0.02
    deadline.set(again)
    await asyncio.wait_for(event.wait(), 10)
    assert len(fired) == 2 and fired[1] >= again
