"""transport/control_leg.py and ControlChannel's sends on it (D23): a listener's control channel
on the relay's frame path. Whole messages handed to a sink in order, the limits and framing
checks with their close codes, keep-alive as aiohttp's ``heartbeat=`` did it, the close
handshake, and writes that wait (or refuse to) while the transport is full."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hybridrelay.server.channel as channel_module
import hybridrelay.transport.control_leg as control_leg_module
from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    close_payload,
)
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.http_relay import CONTROL_MAX_MESSAGE
from hybridrelay.transport.control_leg import ControlLeg
from tests.conftest import Relay, eventually
from tests.server.test_http_leg import FakeTransport, feed
from tests.server.test_relay_websocket import AUTH
from tests.server.test_splice import RawWebSocket
from tests.wsframes import client_frame

LISTEN = "/$hc/hc?sb-hc-action=listen"


class Sink:
    """Records what the leg hands over, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, object]] = []

    def on_text(self, text: str) -> None:
        self.got.append(("text", text))

    def on_binary(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.got.append(("binary", data))

    def on_close(self, code: int, reason: str) -> None:
        self.got.append(("close", code))


def server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """The relay's (unmasked) frames in ``data``, decoded here from RFC 6455 5.2."""
    frames = []
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        assert not second & 0x80, "server frames are not masked"
        n, pos = second & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        frames.append((bool(first & 0x80), first & 0x0F, data[pos : pos + n]))
        pos += n
    return frames


def started(
    max_message_size: int = 4096, keep_alive: float | None = None
) -> tuple[ControlLeg, FakeTransport, Sink]:
    transport = FakeTransport()
    leg = ControlLeg(transport, max_message_size=max_message_size, keep_alive=keep_alive)
    sink = Sink()
    leg.start(sink)
    return leg, transport, sink


@pytest.mark.timeout(10)
async def test_whole_messages_in_order_pings_answered_and_the_close_reported() -> None:
    leg, transport, sink = started()
    assert not transport.paused
    body = os.urandom(3000)
    wire = (
        client_frame(OP_TEXT, b'{"resp', fin=False)
        + client_frame(OP_PING, b"hi")  # between the fragments of a message
        + client_frame(OP_CONTINUATION, b'onse":{}}')
        + client_frame(OP_BINARY, body[:1000], fin=False)
        + client_frame(OP_CONTINUATION, body[1000:])
        + client_frame(OP_BINARY, b"")
        + client_frame(OP_TEXT, "é".encode())
        + client_frame(OP_CLOSE, close_payload(1000, "bye"))
    )
    for start in range(0, len(wire), 7):  # frames split anywhere
        feed(leg, wire[start : start + 7])
    assert sink.got == [
        ("text", '{"response":{}}'),
        ("binary", body),
        ("binary", b""),
        ("text", "é"),
        ("close", 1000),
    ]
    assert server_frames(bytes(transport.written)) == [(True, OP_PONG, b"hi")]
    assert leg.close_received and not transport.closed  # the channel answers, not the leg
    leg.close_nowait(1000)  # the answer: both close frames went by, the connection goes
    assert server_frames(bytes(transport.written))[-1] == (True, OP_CLOSE, close_payload(1000))
    assert transport.closed


@pytest.mark.timeout(10)
async def test_what_came_with_the_upgrade_is_delivered_at_start() -> None:
    transport = FakeTransport()
    leg = ControlLeg(transport, max_message_size=4096, keep_alive=None)
    leg.feed_data(client_frame(OP_TEXT, b"early"))  # aiohttp hands over what it had read
    sink = Sink()
    assert transport.paused
    leg.start(sink)
    assert sink.got == [("text", "early")] and not transport.paused


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (client_frame(OP_BINARY, b"x" * 5000), 1009),
        (
            client_frame(OP_TEXT, b"x" * 3000, fin=False)
            + client_frame(OP_CONTINUATION, b"x" * 3000),
            1009,
        ),
        (client_frame(OP_TEXT, b"unmasked", masked=False), 1002),
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),
    ],
    ids=["binary-too-big", "fragmented-text-too-big", "unmasked", "not-utf8"],
)
async def test_a_violation_closes_with_its_code(wire: bytes, code: int) -> None:
    leg, transport, sink = started(max_message_size=4096)
    feed(leg, client_frame(OP_TEXT, b"before") + wire + client_frame(OP_TEXT, b"after"))
    assert sink.got == [("text", "before"), ("close", code)]
    frames = server_frames(bytes(transport.written))
    assert frames[-1][1] == OP_CLOSE and int.from_bytes(frames[-1][2][:2], "big") == code
    assert transport.closed


@pytest.mark.timeout(10)
async def test_what_is_written_in_one_turn_goes_in_one_write() -> None:
    leg, transport, _ = started()
    writes: list[bytes] = []
    transport.write = lambda data: writes.append(bytes(data))  # type: ignore[method-assign]
    leg.write_message('{"request":{}}', b"body")
    leg.write_message("alone")
    assert writes == []  # at the end of this turn of the event loop
    await asyncio.sleep(0)
    assert len(writes) == 1
    assert server_frames(writes[0]) == [
        (True, OP_TEXT, b'{"request":{}}'),
        (True, OP_BINARY, b"body"),
        (True, OP_TEXT, b"alone"),
    ]
    big = os.urandom(200_000)  # past the batch's bound: written at once
    leg.write_message("head", big)
    assert server_frames(b"".join(writes[1:])) == [(True, OP_TEXT, b"head"), (True, OP_BINARY, big)]
    leg.write_message("before the close")
    leg.close_nowait(1001)  # the batch goes first
    assert [f[1] for f in server_frames(b"".join(writes[2:]))] == [OP_TEXT, OP_CLOSE]
    with pytest.raises(RelayConnectionError):
        leg.write_message("after the close frame")


@pytest.mark.timeout(10)
async def test_keep_alive_pings_a_silent_peer_and_drops_it_without_a_pong() -> None:
    leg, transport, sink = started(keep_alive=0.05)
    await eventually(lambda: (True, OP_PING, b"") in server_frames(bytes(transport.written)))
    await eventually(lambda: transport.closed)
    assert sink.got == [("close", 1006)]
    assert all(opcode != OP_CLOSE for _, opcode, _ in server_frames(bytes(transport.written)))


@pytest.mark.timeout(10)
async def test_keep_alive_takes_any_bytes_as_the_answer() -> None:
    leg, transport, sink = started(keep_alive=0.05)

    def pings() -> int:
        return sum(
            1 for _, opcode, _ in server_frames(bytes(transport.written)) if opcode == OP_PING
        )

    def more_pings_than(n: int) -> Callable[[], bool]:
        return lambda: pings() > n

    for answered in range(3):
        await eventually(more_pings_than(answered))
        # A pong, or any message: the peer is alive (aiohttp's heartbeat counted any data).
        feed(leg, client_frame(OP_PONG if answered % 2 else OP_TEXT, b""))
    assert not transport.closed
    assert ("close", 1006) not in sink.got


class _StillClock(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it (:attr:`now`): a loop's
    clock may stand still across a turn of the loop (uvloop's is libuv's, cached for each turn
    in whole milliseconds), so what is read in the turn that sent a ping bears the ping's time."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now


class _SignallingSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.text = asyncio.Event()

    def on_text(self, text: str) -> None:
        super().on_text(text)
        self.text.set()


async def _answered_in_the_pings_own_clock_time(clock: _StillClock) -> list[tuple[str, object]]:
    """A leg (keep-alive 30 s) on a real connection: the peer answers its first ping while the
    clock still reads the ping's time; a whole interval later the leg must ping again rather
    than have dropped the connection. What the sink got."""
    sink = _SignallingSink()
    legs: list[ControlLeg] = []
    accepted = asyncio.Event()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # as hand_over() gives it
            leg = ControlLeg(transport, max_message_size=4096, keep_alive=30.0)
            transport.set_protocol(leg)
            leg.start(sink)
            legs.append(leg)
            accepted.set()

    server = await asyncio.get_running_loop().create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await accepted.wait()
        clock.now += 30  # silent for an interval: the leg pings
        assert await reader.readexactly(2) == bytes((0x80 | OP_PING, 0))
        # The pong, and a message to know it was read (the clock has not moved since the ping).
        writer.write(client_frame(OP_PONG) + client_frame(OP_TEXT, b"alive"))
        await sink.text.wait()
        clock.now += 30  # the pong's deadline (15 s) has passed, and a whole silent interval
        try:
            second = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            second = b"(dropped)"
        assert second == bytes((0x80 | OP_PING, 0)), "the answered channel was dropped"
        return list(sink.got)  # before the clean-up ends the channel
    finally:
        writer.close()
        for leg in legs:
            leg.abort()
        server.close()


@pytest.mark.timeout(10)
def test_keep_alive_takes_an_answer_read_while_the_clock_still_reads_the_pings_time() -> None:
    """Found by the cluster bench (PERFORMANCE.md): under uvloop the relay dropped the idle
    ``-R`` agent 15 s after its first ping, its pong (and its own ping) having been read in
    the same millisecond of the loop's clock as our ping went out. Real sockets on port 0;
    the loop's clock is the test's (the test's timeout is pytest's: this clock stands still)."""
    clock = _StillClock()
    try:
        got = clock.run_until_complete(_answered_in_the_pings_own_clock_time(clock))
    finally:
        clock.close()
    assert got == [("text", "alive")]


@pytest.mark.timeout(10)
async def test_aclose_waits_for_the_answer_and_not_longer_than_the_close_wait() -> None:
    leg, transport, sink = started()
    closing = asyncio.create_task(leg.aclose(1012, "draining"))
    await eventually(lambda: leg.close_sent)
    assert not closing.done() and not transport.closed
    feed(leg, client_frame(OP_CLOSE, close_payload(1012)))
    async with asyncio.timeout(5):
        await closing
    assert transport.closed and sink.got == [("close", 1012)]

    silent, silent_transport, _ = started()
    silent.close_wait = 0.05  # the listener never answers
    async with asyncio.timeout(5):
        await silent.aclose(1001, "shutting down")
    assert silent_transport.closed


# -- ControlChannel's sends on the leg ------------------------------------------------------------


def channel_on(leg: ControlLeg) -> ControlChannel:
    return ControlChannel("hc", "l1", leg, 0.0, "127.0.0.1", "ws://relay")


@pytest.mark.timeout(10)
async def test_send_nowait_writes_now_or_not_at_all() -> None:
    leg, transport, _ = started()
    channel = channel_on(leg)
    assert channel.send_nowait("one", b"1")
    leg.pause_writing()
    assert not channel.send_nowait("two")  # the transport is full: nothing written
    waiting = asyncio.create_task(channel.send("two", b"2"))
    await eventually(lambda: channel.queued == 1)
    leg.resume_writing()
    async with asyncio.timeout(5):
        await waiting
    await asyncio.sleep(0)  # the turn's batch is written
    assert channel.queued == 0
    assert [f[2] for f in server_frames(bytes(transport.written))] == [b"one", b"1", b"two", b"2"]
    channel.usable = False
    assert not channel.send_nowait("three")
    with pytest.raises(RelayConnectionError):
        await channel.send("three")


@pytest.mark.timeout(10)
async def test_a_waiting_send_is_never_overtaken() -> None:
    leg, transport, _ = started()
    channel = channel_on(leg)
    leg.pause_writing()
    first = asyncio.create_task(channel.send("first"))
    await eventually(lambda: channel.queued == 1)
    leg.resume_writing()  # the first is about to be written, but has not run yet
    assert not channel.send_nowait("second")
    second = asyncio.create_task(channel.send("second"))
    async with asyncio.timeout(5):
        await asyncio.gather(first, second)
    await asyncio.sleep(0)  # the turn's batch is written
    assert [f[2] for f in server_frames(bytes(transport.written))] == [b"first", b"second"]


@pytest.mark.timeout(10)
async def test_a_send_that_cannot_go_in_time_drops_the_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(channel_module, "_SEND_TIMEOUT", 0.05)
    leg, transport, _ = started()
    channel = channel_on(leg)
    leg.pause_writing()  # the listener stopped reading
    with pytest.raises(RelayConnectionError):
        await channel.send("accept")
    assert not channel.usable and transport.closed
    assert not channel.send_nowait("more")


# -- on a relay ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_message_over_the_control_limit_closes_the_channel_with_1009(relay: Relay) -> None:
    control = await RawWebSocket.open(relay, LISTEN, {AUTH: relay.token("hc")})
    try:
        await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
        control.send(OP_BINARY, b"x" * (CONTROL_MAX_MESSAGE + 1))
        # Refused from the frame's header: the close frame comes before the payload is read
        # (what was not read makes the relay's close a reset, after the close frame).
        assert (await control.close_frame())[0] == 1009
        assert relay.server.broker.listener_count("hc") == 0
    finally:
        control.abort()


@pytest.mark.timeout(30)
async def test_the_listeners_close_is_answered_with_its_code(relay: Relay) -> None:
    control = await RawWebSocket.open(relay, LISTEN, {AUTH: relay.token("hc")})
    try:
        await eventually(lambda: relay.server.broker.listener_count("hc") == 1)
        control.send(OP_CLOSE, close_payload(4000, "done"))
        assert (await control.close_frame())[0] == 4000
        assert await control.at_eof()
        assert relay.server.broker.listener_count("hc") == 0
    finally:
        control.abort()


def _read_by_leg(
    wire: bytes, cuts: list[int], fast: bool
) -> tuple[list[tuple[str, object]], bytes, bool]:
    """What a leg hands its sink, writes and whether it closed, for ``wire`` read in pieces
    cut at ``cuts``: with the fast path for whole frames, or with the general reader alone."""

    async def run() -> tuple[list[tuple[str, object]], bytes, bool]:
        with pytest.MonkeyPatch.context() as patch:
            if not fast:
                patch.setattr(control_leg_module, "whole_client_frames", lambda *args: ([], 0))
            leg, transport, sink = started(max_message_size=300)
            start = 0
            for end in [*sorted({c for c in cuts if 0 < c < len(wire)}), len(wire)]:
                feed(leg, wire[start:end])
                start = end
            leg._flush()
            return sink.got, bytes(transport.written), transport.closed

    return asyncio.run(run())


_PAYLOADS = st.one_of(st.text(max_size=20).map(str.encode), st.binary(max_size=20))
_WIRE = st.lists(
    st.one_of(
        st.builds(client_frame, st.sampled_from([OP_TEXT, OP_BINARY]), _PAYLOADS),
        st.builds(  # around the limit (300) and the 16-bit length (126)
            client_frame,
            st.sampled_from([OP_TEXT, OP_BINARY]),
            st.integers(100, 400).map(lambda n: b"x" * n),
        ),
        st.builds(client_frame, st.just(OP_TEXT), _PAYLOADS, fin=st.just(False)),
        st.builds(client_frame, st.just(OP_CONTINUATION), _PAYLOADS, fin=st.booleans()),
        st.builds(client_frame, st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=5)),
        st.builds(client_frame, st.just(OP_TEXT), _PAYLOADS, masked=st.just(False)),
        st.builds(
            client_frame, st.just(OP_CLOSE), st.sampled_from([b"", close_payload(1000), b"\x03"])
        ),
    ),
    max_size=8,
).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(wire=_WIRE, cuts=st.lists(st.integers(0, 1000), max_size=4))
def test_the_fast_path_for_whole_frames_changes_nothing_the_leg_does(
    wire: bytes, cuts: list[int]
) -> None:
    # Messages, their order, invalid UTF-8 (1007), sizes over the limit (1009), unmasked
    # frames and bad close frames (1002), pings answered, the close: the same either way.
    fast = _read_by_leg(wire, cuts, True)
    assert fast == _read_by_leg(wire, cuts, False)
