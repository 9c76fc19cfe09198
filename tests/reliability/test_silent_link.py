"""A link that goes silent (issue 17, "Faults to survive"): packets stop, no FIN, no RST.

A small proxy of our own sits between an SDK listener and the relay and is paused: it stops
forwarding in both directions while keeping both TCP connections open, which is what a cut
cable or a dead NAT entry looks like to each end. Keep-alive must detect it on both ends within
its configured interval (pings every ``INTERVAL`` s; a missing pong fails the link), the relay
must stop routing to the listener and release it, and the listener must come back once the path
works again. The detection times are logged for docs/RELIABILITY.md.

The same proxy between a sender and the relay (an SDK sender, and a ``bridge -L`` agent): the
relay pings a relayed connection's leg it has heard nothing from (transport/splice.py), drops
it when it stays silent, and closes the other leg with 1011, so the listener's end (and a
``bridge -R`` edge's destination connection) is released too. A healthy idle connection and a
sender that stops reading while the listener keeps writing are not dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Any

import pytest

from hybridrelay import HybridConnectionListener
from hybridrelay.bridge.config import merge_cli, parse_config
from hybridrelay.client import HybridConnectionClient, HybridConnectionStream
from tests.bridge.helpers import make_config, running, tcp_server
from tests.conftest import Relay, RelayFactory, eventually
from tests.e2e import test_node_interop as node_interop

report = logging.getLogger("tests.reliability")

INTERVAL = 0.5
#: A ping's interval, then its pong's deadline (at most the interval again), plus scheduling.
DETECTED_WITHIN = 3 * INTERVAL + 1.0


class PausableProxy:
    """Forwards TCP to ``port``; :meth:`pause` stops every byte both ways, sending nothing."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.running = asyncio.Event()
        self.running.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, up_writer]
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while True:
                await self.running.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self.running.wait()  # bytes read just before the pause are held too
                writer.write(data)
                await writer.drain()
        with suppress(ConnectionError, RuntimeError):
            writer.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()


@pytest.mark.timeout(60)
async def test_keep_alive_detects_a_silent_link_on_both_ends(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"keep_alive_interval": INTERVAL}) as relay:
        proxy = PausableProxy(relay.server.port)
        proxy_port = await proxy.start()
        connection_string = relay.connection_string("hc").replace(
            f":{relay.server.port}/", f":{proxy_port}/"
        )
        listener = HybridConnectionListener.from_connection_string(
            connection_string, keep_alive_interval=INTERVAL
        )
        changes: list[tuple[float, str]] = []
        listener.on_status(lambda status, _: changes.append((time.monotonic(), status)))
        try:
            await listener.open()
            broker = relay.server.broker
            await eventually(lambda: broker.listener_count("hc") == 1)
            proxy.pause()
            paused_at = time.monotonic()
            await eventually(lambda: broker.listener_count("hc") == 0, DETECTED_WITHIN + 5)
            relay_detected = time.monotonic() - paused_at
            await eventually(
                lambda: any(t > paused_at and s != "online" for t, s in changes),
                DETECTED_WITHIN + 5,
            )
            listener_detected = next(t for t, s in changes if t > paused_at) - paused_at
            report.info(
                "silent link (keep-alive %.1f s): the relay dropped the listener after %.2f s, "
                "the listener noticed after %.2f s",
                INTERVAL,
                relay_detected,
                listener_detected,
            )
            assert relay_detected <= DETECTED_WITHIN
            assert listener_detected <= DETECTED_WITHIN
            proxy.resume()  # the path works again: the listener is back by itself
            await eventually(lambda: broker.listener_count("hc") == 1, 15)
            await eventually(lambda: listener.status == "online", 15)
        finally:
            await listener.aclose()
            await proxy.aclose()


def _drop(stream: HybridConnectionStream) -> None:
    """End a test's stream at once (``aclose`` waits for a close answer a silent link never
    brings)."""
    stream._socket.abort()


def _through(relay: Relay, proxy_port: int) -> str:
    return relay.connection_string("hc").replace(f":{relay.server.port}/", f":{proxy_port}/")


async def echo_pair(
    relay: Relay,
    sender_connection_string: str,
    listener_connection_string: str | None = None,
    **client_options: Any,
) -> tuple[HybridConnectionListener, HybridConnectionClient, HybridConnectionStream, Any]:
    """An SDK listener (direct, or by ``listener_connection_string``) and a sender
    (``sender_connection_string``, with ``client_options``) with one open stream that has
    carried a byte: (listener, client, sender's stream, listener's stream)."""
    listener = HybridConnectionListener.from_connection_string(
        listener_connection_string or relay.connection_string("hc")
    )
    await listener.open()
    client = HybridConnectionClient.from_connection_string(
        sender_connection_string, **client_options
    )
    await client.__aenter__()
    stream = await client.create_connection()
    async with asyncio.timeout(10):
        far = await listener.accept_connection()
    assert far is not None
    await stream.write(b"x")
    async with asyncio.timeout(10):
        assert await far.read() == b"x"
    return listener, client, stream, far


@pytest.mark.timeout(60)
async def test_the_relay_drops_a_sender_whose_link_went_silent(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"keep_alive_interval": INTERVAL}) as relay:
        proxy = PausableProxy(relay.server.port)
        proxy_port = await proxy.start()
        listener, client, stream, far = await echo_pair(relay, _through(relay, proxy_port))
        try:
            assert len(relay.server._legs.connections()) == 1
            proxy.pause()
            paused_at = time.monotonic()
            async with asyncio.timeout(DETECTED_WITHIN + 5):
                assert await far.read() == b""  # the listener's end is closed by the relay
            detected = time.monotonic() - paused_at
            report.info(
                "silent sender link (keep-alive %.1f s): the relay dropped it and closed the "
                "listener's end (%s) after %.2f s",
                INTERVAL,
                far.close_code,
                detected,
            )
            assert far.close_code == 1011
            assert detected <= DETECTED_WITHIN
            await far.aclose()  # answers the relay's close: both legs are gone
            await eventually(lambda: len(relay.server._legs) == 0)
        finally:
            _drop(far)
            _drop(stream)
            await client.__aexit__(None, None, None)
            await listener.aclose()
            await proxy.aclose()


@pytest.mark.timeout(60)
async def test_live_idle_and_stalled_readers_are_not_dropped(make_relay: RelayFactory) -> None:
    """Over four keep-alive intervals: an idle connection (answering the relay's pings), and
    a sender that reads nothing while its listener writes until the relay stops reading it
    (backpressure all the way) keep their connections, and the stalled one gets every byte."""
    async with make_relay(limits={"keep_alive_interval": INTERVAL}) as relay:
        conn = relay.connection_string("hc")
        listener, client, idle, idle_far = await echo_pair(relay, conn)
        stalled = await client.create_connection()
        async with asyncio.timeout(10):
            writer = await listener.accept_connection()
        assert writer is not None
        chunk = b"\xab" * 65536
        written = 0

        async def write_until_blocked() -> None:
            nonlocal written
            while True:
                await writer.write(chunk)
                written += len(chunk)

        pump = asyncio.create_task(write_until_blocked())
        try:
            await asyncio.sleep(4 * INTERVAL + 1.0)  # the span under test, not a readiness wait
            assert not pump.done()
            assert len(relay.server._legs.connections()) == 2
            await idle.write(b"still here")
            async with asyncio.timeout(10):
                assert await idle_far.read() == b"still here"
            pump.cancel()
            received = 0
            async with asyncio.timeout(20):
                while received < written - len(chunk):
                    received += len(await stalled.read())
        finally:
            pump.cancel()
            for stream in (idle, idle_far, stalled, writer):
                _drop(stream)
            await client.__aexit__(None, None, None)
            await listener.aclose()


@pytest.mark.timeout(60)
async def test_a_silent_bridge_ingress_link_releases_the_edge_and_its_destination(
    make_relay: RelayFactory,
) -> None:
    """client -> bridge -L -> (silent) -> relay -> bridge -R -> destination: the relay drops
    the -L agent's leg, the edge gets 1011 and closes its destination connection."""
    async with make_relay(limits={"keep_alive_interval": INTERVAL}) as relay:
        proxy = PausableProxy(relay.server.port)
        proxy_port = await proxy.start()
        closed = asyncio.Event()

        async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(1))
            await writer.drain()
            await reader.read()  # until the edge closes this connection
            closed.set()
            writer.close()

        async with tcp_server(destination) as dest:
            edge = make_config(relay, remote=[f"hc:127.0.0.1:{dest.port}"])
            ingress = merge_cli(
                parse_config({"shutdown_grace_period": 2}),
                ["-x", _through(relay, proxy_port), "-L", "0:hc"],
            )
            async with running(edge), running(ingress) as agent:
                host, port = agent.ingress_address(0)[:2]
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"?")
                async with asyncio.timeout(10):
                    assert await reader.readexactly(1) == b"?"
                proxy.pause()
                paused_at = time.monotonic()
                async with asyncio.timeout(DETECTED_WITHIN + 5):
                    await closed.wait()
                detected = time.monotonic() - paused_at
                report.info(
                    "silent bridge -L link (keep-alive %.1f s): the edge's destination "
                    "connection closed after %.2f s",
                    INTERVAL,
                    detected,
                )
                assert detected <= DETECTED_WITHIN
                await eventually(lambda: len(relay.server._legs) == 0)
                writer.transport.abort()
                await proxy.aclose()


@pytest.mark.node
@pytest.mark.skipif(node_interop._MISSING is not None, reason=node_interop._MISSING or "")
@pytest.mark.timeout(60)
async def test_a_hyco_ws_rendezvous_answers_the_relays_pings() -> None:
    """Microsoft's hyco-ws listener (ws@1) answers the pings the relay sends on an idle
    relayed connection by itself: after four keep-alive intervals of silence it still echoes."""
    async with (
        node_interop.running_relay(limits={"keep_alive_interval": INTERVAL}) as server,
        node_interop.node_script(
            "ws-listener.js",
            "--url",
            node_interop.listen_url(server),
            env={"HYCO_KEY": node_interop.KEY},
        ) as node,
    ):
        await node.expect("ready")
        client = HybridConnectionClient(
            server.base_url, node_interop.ENTITY, node_interop.token_provider()
        )
        async with client, await client.create_connection() as stream:
            plan: list[bytes | str] = ["before", b"idle"]
            node_interop.assert_same_messages(await node_interop.echo_messages(stream, plan), plan)
            await asyncio.sleep(4 * INTERVAL + 1.0)  # idling is the point: 4 pings' worth
            plan = ["after", b"idle"]
            node_interop.assert_same_messages(await node_interop.echo_messages(stream, plan), plan)
