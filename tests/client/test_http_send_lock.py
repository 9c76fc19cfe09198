"""Inline answers on the control channel (client/http.py): sent without the send lock when
nobody holds it, yet a paused transport still holds the other answers back (backpressure:
they wait for the lock instead of piling up in its buffer). Driven on our own socket over a
transport that records what is written."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hybridrelay.client.http import HttpRequestDispatcher, RelayedHttpContext
from hybridrelay.protocol.messages import Request
from hybridrelay.transport.frames_ws import FrameSocket
from tests.conftest import eventually
from tests.server.test_http_leg import FakeTransport

pytestmark = [pytest.mark.timeout(30), pytest.mark.both_loops]


def _contexts(socket: FrameSocket, lock: asyncio.Lock, count: int) -> list[RelayedHttpContext]:
    def spawn(coro: Any, name: str) -> asyncio.Task[None]:
        raise AssertionError("nothing is spawned here")

    dispatcher = HttpRequestDispatcher(
        connector=None,  # type: ignore[arg-type]  # no rendezvous here
        spawn=spawn,
        get_handler=lambda: None,
        get_control=lambda: socket,
        send_lock=lock,
        listener_id="test",
    )
    return [
        RelayedHttpContext(
            dispatcher,
            Request("ws://relay/$hc/hc", f"id{i}", "/hc/x", "GET", {}),
            b"",
            control=socket,
            rendezvous=None,
        )
        for i in range(count)
    ]


async def _socket() -> tuple[FrameSocket, FakeTransport]:
    socket = FrameSocket(2**20)
    transport = FakeTransport()
    socket.connection_made(transport)
    socket.open(None)
    return socket, transport


async def test_answers_go_out_without_waiting_when_the_transport_takes_them() -> None:
    socket, transport = await _socket()
    lock = asyncio.Lock()
    contexts = _contexts(socket, lock, 3)
    for ctx in contexts:
        await ctx.write(b"body")
        await asyncio.wait_for(ctx.finish(), 5)
    await eventually(lambda: len(transport.written) > 0)  # written at the end of the turn
    assert not lock.locked()
    assert all(ctx.finished for ctx in contexts)


async def test_a_paused_transport_holds_the_other_answers_back() -> None:
    socket, transport = await _socket()
    lock = asyncio.Lock()
    first, second = _contexts(socket, lock, 2)
    socket.pause_writing()  # over the transport's high-water mark
    await first.write(b"first")
    draining = asyncio.create_task(first.finish())
    await eventually(lambda: lock.locked() and len(transport.written) > 0)
    written = len(transport.written)
    await second.write(b"second")
    waiting = asyncio.create_task(second.finish())
    for _ in range(10):
        await asyncio.sleep(0)
    # The first answer waits for the drain holding the lock; the second waits for the lock,
    # unwritten.
    assert not draining.done() and not waiting.done()
    assert len(transport.written) == written
    socket.resume_writing()
    await asyncio.wait_for(asyncio.gather(draining, waiting), 5)
    await eventually(lambda: len(transport.written) > written)
    assert not lock.locked()
