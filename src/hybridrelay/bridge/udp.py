"""UDP forwarding, framed as azbridge frames it.

* One relayed stream per client flow (the client's source address), opened on its first
  datagram, with the azbridge preamble in datagram mode when the forward has a port name.
* Every datagram crosses the relay as a 2-byte big-endian length and the payload.
* A flow with no datagram either way for ``udp_idle_timeout`` seconds (azbridge: 4 minutes)
  is closed; at most ``max_udp_flows`` flows per forward exist at once. Datagrams of a new
  flow beyond the cap are dropped, as UDP may.
* Queues are bounded (:data:`FLOW_QUEUE`); when the relay is slower than the sender, datagrams
  are dropped rather than buffered without end.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hybridrelay.bridge.config import BridgeConfig, LocalForward, RemoteForward
from hybridrelay.bridge.ingress import Connect, describe_failure, format_address
from hybridrelay.bridge.pipe import READ_CHUNK, ConnectionGroup, RelayStream, close_stream
from hybridrelay.bridge.preamble import PreambleRejectedError, send_preamble
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.observability.bridge_metrics import (
    DropReason,
    ForwardMetrics,
    Outcome,
    relay_refusal,
)
from hybridrelay.protocol.azbridge import MAX_DATAGRAM, DatagramDecoder, Mode, encode_datagram
from hybridrelay.socket_errors import bind_failure

__all__ = ["FLOW_QUEUE", "FlowStats", "UdpIngress", "serve_udp_destination"]

logger = logging.getLogger("hybridrelay.bridge")

#: Datagrams waiting per flow and direction before new ones are dropped.
FLOW_QUEUE = 256


@dataclass
class FlowStats:
    """What one UDP flow carried: datagrams and their payload bytes (without the 2-byte
    framing), each way."""

    sent: int = 0  # to the relay
    received: int = 0  # from the relay
    bytes_sent: int = 0
    bytes_received: int = 0


class _Flow:
    def __init__(self, address: Any) -> None:
        self.address = address
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(FLOW_QUEUE)
        self.dropped = 0

    def offer(self, data: bytes) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.dropped += 1


class _Datagrams(asyncio.DatagramProtocol):
    """Hands each datagram to ``on_datagram``; an error (ICMP port unreachable and the like)
    is only logged: UDP gives no guarantees, the flow goes on."""

    def __init__(self, on_datagram: Callable[[bytes, Any], None], what: str) -> None:
        self._on_datagram = on_datagram
        self._what = what

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("%s error: %s", self._what, exc)


class UdpIngress:
    """Serves one ``-L ...udp`` forward; ``metrics`` are its series (each flow's outcome and
    bytes, datagrams dropped)."""

    def __init__(
        self,
        forward: LocalForward,
        config: BridgeConfig,
        connect: Connect,
        *,
        metrics: ForwardMetrics,
    ) -> None:
        self.forward = forward
        self.config = config
        self._connect = connect
        self._metrics = metrics
        self._name = f"-L {forward.spec}"
        self._flows: dict[Any, _Flow] = {}
        self._group: ConnectionGroup | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._idle = config.udp_idle_timeout_of(forward)
        self._stop = asyncio.Event()
        self.addresses: list[Any] = []
        #: Datagrams dropped because the flow cap was reached or the sender was not allowed.
        self.refused = 0
        self._no_flows = asyncio.Event()
        self._no_flows.set()

    @property
    def active_flows(self) -> int:
        return len(self._flows)

    async def wait_no_flows(self) -> None:
        """Return once no flow is open (all ended, for instance by the idle timeout)."""
        await self._no_flows.wait()

    async def serve(self, started: Callable[[], None], stop: asyncio.Event) -> None:
        """Receive datagrams until ``stop`` is set, then end the flows and close.

        Raises:
            ConfigurationError: the address cannot be bound.
        """
        self._stop = stop
        loop = asyncio.get_running_loop()
        spec = self.forward.spec
        limit = self.config.max_udp_flows_of(self.forward)
        async with ConnectionGroup(self._name, limit) as group:
            self._group = group
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self._datagram, "UDP socket"),
                    local_addr=(self.config.bind_host(self.forward) or "0.0.0.0", spec.port),
                )
            except OSError as exc:
                raise ConfigurationError(
                    f"{self._name}: "
                    + bind_failure(spec.endpoint_text(), exc, port_option="in the -L spec")
                ) from exc
            self._transport = transport
            try:
                self.addresses = [transport.get_extra_info("sockname")]
                logger.info(
                    "%s: listening on %s/udp", self._name, format_address(self.addresses[0])
                )
                started()
                await stop.wait()
            finally:
                # The flows see ``stop`` and end; the grace period covers their close.
                await group.drain(self.config.shutdown_grace_period)
                transport.close()

    def _datagram(self, data: bytes, addr: Any) -> None:
        flow = self._flows.get(addr)
        if flow is None:
            group = self._group
            host = addr[0] if isinstance(addr, tuple) else None
            if host is not None and not self.forward.allows(str(host)):
                self.refused += 1
                self._metrics.datagrams_dropped(DropReason.ALLOW_LIST)
                return
            if group is None or group.full:
                self.refused += 1
                self._metrics.datagrams_dropped(DropReason.MAX_FLOWS)
                if self.refused == 1 or self.refused % 1000 == 0:
                    logger.warning(
                        "%s: max_udp_flows reached; dropping datagrams of new flows (%d so far)",
                        self._name,
                        self.refused,
                    )
                return
            flow = _Flow(addr)
            self._flows[addr] = flow
            self._no_flows.clear()
            cid = uuid.uuid4().hex[:12]
            group.spawn(self._run_flow(flow, cid), name=f"udp-ingress-{cid}")
        flow.offer(data)

    async def _run_flow(self, flow: _Flow, cid: str) -> None:
        spec = self.forward.spec
        peer = format_address(flow.address)
        metrics = self._metrics
        stream: RelayStream | None = None
        try:
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    stream = await self._connect()
            except (RelayError, TimeoutError) as exc:
                metrics.outcome(relay_refusal(exc))
                raise
            initial = b""
            if spec.port_name is not None:
                try:
                    async with asyncio.timeout(self.config.handshake_timeout):
                        initial = await send_preamble(stream, spec.port_name, Mode.DATAGRAM)
                except (RelayError, TimeoutError) as exc:
                    refused = isinstance(exc, PreambleRejectedError)
                    metrics.outcome(Outcome.PORT_REFUSED if refused else Outcome.HANDSHAKE_FAILED)
                    raise
            logger.info(
                "%s: [%s] UDP flow %s -> relay connection %s", self._name, cid, peer, stream.id
            )
            stats = FlowStats()
            metrics.flow_opened()
            try:
                await _run_datagrams(
                    stream,
                    initial,
                    flow.queue,
                    lambda payload: self._send_to_client(payload, flow.address),
                    self._idle,
                    self._stop,
                    stats,
                )
            finally:
                metrics.flow_closed(stats.bytes_sent, stats.bytes_received, flow.dropped)
            logger.info(
                "%s: [%s] UDP flow %s ended: %d datagrams up, %d down, %d dropped",
                self._name,
                cid,
                peer,
                stats.sent,
                stats.received,
                flow.dropped,
            )
        except (RelayError, TimeoutError) as exc:
            logger.warning("%s: [%s] UDP flow %s: %s", self._name, cid, peer, describe_failure(exc))
        finally:
            self._flows.pop(flow.address, None)
            if not self._flows:
                self._no_flows.set()
            if stream is not None:
                await close_stream(stream)

    def _send_to_client(self, payload: bytes, address: Any) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.sendto(payload, address)


async def _run_datagrams(
    stream: RelayStream,
    initial: bytes,
    outgoing: asyncio.Queue[bytes],
    deliver: Callable[[bytes], None],
    idle_timeout: float,
    stop: asyncio.Event,
    stats: FlowStats,
) -> None:
    """Pump datagrams both ways until the stream ends, ``stop`` is set, or the flow idles;
    count them in ``stats`` as they go (the caller keeps the counts when this raises).

    Raises:
        RelayError: the stream broke.
    """
    loop = asyncio.get_running_loop()

    class _Done(Exception):
        pass

    async def to_relay(deadline: asyncio.Timeout) -> None:
        while True:
            payload = await outgoing.get()
            await stream.write(encode_datagram(payload))
            stats.sent += 1
            stats.bytes_sent += len(payload)
            deadline.reschedule(loop.time() + idle_timeout)

    async def stopped() -> None:
        await stop.wait()
        raise _Done  # local shutdown

    async def from_relay(deadline: asyncio.Timeout) -> None:
        decoder = DatagramDecoder()
        data = initial
        while True:
            for payload in decoder.feed(data):
                deliver(payload)
                stats.received += 1
                stats.bytes_received += len(payload)
                deadline.reschedule(loop.time() + idle_timeout)
            data = await stream.read(READ_CHUNK)
            if not data:
                raise _Done  # the other side ended the flow

    error: BaseException | None = None
    try:
        async with asyncio.timeout(idle_timeout) as deadline, asyncio.TaskGroup() as group:
            group.create_task(to_relay(deadline))
            group.create_task(from_relay(deadline))
            group.create_task(stopped())
    except* _Done:
        pass
    except* TimeoutError:
        pass  # idle: the normal end of a UDP flow
    except* (RelayError, OSError) as errors:
        error = errors.exceptions[0]
    if error is not None:
        raise error


async def serve_udp_destination(
    stream: RelayStream,
    route: RemoteForward,
    config: BridgeConfig,
    initial: bytes,
    name: str,
    stop: asyncio.Event,
    metrics: ForwardMetrics,
) -> None:
    """Edge side of one UDP flow: a connected UDP socket to the route's destination.

    Owns ``stream``: it is closed when this returns. ``metrics``: the edge's series (the
    flow's outcome, its bytes; to the relay is what the destination sent).
    """
    spec = route.spec
    assert spec.host is not None
    loop = asyncio.get_running_loop()
    flow = _Flow((spec.host, spec.port))

    def received(data: bytes, addr: Any) -> None:
        if data and len(data) <= MAX_DATAGRAM:
            flow.offer(data)

    try:
        async with asyncio.timeout(config.connect_timeout):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(received, "UDP destination"), remote_addr=(spec.host, spec.port)
            )
    except (OSError, TimeoutError) as exc:
        logger.warning(
            "%s: relay connection %s: cannot reach %s: %s", name, stream.id, spec.target_text(), exc
        )
        timed_out = isinstance(exc, TimeoutError)
        metrics.outcome(
            Outcome.DESTINATION_TIMEOUT if timed_out else Outcome.DESTINATION_UNREACHABLE
        )
        await close_stream(stream, 1011, "destination unreachable")
        return

    def deliver(payload: bytes) -> None:
        if not transport.is_closing():
            transport.sendto(payload)

    stats = FlowStats()
    metrics.flow_opened()
    try:
        await _run_datagrams(
            stream, initial, flow.queue, deliver, config.udp_idle_timeout_of(route), stop, stats
        )
        logger.info(
            "%s: relay connection %s (UDP %s) ended: %d datagrams to the relay, %d from it",
            name,
            stream.id,
            spec.target_text(),
            stats.sent,
            stats.received,
        )
    except RelayError as exc:
        logger.warning("%s: relay connection %s: %s", name, stream.id, exc)
    finally:
        metrics.flow_closed(stats.bytes_sent, stats.bytes_received, flow.dropped)
        transport.close()
        await close_stream(stream)
