"""The relay's HTTP front (server/sender_http.py) fed arbitrary bytes, in arbitrary pieces:
it never raises, and every request ends in one of three ways: relayed (an exchange starts),
handed to aiohttp with every byte from that request's first on, or still waiting for more."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridrelay.server.app import RelayServer
from hybridrelay.server.http_relay import HttpRelay, ResponseHead
from hybridrelay.server.sender_http import SenderFront, _SenderConnection
from tests.conftest import Relay, relay_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def running() -> Iterator[tuple[asyncio.AbstractEventLoop, Relay]]:
    """A relay in a loop of this test's own (hypothesis runs a sync test many times)."""
    loop = asyncio.new_event_loop()
    server = RelayServer(relay_config())
    loop.run_until_complete(server.__aenter__())
    try:
        yield loop, Relay(server, None)
    finally:
        loop.run_until_complete(server.__aexit__(None, None, None))
        loop.close()


class Transport:
    """What the front asks of its transport, recorded."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class Aiohttp(asyncio.Protocol):
    """Stands for aiohttp's protocol: what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data


def head(relay: Relay, target: str, extra: str = "") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"ServiceBusAuthorization: {relay.token('hc')}\r\n{extra}\r\n"
    ).encode()


PIECES = st.sampled_from(
    [
        b"GET /hc/a HTTP/1.1\r\n",
        b"POST /hc/a HTTP/1.1\r\n",
        b"GET /$hc/hc?sb-hc-action=listen HTTP/1.1\r\n",
        b"Host: 127.0.0.1\r\n",
        b"Content-Length: 3\r\n",
        b"Content-Length: 70000\r\n",
        b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Connection: close\r\n",
        b"X-\x00: \xff\r\n",
        b"\r\n",
        b"abc",
        b"\n",
        b"GARBAGE",
    ]
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    pieces=st.lists(st.one_of(PIECES, st.binary(max_size=40)), max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=8),
)
def test_any_bytes_in_any_pieces(
    running: tuple[asyncio.AbstractEventLoop, Relay], pieces: list[bytes], cuts: list[int]
) -> None:
    loop, relay = running
    loop.run_until_complete(_feed(relay, pieces, cuts))


async def _feed(relay: Relay, pieces: list[bytes], cuts: list[int]) -> None:
    stream = head(relay, "/hc/first") + b"".join(pieces)
    relayed: list[bytes] = []

    def relay_inline(sender: Any, entity: Any, headers: Any, target: str, body: bytes) -> None:
        relayed.append(body)
        sender.answer_head(ResponseHead(200, "OK", [("X-T", target)], None, True), b"done")
        sender.done()

    aiohttp_side = Aiohttp()
    front = SenderFront(relay.server._context, relay.server.http, lambda: aiohttp_side)
    # The real admission, a recording exchange.
    real = relay.server.http
    front.http = cast(HttpRelay, SimpleNamespace(refusal=real.refusal, relay_inline=relay_inline))
    connection = _SenderConnection(front)
    transport = Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    at = 0
    for cut in [*cuts, len(stream)]:
        if at >= len(stream) or transport.protocol is not None or transport.closed:
            break
        connection.data_received(stream[at : at + cut])
        at += cut
    # The first request is relayed (it is whole and valid, pipelined ahead of the rest).
    assert relayed and relayed[0] == b""
    for written in transport.written:
        assert written.startswith(b"HTTP/1.1 200 OK\r\n")
    if transport.protocol is not None:
        # aiohttp got the rest from the first byte the front did not answer: what it was
        # given plus what the front answered is the whole stream read so far.
        assert stream[:at].endswith(bytes(aiohttp_side.data))
    connection.close()


# Heads that share one headers list and heads that do not; each with a Date, so that the
# second a test runs in does not show in the bytes. The heads are module-level: each keeps its
# lines from one example to the next, as a listener's repeated head does.
_SHARED = [("Content-Type", "text/plain"), ("Date", "d"), ("Via", "1.1 r")]
_HEADS = [
    ResponseHead(200, "OK", _SHARED, None, True),
    ResponseHead(404, "OK", _SHARED, None, True),
    ResponseHead(200, None, _SHARED, None, True),
    ResponseHead(200, "Fine", _SHARED, None, True),
    ResponseHead(200, "OK", [("Date", "d"), ("Server", "up")], None, True),
    ResponseHead(200, "OK", [("Date", "d")], None, True),
    ResponseHead(204, "OK", [("Date", "d")], None, False),
]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_HEADS),
            st.sampled_from([b"1.0", b"1.1"]),
            st.booleans(),
            st.sampled_from(["GET", "HEAD"]),
            st.sampled_from([b"", b"body"]),
        ),
        max_size=10,
    )
)
def test_a_head_s_kept_lines_are_the_lines_made_anew(
    running: tuple[asyncio.AbstractEventLoop, Relay],
    answers: list[tuple[ResponseHead, bytes, bool, str, bytes]],
) -> None:
    """A response head keeps the lines the front made of it, per HTTP version
    (``ResponseHead.lines``): any sequence of answers with heads used again, on connections
    of either version and either keep-alive, writes the bytes that a copy of the head never
    written before makes."""
    loop, relay = running
    server = relay.server
    front = SenderFront(server._context, server.http, Aiohttp)

    def written(
        head: ResponseHead, version: bytes, keep_alive: bool, method: str, body: bytes
    ) -> bytes:
        connection = _SenderConnection(front)
        transport = Transport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.version, connection.keep_alive = version, keep_alive
        connection.write_response(head, body, method)
        connection.close()
        return b"".join(transport.written)

    async def play() -> None:
        for head, version, keep_alive, method, body in answers:
            copy = dataclasses.replace(head)
            assert not copy.lines  # a copy keeps no lines
            anew = written(copy, version, keep_alive, method, body)
            assert written(head, version, keep_alive, method, body) == anew

    loop.run_until_complete(play())
