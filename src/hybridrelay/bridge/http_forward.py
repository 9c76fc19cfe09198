"""HTTP forwards (``-H hc:http://host:port[/base]``): relayed HTTP requests to a local server.

One SDK listener per forward, with :class:`hybridrelay.http_proxy.HttpReverseProxy` as its
request handler: requests senders send to ``http(s)://relay/{hc}/{rest}?{query}`` go to
``{target}/{rest}?{query}`` (``Via`` and ``X-Forwarded-*`` added), and the answer streams back.
WebSocket senders on that hybrid connection are rejected with 501.

Like an edge (``-R``): the listener reconnects by itself (SDK); if it cannot be opened at all,
or closes for good, a new one is opened on the SDK's backoff schedule; the forward counts as
"up" once its listener was online. Shutdown: requests that arrive after it began are answered
503 while the ones in flight get ``shutdown_grace_period`` seconds to finish; then the
listener closes (which cuts whatever is left).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from hybridrelay.bridge.config import BridgeConfig, HttpForward
from hybridrelay.bridge.listening import EdgeListener, keep_listening
from hybridrelay.bridge.pipe import RelayStream, close_stream
from hybridrelay.client import RelayedHttpContext, RequestHandler
from hybridrelay.client.backoff import (
    RECONNECT_DELAYS,
)
from hybridrelay.http_proxy import HttpReverseProxy, relay_origin

__all__ = ["HttpForwarder", "HttpListenerFactory"]

logger = logging.getLogger("hybridrelay.bridge")

#: Builds a listener whose relayed HTTP requests go to the given handler (and whose WebSocket
#: senders are rejected with 501).
HttpListenerFactory = Callable[[RequestHandler], EdgeListener]


class HttpForwarder:
    """Serves one ``-H`` forward."""

    def __init__(
        self,
        forward: HttpForward,
        config: BridgeConfig,
        listener_factory: HttpListenerFactory,
        *,
        retry_schedule: Sequence[float] = RECONNECT_DELAYS,
    ) -> None:
        endpoint = config.connection.endpoint
        assert endpoint is not None
        relay_host, secure = relay_origin(endpoint)
        self.forward = forward
        self.config = config
        self._factory = listener_factory
        self._schedule = retry_schedule
        self._name = f"-H {forward.hybrid_connection}"
        self._limit = config.max_connections
        self._proxy = HttpReverseProxy(
            forward.target,
            entity_path=forward.hybrid_connection,
            relay_host=relay_host,
            secure=secure,
            connect_timeout=config.connect_timeout,
        )
        self._stop = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Requests being forwarded now."""
        return self._in_flight

    async def serve(self, started: Callable[[], None], stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set; then answer new requests 503 and drain the rest.

        Raises:
            RelayError: the relay refuses the listener in a way retrying cannot fix.
        """
        self._stop = stop

        def online() -> None:
            logger.info("%s: forwarding HTTP requests to %s", self._name, self._proxy.target)

        async def on_stream(stream: RelayStream) -> None:
            # Not expected: the accept handler rejects every WebSocket sender.
            await close_stream(stream, 1008, "HTTP requests only")

        async def drain() -> None:
            # Still registered, but answering 503, until the drain is done.
            await self._drain(self.config.shutdown_grace_period)

        try:
            await keep_listening(
                self._name,
                lambda: self._factory(self._handle),
                stop=stop,
                started=started,
                online=online,
                on_stream=on_stream,
                drain=drain,
                schedule=self._schedule,
            )
        finally:
            await self._proxy.aclose()

    async def _drain(self, grace: float) -> None:
        if self._in_flight:
            logger.info(
                "%s: waiting up to %.1f s for %d request(s) in flight",
                self._name,
                grace,
                self._in_flight,
            )
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            logger.warning(
                "%s: %d request(s) still in flight after the grace period; cutting them",
                self._name,
                self._in_flight,
            )

    async def _handle(self, ctx: RelayedHttpContext) -> None:
        """The listener's request handler: admission, then the reverse proxy."""
        if self._stop.is_set():
            await _refuse(ctx, "Service Unavailable: the bridge is shutting down")
            return
        if self._in_flight >= self._limit:
            await _refuse(ctx, "Service Unavailable: the bridge is at capacity")
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._proxy(ctx)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


async def _refuse(ctx: RelayedHttpContext, text: str) -> None:
    await ctx.respond(503, text, {"content-type": "text/plain; charset=utf-8"})
    await ctx.write(text.encode() + b"\n")
    await ctx.finish()
