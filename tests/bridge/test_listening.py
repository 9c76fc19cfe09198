"""keep_listening (bridge/listening.py): how accepted streams are handed on, and how stop
interrupts the accepting without dropping a stream that is being handed over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hybridrelay.bridge.listening import keep_listening

pytestmark = [pytest.mark.timeout(10), pytest.mark.both_loops]


class FakeListener:
    """Streams put in ``incoming`` are accepted in order."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    async def open(self) -> None:
        pass

    async def accept_connection(self) -> Any:
        return await self.incoming.get()

    async def aclose(self) -> None:
        self.closed = True


async def run(listener: FakeListener, stop: asyncio.Event, on_stream: Any) -> asyncio.Task[None]:
    async def drain() -> None:
        pass

    return asyncio.create_task(
        keep_listening(
            "-R test",
            lambda: listener,
            stop=stop,
            started=lambda: None,
            online=lambda: None,
            on_stream=on_stream,
            drain=drain,
        )
    )


async def test_streams_are_handed_on_in_order_until_stop() -> None:
    listener, stop, seen = FakeListener(), asyncio.Event(), []
    handed = asyncio.Event()

    async def on_stream(stream: Any) -> None:
        seen.append(stream)
        if len(seen) == 3:
            handed.set()

    task = await run(listener, stop, on_stream)
    for name in ("a", "b", "c"):
        listener.incoming.put_nowait(name)
    await handed.wait()
    stop.set()  # while the accepting waits for a fourth stream
    async with asyncio.timeout(5):
        await task
    assert seen == ["a", "b", "c"] and listener.closed


async def test_stop_during_a_hand_over_lets_it_finish() -> None:
    listener, stop = FakeListener(), asyncio.Event()
    entered, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def on_stream(stream: Any) -> None:  # like -H closing an unexpected stream
        entered.set()
        await release.wait()
        finished.set()

    task = await run(listener, stop, on_stream)
    listener.incoming.put_nowait("s")
    await entered.wait()
    stop.set()
    for _ in range(20):  # turns of the loop for keep_listening to see the stop meanwhile
        await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(5):
        await task
    assert finished.is_set()  # not cancelled half-way
