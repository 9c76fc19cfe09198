"""A destination that is down, refusing, or slow to accept (issue 17, "Faults to survive").

A ``bridge -R`` edge forwards each relayed connection to a local port. What a sender sees:

* the port is closed (connection refused): the stream is closed at once with 1011
  "destination unreachable";
* the port never accepts (its accept queue is full, so the kernel drops the SYNs): the same
  1011, once the edge's ``connect_timeout`` has passed;
* no edge is online at all: the SDK sender's connect fails (404 "no listeners"), and a
  ``bridge -L`` client's socket is closed;
* the destination accepts late (its application calls ``accept`` after a delay, the
  kernel has completed the handshake): nothing fails, the bytes written meanwhile arrive.

The times are logged for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from hybridrelay.client import HybridConnectionClient, SharedAccessKeyTokenProvider
from hybridrelay.exceptions import RelayError
from tests.bridge.helpers import make_config, read_until_closed, running
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay

report = logging.getLogger("tests.reliability")

CONNECT_TIMEOUT = 0.5


def _client(relay: Relay) -> HybridConnectionClient:
    return HybridConnectionClient(
        f"ws://127.0.0.1:{relay.server.port}",
        "hc",
        SharedAccessKeyTokenProvider(ROOT_KEY_NAME, ROOT_KEY),
    )


@contextmanager
def closed_port() -> Iterator[int]:
    """A port that is bound but not listening: connections to it are refused."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    try:
        yield int(probe.getsockname()[1])
    finally:
        probe.close()


@contextmanager
def listening_never_accepting() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops further SYNs, a connect hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):  # backlog 0 holds one or two completed handshakes on Linux
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.fail("the accept queue never filled")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def _sender_sees(relay: Relay, port: int) -> tuple[int | None, str, float]:
    """Open a stream through an edge forwarding to ``port``: its close code, reason, delay."""
    config = make_config(
        relay, remote=[f"hc:127.0.0.1:{port}"], document={"connect_timeout": CONNECT_TIMEOUT}
    )
    async with running(config), _client(relay) as client:
        stream = await client.create_connection()
        started = time.monotonic()
        await stream.write(b"hello")
        async with asyncio.timeout(10):
            assert await stream.read() == b""
        elapsed = time.monotonic() - started
        await stream.aclose()
        return stream.close_code, stream.close_reason, elapsed


@pytest.mark.timeout(30)
async def test_a_refusing_destination_closes_the_stream_at_once_with_1011(relay: Relay) -> None:
    with closed_port() as port:
        code, reason, elapsed = await _sender_sees(relay, port)
    report.info("destination refusing: 1011 after %.3f s", elapsed)
    assert (code, reason) == (1011, "destination unreachable")
    assert elapsed < 1.0


@pytest.mark.timeout(30)
async def test_a_destination_that_never_accepts_fails_after_connect_timeout(
    relay: Relay,
) -> None:
    with listening_never_accepting() as port:
        code, reason, elapsed = await _sender_sees(relay, port)
    report.info(
        "destination never accepting: 1011 after %.3f s (connect_timeout %.1f s)",
        elapsed,
        CONNECT_TIMEOUT,
    )
    assert (code, reason) == (1011, "destination unreachable")
    assert CONNECT_TIMEOUT * 0.9 <= elapsed < CONNECT_TIMEOUT + 1.5


@pytest.mark.timeout(30)
async def test_a_destination_that_accepts_late_gets_every_byte(relay: Relay) -> None:
    """The kernel completes the handshake (the connection waits in the accept queue): the
    stream opens, and what the sender wrote before the late ``accept`` arrives intact."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = int(server.getsockname()[1])
    config = make_config(relay, remote=[f"hc:127.0.0.1:{port}"])
    loop = asyncio.get_running_loop()
    try:
        async with running(config), _client(relay) as client:
            stream = await client.create_connection()
            payload = bytes(range(256)) * 64
            await stream.write(payload)
            await stream.write_eof()
            await asyncio.sleep(1.0)  # the delay under test: the destination has not accepted
            conn, _ = await loop.sock_accept(server)
            with conn:
                received = b""
                async with asyncio.timeout(10):
                    while chunk := await loop.sock_recv(conn, 65536):
                        received += chunk
                await loop.sock_sendall(conn, b"late but here")
            async with asyncio.timeout(10):
                reply = b""
                while chunk := await stream.read():
                    reply += chunk
            await stream.aclose()
    finally:
        server.close()
    assert received == payload
    assert reply == b"late but here"


@pytest.mark.timeout(30)
async def test_no_edge_online_fails_the_sender_and_the_local_client_promptly(
    relay: Relay,
) -> None:
    async with _client(relay) as client:
        started = time.monotonic()
        with pytest.raises(RelayError, match="404|[Nn]o listener"):
            await client.create_connection()
        sdk_elapsed = time.monotonic() - started
    config = make_config(relay, local=["0:hc"])
    async with running(config) as agent:
        host, port = agent.ingress_address(0)[:2]
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        writer.write(b"hello")
        try:
            data = await read_until_closed(reader)
        except ConnectionResetError:
            data = b""
        local_elapsed = time.monotonic() - started
        writer.close()
    report.info(
        "no edge online: SDK sender refused after %.3f s, bridge -L client closed after %.3f s",
        sdk_elapsed,
        local_elapsed,
    )
    assert data == b""
    assert sdk_elapsed < 1.0 and local_elapsed < 1.0
