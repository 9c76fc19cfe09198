"""The edge (``-R``): listen on a hybrid connection, forward each stream to a configured route.

One listener per hybrid connection serves all of its routes. How a stream finds its route:

* **Plain** hybrid connection (a single route without a port name): no preamble; every
  stream goes to that route.
* **Named** hybrid connection (one or more routes with port names): every stream must open
  with the azbridge preamble. The port name selects one of the configured routes; an unknown
  name closes the stream (azbridge does the same, without a reply), a version other than 1.0
  gets ``[0,0,0]``, and a stream/datagram mismatch ``[0,0,1]`` / ``[0,0,255]``.

Nothing a sender or the relay says can make the edge dial anything but a configured
destination: the port name is only ever a key into the route table.

The listener reconnects by itself (SDK); if it cannot be opened at all, or closes for good,
the edge opens a new one on the SDK's backoff schedule. Several edges on one hybrid
connection share its senders (the relay spreads them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from hybridrelay.bridge.config import BridgeConfig, RemoteForward
from hybridrelay.bridge.ingress import describe_failure
from hybridrelay.bridge.listening import EdgeListener, keep_listening
from hybridrelay.bridge.pipe import (
    ConnectionGroup,
    RelayStream,
    SocketLeg,
    close_stream,
    pipe,
)
from hybridrelay.bridge.preamble import read_preamble
from hybridrelay.bridge.specs import Protocol as Transport
from hybridrelay.bridge.udp import serve_udp_destination
from hybridrelay.client.backoff import RECONNECT_DELAYS
from hybridrelay.exceptions import ProtocolError, RelayError
from hybridrelay.observability.bridge_metrics import ForwardMetrics, Outcome
from hybridrelay.protocol.azbridge import Mode, Preamble, Reply, encode_reply

__all__ = ["Edge", "EdgeListener", "ListenerFactory"]

logger = logging.getLogger("hybridrelay.bridge")


#: Builds a listener; the argument is the accept handler (it rejects when the edge is full).
ListenerFactory = Callable[[Callable[[Any], bool | None]], EdgeListener]


class Edge:
    """Serves all ``-R`` routes of one hybrid connection.

    ``metrics`` are the hybrid connection's series: each relayed connection's outcome and
    bytes (the listener's own status is recorded by the listener factory's caller).
    """

    def __init__(
        self,
        hybrid_connection: str,
        routes: Sequence[RemoteForward],
        config: BridgeConfig,
        listener_factory: ListenerFactory,
        *,
        metrics: ForwardMetrics,
        retry_schedule: Sequence[float] = RECONNECT_DELAYS,
    ) -> None:
        if not routes:
            raise ValueError("an edge needs at least one route")
        self.hybrid_connection = hybrid_connection
        self.config = config
        self._metrics = metrics
        self._factory = listener_factory
        self._schedule = retry_schedule
        self._named = routes[0].spec.port_name is not None
        self._routes = {r.spec.port_name: r for r in routes}
        self._name = f"-R {hybrid_connection}"
        self._limit = max(config.max_connections_of(r) for r in routes)
        self._group: ConnectionGroup | None = None
        self._stop = asyncio.Event()
        self._udp_flows: dict[str, int] = {}

    async def serve(self, started: Callable[[], None], stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set; then stop accepting and drain the open streams."""
        self._stop = stop
        async with ConnectionGroup(self._name, self._limit) as group:
            self._group = group

            def online() -> None:
                routes = ", ".join(self._describe_route(r) for r in self._routes.values())
                logger.info("%s: listening for %s", self._name, routes)

            async def on_stream(stream: RelayStream) -> None:
                group.spawn(self._handle(stream), name=f"edge-{stream.id}")

            async def drain() -> None:
                # Still registered, but rejecting (503) until the drain is done.
                await group.drain(self.config.shutdown_grace_period)

            await keep_listening(
                self._name,
                lambda: self._factory(self._admit),
                stop=stop,
                started=started,
                online=online,
                on_stream=on_stream,
                drain=drain,
                schedule=self._schedule,
            )
            await group.drain(self.config.shutdown_grace_period)

    def _describe_route(self, route: RemoteForward) -> str:
        name = route.spec.port_name
        return f"{name + ' -> ' if name else ''}{route.spec.target_text()}"

    def _admit(self, ctx: Any) -> bool | None:
        if self._stop.is_set():
            ctx.reject(503, "bridge shutting down")
            self._metrics.outcome(Outcome.REFUSED_DRAINING)
            return False
        group = self._group
        if group is not None and group.full:
            ctx.reject(503, "bridge at capacity")
            self._metrics.outcome(Outcome.REFUSED_CAPACITY)
            return False
        return True

    async def _handle(self, stream: RelayStream) -> None:
        try:
            route, initial = await self._select_route(stream)
        except (RelayError, TimeoutError) as exc:
            logger.warning(
                "%s: relay connection %s: handshake failed: %s",
                self._name,
                stream.id,
                describe_failure(exc),
            )
            self._metrics.outcome(Outcome.HANDSHAKE_FAILED)
            await close_stream(stream, 1002 if isinstance(exc, ProtocolError) else 1000)
            return
        except BaseException:
            await close_stream(stream, 1001, "bridge shutting down")
            raise
        if route is None:
            return  # _select_route answered and closed
        if route.spec.protocol is Transport.UDP:
            key = route.spec.port_name or ""
            if self._udp_flows.get(key, 0) >= self.config.max_udp_flows_of(route):
                logger.warning(
                    "%s: relay connection %s: max_udp_flows reached", self._name, stream.id
                )
                self._metrics.outcome(Outcome.REFUSED_CAPACITY)
                await close_stream(stream, 1013, "too many UDP flows")
                return
            self._udp_flows[key] = self._udp_flows.get(key, 0) + 1
            try:
                await serve_udp_destination(
                    stream, route, self.config, initial, self._name, self._stop, self._metrics
                )
            finally:
                self._udp_flows[key] -= 1
            return
        await self._forward_stream(stream, route, initial)

    async def _select_route(self, stream: RelayStream) -> tuple[RemoteForward | None, bytes]:
        if not self._named:
            return self._routes[None], b""
        async with asyncio.timeout(self.config.handshake_timeout):
            result, rest = await read_preamble(stream)
            if result is None:
                self._metrics.outcome(Outcome.HANDSHAKE_FAILED)  # closed before its preamble
                await close_stream(stream)
                return None, b""
            if isinstance(result, Reply):
                logger.warning(
                    "%s: relay connection %s: not an azbridge 1.0 preamble", self._name, stream.id
                )
                await self._refuse(stream, result)
                return None, b""
            route = self._route_for(result)
            if route is None:
                logger.warning(
                    "%s: relay connection %s: unknown port name %r; closing",
                    self._name,
                    stream.id,
                    result.port_name[:64],
                )
                self._metrics.outcome(Outcome.PORT_REFUSED)
                await close_stream(stream, 1008, "unknown port name")
                return None, b""
            is_udp = route.spec.protocol is Transport.UDP
            if is_udp and result.mode is not Mode.DATAGRAM:
                await self._refuse(stream, Reply.NOT_A_STREAM_PORT)
                return None, b""
            if not is_udp and result.mode is not Mode.STREAM:
                await self._refuse(stream, Reply.NOT_A_DATAGRAM_PORT)
                return None, b""
            await stream.write(encode_reply(Reply.accept(result.mode)))
            return route, rest

    def _route_for(self, preamble: Preamble) -> RemoteForward | None:
        return self._routes.get(preamble.port_name)

    async def _refuse(self, stream: RelayStream, reply: Reply) -> None:
        logger.warning(
            "%s: relay connection %s refused: %s", self._name, stream.id, reply.describe()
        )
        self._metrics.outcome(Outcome.PORT_REFUSED)
        await stream.write(encode_reply(reply))
        await close_stream(stream)

    async def _forward_stream(
        self, stream: RelayStream, route: RemoteForward, initial: bytes
    ) -> None:
        spec = route.spec
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                if spec.protocol is Transport.UNIX:
                    assert spec.path is not None
                    _, leg = await loop.create_unix_connection(SocketLeg, spec.path)
                else:
                    _, leg = await loop.create_connection(
                        SocketLeg, spec.host or "localhost", spec.port
                    )
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            logger.warning(
                "%s: relay connection %s: cannot reach %s: %s",
                self._name,
                stream.id,
                spec.target_text(),
                why,
            )
            timed_out = isinstance(exc, TimeoutError)
            self._metrics.outcome(
                Outcome.DESTINATION_TIMEOUT if timed_out else Outcome.DESTINATION_UNREACHABLE
            )
            await close_stream(stream, 1011, "destination unreachable")
            return
        except BaseException:
            await close_stream(stream, 1001, "bridge shutting down")
            raise
        # One INFO line per connection (at its end) keeps logging off the hot path.
        logger.debug("%s: relay connection %s -> %s", self._name, stream.id, spec.target_text())
        # The socket is the destination's: what it sent (bytes_up) went to the relay.
        stats = await pipe(leg, stream, self._metrics, initial=initial)
        logger.info(
            "%s: relay connection %s -> %s closed%s: %d bytes to the destination, %d back, %.1f s",
            self._name,
            stream.id,
            spec.target_text(),
            f" ({stats.error})" if stats.error else "",
            stats.bytes_down,
            stats.bytes_up,
            stats.duration,
        )
