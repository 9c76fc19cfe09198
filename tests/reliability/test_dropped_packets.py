"""A link that goes silent, with its packets really dropped (issue 17, "Faults to survive").

Each test joins the processes under test by a veth link into a network namespace of its
own (tests/reliability/netns.py) and, mid-connection, makes the link throw away every
packet both ways: no FIN, no RST, the senders are told their packets went out. Every hop is
covered, and each end that keeps a timer must find the link dead by itself within a bound
and release what it held:

* a WebSocket hop (an SDK listener's control channel, a sender's or a ``bridge -L`` agent's
  stream, a ``bridge -R`` edge's stream): keep-alive at ``INTERVAL``; pings after an interval
  of silence, the drop after another; while bytes wait to go out, the drop when nothing was
  acknowledged for an interval at two checks in a row. Bound: ``3 × INTERVAL + 1 s``.
* a raw TCP hop (a client of the relay's own ``ingress:`` port, or of a ``bridge -L`` port):
  the kernel's keep-alive probes (first after ``RAW_INTERVAL`` s, three more a second apart)
  while idle, the acknowledgement watch while data waits. Bound: probes' 4 s + 1 s.

The relay runs in this process; for the WebSocket hops its listening socket is made inside
the namespace and its clients reach it over the links (one link to drop, another that keeps
working); for the raw hops the client's socket is made inside the namespace. The detection
times are logged (``-o log_cli=true --log-cli-level=INFO``) for docs/RELIABILITY.md.
``python3 -m pytest -m soak tests/reliability/test_dropped_packets.py`` adds a run with
200 connections over the silent link, all of which must be released.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import pytest

from hybridrelay import HybridConnectionListener
from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import BridgeConfig, merge_cli, parse_config
from hybridrelay.client import HybridConnectionStream
from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.tcp_keepalive import KEEPALIVE_PROBES, send_queued, tcp_info
from tests.bridge.helpers import running, tcp_server
from tests.conftest import Relay, RelayFactory, eventually
from tests.reliability.netns import Link, Namespace, network_namespace, unavailable
from tests.reliability.test_silent_link import echo_pair

pytestmark = pytest.mark.timeout(60)

report = logging.getLogger("tests.reliability")

INTERVAL = 0.5
#: A ping after an interval of silence, the drop after the next, plus scheduling.
DETECTED_WITHIN = 3 * INTERVAL + 1.0
#: The kernel's keep-alive takes whole seconds.
RAW_INTERVAL = 1.0
#: The first probe after an interval, three more a second apart, plus scheduling.
RAW_DETECTED_WITHIN = RAW_INTERVAL + KEEPALIVE_PROBES * 1.0 + 1.0
CHUNK = b"\xcd" * 65536


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    """A namespace with two links; skipped (saying why) where none can be made, failed
    instead with ``HYBRIDRELAY_REQUIRE_NETNS=1`` (CI)."""
    reason = unavailable()
    if reason is not None:
        if os.environ.get("HYBRIDRELAY_REQUIRE_NETNS") == "1":
            pytest.fail(f"{reason} (HYBRIDRELAY_REQUIRE_NETNS=1)")
        pytest.skip(reason)
    with network_namespace(links=2) as made:
        yield made


@asynccontextmanager
async def relay_inside(
    make_relay: RelayFactory, namespace: Namespace, interval: float = INTERVAL
) -> AsyncIterator[Relay]:
    """A relay whose listening socket lives in ``namespace`` (on all its addresses)."""
    async with AsyncExitStack() as stack:
        with namespace.entered():
            relay = await stack.enter_async_context(
                make_relay(host="0.0.0.0", limits={"keep_alive_interval": interval})
            )
        yield relay


def via(relay: Relay, link: Link, entity: str = "hc") -> str:
    """The connection string of ``relay`` reached over ``link``."""
    return relay.connection_string(entity).replace("127.0.0.1", link.ns_ip)


def bridge(connection_string: str, *args: str, interval: float = INTERVAL) -> BridgeConfig:
    document = {"shutdown_grace_period": 2, "connect_timeout": 10, "keep_alive_interval": interval}
    return merge_cli(parse_config(document), ["-x", connection_string, *args])


def log(what: str, seconds: float) -> None:
    report.info("dropped packets: %s after %.2f s", what, seconds)


async def ends(reader: asyncio.StreamReader, within: float) -> float:
    """Until the connection is closed or reset (data before that is read and dropped): the
    monotonic time it ended."""
    async with asyncio.timeout(within):
        with suppress(ConnectionError):
            while await reader.read(65536):
                pass
    return time.monotonic()


async def keep_writing(writer: asyncio.StreamWriter, pause: float = 0.0) -> None:
    """Write until the connection fails; ``pause`` seconds after each chunk."""
    with suppress(ConnectionError, RuntimeError):
        while True:
            writer.write(CHUNK)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)


class Destination:
    """A TCP server for a ``bridge -R`` edge: echoes the first byte, then (with ``write``)
    writes until it cannot; :attr:`closed` is set when the edge ends the connection."""

    def __init__(self, *, write: bool = False) -> None:
        self.write = write
        self.closed = asyncio.Event()
        self.closed_at = 0.0
        self.writers: list[asyncio.StreamWriter] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            writer.write(await reader.readexactly(1))
            await writer.drain()
            if self.write:
                pump = asyncio.create_task(keep_writing(writer))
                await ends(reader, 60)
                pump.cancel()
            else:
                await ends(reader, 60)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not self.closed.is_set():
                self.closed_at = time.monotonic()
            self.closed.set()
            writer.transport.abort()


async def open_in(
    namespace: Namespace, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from inside ``namespace`` to ``host:port``."""
    sock = namespace.socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(10):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def window_closed(transports: list[Any]) -> bool:
    """Whether the one connection in ``transports`` has bytes to send and none in flight:
    its peer's window is closed."""
    info = tcp_info(transports[0].get_extra_info("socket")) if len(transports) == 1 else None
    return info is not None and info.unacked == 0 and send_queued(transports[0])


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"?")
    async with asyncio.timeout(10):
        assert await reader.readexactly(1) == b"?"


# -- the WebSocket hops ------------------------------------------------------------------------


async def test_a_listener_and_the_relay_both_notice(
    make_relay: RelayFactory, namespace: Namespace
) -> None:
    link = namespace.links[0]
    async with relay_inside(make_relay, namespace) as relay:
        listener = HybridConnectionListener.from_connection_string(
            via(relay, link), keep_alive_interval=INTERVAL
        )
        changes: list[tuple[float, str]] = []
        listener.on_status(lambda status, _: changes.append((time.monotonic(), status)))
        broker = relay.server.broker
        try:
            await listener.open()
            await eventually(lambda: broker.listener_count("hc") == 1)
            link.drop()
            dropped = time.monotonic()
            await eventually(lambda: broker.listener_count("hc") == 0, DETECTED_WITHIN + 5)
            by_relay = time.monotonic() - dropped
            await eventually(
                lambda: any(t > dropped and s != "online" for t, s in changes), DETECTED_WITHIN + 5
            )
            by_listener = next(t for t, s in changes if t > dropped) - dropped
            log("the relay dropped the listener's control channel", by_relay)
            log("the listener found its control channel dead", by_listener)
            assert by_relay <= DETECTED_WITHIN
            assert by_listener <= DETECTED_WITHIN
            link.restore()  # the listener comes back by itself
            await eventually(lambda: broker.listener_count("hc") == 1, 20)
        finally:
            with suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await listener.aclose()


async def _stream_ended(stream: HybridConnectionStream) -> float:
    """Read ``stream`` until it ends: the monotonic time it did."""
    async with asyncio.timeout(DETECTED_WITHIN + 5):
        with suppress(RelayConnectionError):
            while await stream.read():
                pass
    return time.monotonic()


@pytest.mark.parametrize("queued", [False, True], ids=["idle", "queued"])
async def test_a_sender_and_the_relay_both_notice(
    make_relay: RelayFactory, namespace: Namespace, queued: bool
) -> None:
    """Mid-stream, the sender's link goes silent: the relay drops its leg and closes the
    listener's end (1011); the sender's stream ends too. ``queued``: the listener keeps
    writing, so the relay's leg to the sender has bytes waiting (no ping can pass them)."""
    sender_link, listener_link = namespace.links
    async with relay_inside(make_relay, namespace) as relay:
        listener, client, stream, far = await echo_pair(
            relay, via(relay, sender_link), via(relay, listener_link), keep_alive_interval=INTERVAL
        )
        pump: asyncio.Task[None] | None = None
        # The sender reads all along (a live reader): what is in flight at the drop is lost.
        sender_ended = asyncio.create_task(_stream_ended(stream))
        try:
            if queued:

                async def write() -> None:
                    with suppress(RelayConnectionError):
                        while True:
                            await far.write(CHUNK)

                pump = asyncio.create_task(write())
                await asyncio.sleep(0.2)  # the span of data flowing before the drop
            sender_link.drop()
            dropped = time.monotonic()
            async with asyncio.timeout(DETECTED_WITHIN + 5):
                by_relay = await _stream_ended(far) - dropped
            by_sender = await sender_ended - dropped
            what = "with bytes queued to it" if queued else "idle"
            log(f"the relay dropped a sender's leg ({what}), closing the listener's end", by_relay)
            log(f"the sender found its stream dead ({what})", by_sender)
            assert far.close_code == 1011
            assert by_relay <= DETECTED_WITHIN
            assert by_sender <= DETECTED_WITHIN
            await far.aclose()  # answers the relay's close: both legs are gone
            await eventually(lambda: len(relay.server._legs) == 0)
        finally:
            sender_ended.cancel()
            if pump is not None:
                pump.cancel()
            for end in (far, stream):
                end._socket.abort()
            await client.aclose()
            with suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await listener.aclose()


@asynccontextmanager
async def bridged(
    make_relay: RelayFactory,
    namespace: Namespace,
    destination: Destination,
    agent_link: Link,
    edge_link: Link,
    interval: float = INTERVAL,
) -> AsyncIterator[tuple[Relay, BridgeAgent]]:
    """A relay in ``namespace``, a ``bridge -R`` edge to ``destination`` over ``edge_link``
    and a ``bridge -L`` agent (on loopback here) over ``agent_link``: (relay, agent)."""
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(relay_inside(make_relay, namespace, interval))
        dest = await stack.enter_async_context(tcp_server(destination))
        edge = bridge(via(relay, edge_link), "-R", f"hc:127.0.0.1:{dest.port}", interval=interval)
        await stack.enter_async_context(running(edge))
        ingress = bridge(via(relay, agent_link), "-L", "127.0.0.1:0:hc", interval=interval)
        yield relay, await stack.enter_async_context(running(ingress))


@pytest.mark.parametrize("sending", [False, True], ids=["idle", "sending"])
async def test_a_bridge_l_agent_and_the_relay_both_notice(
    make_relay: RelayFactory, namespace: Namespace, sending: bool
) -> None:
    """client -> bridge -L -> (silent link) -> relay -> bridge -R -> destination: the -L
    agent closes its client's connection by itself, and releases the stream; the relay
    drops the agent's leg and the edge closes its destination connection. ``sending``: the
    client keeps writing, so the agent has bytes waiting for the relay."""
    agent_link, edge_link = namespace.links
    destination = Destination()
    async with bridged(make_relay, namespace, destination, agent_link, edge_link) as (
        relay,
        agent,
    ):
        reader, writer = await asyncio.open_connection(*agent.ingress_address(0)[:2])
        pump = None
        try:
            await hello(reader, writer)
            if sending:
                # Paced (3 MiB/s): at full speed the relay would first have to forward what
                # it had already read (the agent's leg is judged from then on).
                pump = asyncio.create_task(keep_writing(writer, pause=0.02))
                await asyncio.sleep(0.2)  # the span of data flowing before the drop
            agent_link.drop()
            dropped = time.monotonic()
            by_agent = await ends(reader, DETECTED_WITHIN + 5) - dropped
            async with asyncio.timeout(DETECTED_WITHIN + 5):
                await destination.closed.wait()
            by_relay = destination.closed_at - dropped
            what = "sending" if sending else "idle"
            log(f"the bridge -L agent closed its client ({what})", by_agent)
            log(
                f"the relay dropped the agent's leg, the edge closed its destination ({what})",
                by_relay,
            )
            assert by_agent <= DETECTED_WITHIN
            assert by_relay <= DETECTED_WITHIN
            ingress = agent.ingress[0]
            await eventually(lambda: ingress._group is not None and len(ingress._group) == 0)
            await eventually(lambda: len(relay.server._legs) == 0)
        finally:
            if pump is not None:
                pump.cancel()
            writer.transport.abort()


async def test_a_bridge_r_edge_and_the_relay_both_notice(
    make_relay: RelayFactory, namespace: Namespace
) -> None:
    """client -> bridge -L -> relay -> (silent link) -> bridge -R -> destination: the edge
    closes its destination connection by itself; the relay drops the edge's leg, and the -L
    agent closes its client's connection."""
    edge_link, agent_link = namespace.links
    destination = Destination()
    async with bridged(make_relay, namespace, destination, agent_link, edge_link) as (
        relay,
        agent,
    ):
        reader, writer = await asyncio.open_connection(*agent.ingress_address(0)[:2])
        ended: asyncio.Task[float] | None = None
        try:
            await hello(reader, writer)
            edge_link.drop()
            dropped = time.monotonic()
            ended = asyncio.create_task(ends(reader, DETECTED_WITHIN + 5))
            async with asyncio.timeout(DETECTED_WITHIN + 5):
                await destination.closed.wait()
            by_edge = destination.closed_at - dropped
            by_relay = await ended - dropped
            log("the bridge -R edge closed its destination connection", by_edge)
            log("the relay dropped the edge's leg, the -L agent closed its client", by_relay)
            assert by_edge <= DETECTED_WITHIN
            assert by_relay <= DETECTED_WITHIN
            await eventually(lambda: len(relay.server._legs) == 0)
            # The path works again: the edge's listener, reconnecting meanwhile, comes back
            # (and the bridge's shutdown does not wait for a connect into the void).
            edge_link.restore()
            await eventually(lambda: relay.server.broker.listener_count("hc") == 1, 20)
        finally:
            if ended is not None:
                ended.cancel()
            writer.transport.abort()


# -- the raw TCP hops ------------------------------------------------------------------------


@asynccontextmanager
async def raw_hop(
    hop: str, make_relay: RelayFactory, link: Link, destination: Destination
) -> AsyncIterator[tuple[int, Callable[[], bool], Callable[[], list[Any]]]]:
    """A relay and a ``bridge -R`` edge to ``destination``, and the raw TCP port under test
    bound on ``link`` (keep-alive ``RAW_INTERVAL``): the relay's own ``ingress:`` port, or
    a ``bridge -L`` agent's. Yields the port, whether the connection's relayed stream and
    its task are released, and the transports the port accepted (the relay's only)."""
    local = (
        [] if hop == "bridge-l" else [{"listen": f"{link.host_ip}:0", "hybrid_connection": "hc"}]
    )
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            make_relay(ingress=local, limits={"keep_alive_interval": RAW_INTERVAL})
        )
        dest = await stack.enter_async_context(tcp_server(destination))
        remote = bridge(relay.connection_string(), "-R", f"hc:127.0.0.1:{dest.port}")
        await stack.enter_async_context(running(remote))
        legs = relay.server._legs
        if hop == "ingress":
            address = relay.server.ingress[0].address
            assert address is not None
            accepted = relay.server.ingress[0]._legs
            yield address[1], lambda: len(legs) == 0, lambda: [leg.transport for leg in accepted]
            return
        spec = f"{link.host_ip}:0:hc"
        agent = await stack.enter_async_context(
            running(bridge(relay.connection_string(), "-L", spec, interval=RAW_INTERVAL))
        )
        ingress = agent.ingress[0]
        yield (
            agent.ingress_address(0)[1],
            lambda: ingress._group is not None and len(ingress._group) == 0 and len(legs) == 0,
            list,
        )


@pytest.mark.parametrize(
    ("hop", "client"),
    [
        ("ingress", "idle"),
        ("ingress", "reading"),
        ("ingress", "not-reading"),
        ("bridge-l", "idle"),
        ("bridge-l", "reading"),
    ],
)
async def test_a_raw_tcp_port_drops_a_silent_client(
    make_relay: RelayFactory, namespace: Namespace, hop: str, client: str
) -> None:
    """A client of the relay's own ``ingress:`` port, or of a ``bridge -L`` port, in the
    namespace, goes silent: the port's owner drops the connection, and the edge's
    destination connection is closed. ``idle``: the kernel's keep-alive probes find it.
    ``reading``: the destination keeps writing and the client reads all along, so data is
    in flight at the drop; the acknowledgement watch finds it. ``not-reading``: the client
    has read nothing for a while, so its window is closed at the drop and nothing is in
    flight; the window probes going unanswered find it."""
    link = namespace.links[0]
    destination = Destination(write=client != "idle")
    async with raw_hop(hop, make_relay, link, destination) as (port, released, accepted):
        reader, writer = await open_in(namespace, link.host_ip, port)
        reading: asyncio.Task[float] | None = None
        try:
            await hello(reader, writer)
            if client == "reading":  # a live reader: what is in flight at the drop is lost
                reading = asyncio.create_task(ends(reader, 60))
                await asyncio.sleep(0.2)  # the span of data flowing before the drop
            elif client == "not-reading":  # until the relay's bytes wait behind a closed window
                await eventually(lambda: window_closed(accepted()), 10)
            link.drop()
            dropped = time.monotonic()
            async with asyncio.timeout(RAW_DETECTED_WITHIN + 5):
                await destination.closed.wait()
            detected = destination.closed_at - dropped
            owner = "the relay's ingress port" if hop == "ingress" else "a bridge -L port"
            log(f"{owner} dropped a silent client ({client})", detected)
            assert detected <= RAW_DETECTED_WITHIN
            await eventually(released)
        finally:
            if reading is not None:
                reading.cancel()
            writer.transport.abort()


SOAK_CONNECTIONS = 200
SOAK_INTERVAL = 2.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.soak
@pytest.mark.timeout(180)
async def test_many_bridge_connections_over_a_silent_link_are_all_released(
    make_relay: RelayFactory, namespace: Namespace
) -> None:
    """``SOAK_CONNECTIONS`` clients of a ``bridge -L`` agent whose link to the relay goes
    silent, half of them sending: every one is closed by the agent within the bound, the
    agent's connection tasks and the relay's legs are all released, and the process's open
    files return to what they were before the clients came."""
    agent_link, edge_link = namespace.links
    destination = Destination()
    within = 3 * SOAK_INTERVAL + 3.0  # and the time to close 200 connections at once
    async with bridged(
        make_relay, namespace, destination, agent_link, edge_link, SOAK_INTERVAL
    ) as (relay, agent):
        # One connection first: the SDK's warm connections and the relay's first rendezvous
        # are then part of the baseline.
        reader, writer = await asyncio.open_connection(*agent.ingress_address(0)[:2])
        await hello(reader, writer)
        writer.close()
        await eventually(lambda: len(relay.server._legs) == 0, 15)
        baseline = _open_fds()
        clients = []
        for _ in range(SOAK_CONNECTIONS):
            clients.append(await asyncio.open_connection(*agent.ingress_address(0)[:2]))
        await asyncio.gather(*(hello(r, w) for r, w in clients))
        pumps = [asyncio.create_task(keep_writing(w)) for _, w in clients[::2]]
        try:
            agent_link.drop()
            dropped = time.monotonic()
            by_agent = max(await asyncio.gather(*(ends(r, within + 5) for r, _ in clients)))
            by_agent -= dropped
            ingress = agent.ingress[0]
            await eventually(lambda: ingress._group is not None and len(ingress._group) == 0, 15)
            await eventually(lambda: len(relay.server._legs) == 0, 15)
            log(f"the bridge -L agent closed all {SOAK_CONNECTIONS} clients", by_agent)
            assert by_agent <= within
            for _, w in clients:
                w.transport.abort()
            await eventually(lambda: _open_fds() <= baseline + 3, 15)
        finally:
            for pump in pumps:
                pump.cancel()
            for _, w in clients:
                w.transport.abort()


def test_sockets_made_in_the_namespace_live_there(namespace: Namespace) -> None:
    """The helper itself: a socket made in the namespace can bind its address, one made
    here cannot (so the tests above really cross the link)."""
    inside = namespace.socket()
    outside = socket.socket()
    try:
        inside.bind((namespace.links[0].ns_ip, 0))
        with pytest.raises(OSError):
            outside.bind((namespace.links[0].ns_ip, 0))
    finally:
        inside.close()
        outside.close()
