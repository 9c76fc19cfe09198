"""WebSocket senders of an HTTP forward (``-H hc:http://host:port[/base]``): each is carried to
the upstream as a WebSocket on the same path and query (``ws://host:port[/base]/{rest}?{query}``,
``wss://`` for an ``https`` target).

The upstream is connected *before* the sender is accepted (the listener's accept handler): the
sender's offered subprotocols go to the upstream, the one it picks is what the listener accepts
with (and what the sender gets); an upstream that answers the upgrade with a 4xx status
refuses the sender with the same status, one that cannot be reached, fails, or takes longer
than ``connect_timeout`` with 502 and the reason, all before any 101. The upgrade request has
the headers of an HTTP request through ``-H`` (``Host`` the relay's, ``X-Forwarded-*``,
``Via``), without the handshake's own (key, version, extensions: no compression on either hop).

Then messages pass one by one both ways with their type (text or binary), and a close frame
crosses with its code and reason; pings are answered on each hop. Backpressure: a message is
read from one side only once the previous one was written to the other (each write waits while
that side is slow, ``SEND_TIMEOUT`` at most). Each close handshake is bounded (10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from hybridrelay.bridge.pipe import RelayStream, close_stream
from hybridrelay.client import AcceptContext, HybridConnectionStream
from hybridrelay.exceptions import RelayError, StreamClosedError

__all__ = ["WebSocketForwarder"]

logger = logging.getLogger("hybridrelay.bridge")

#: One message may wait this long for room on the other side before the connection is cut.
SEND_TIMEOUT = 60.0
#: Each side's close handshake.
CLOSE_TIMEOUT = 10.0
#: From the upstream's 101 to the sender's stream (the SDK's rendezvous connect, <= 20 s).
PAIR_TIMEOUT = 30.0
#: Messages larger than this from the upstream end the connection (1009), as the SDK's limit.
MAX_MESSAGE = 16 * 1024 * 1024
#: The WebSocket handshake's own request headers: each hop negotiates its own.
_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
# Close codes that may not be sent in a close frame (RFC 6455 7.4.1) and what goes instead.
_UNSENDABLE = {1005: 1000, 1006: 1001, 1015: 1001}

#: (suffix, query) -> the upstream's http(s) URL; (sender headers, client) -> upstream headers.
UrlFor = Callable[[str, str], str]
HeadersFor = Callable[[Sequence[tuple[str, str]], str | None], list[tuple[str, str]]]


def _sendable(code: int | None) -> int:
    if code is None:
        return 1000
    return _UNSENDABLE.get(code, code)


@dataclass(slots=True)
class _Awaiting:
    upstream: aiohttp.ClientWebSocketResponse
    expiry: asyncio.TimerHandle


class WebSocketForwarder:
    """The accept handler and the stream taker of one ``-H`` forward's WebSocket senders."""

    def __init__(
        self,
        *,
        url_for: UrlFor,
        headers_for: HeadersFor,
        session: Callable[[], aiohttp.ClientSession],
        ssl: Any,
        connect_timeout: float,
        limit: int,
    ) -> None:
        self._url_for = url_for
        self._headers_for = headers_for
        self._session = session
        self._ssl = ssl
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._awaiting: dict[str, _Awaiting] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    @property
    def open_count(self) -> int:
        """WebSockets forwarded now (or connected upstream, waiting for their sender)."""
        return len(self._pumps) + len(self._awaiting)

    @staticmethod
    def websocket_url(http_url: str) -> str:
        return "ws" + http_url[4:] if http_url.startswith("http") else http_url

    async def accept(self, ctx: AcceptContext) -> None:
        """The listener's accept handler: connect the upstream, or reject the sender."""
        if self.open_count >= self._limit:
            ctx.reject(503, "Service Unavailable: the bridge is at capacity")
            return
        if ctx.id in self._awaiting:
            ctx.reject(409, "The connection id is in use")
            return
        url = self.websocket_url(self._url_for(ctx.path, ctx.query))
        client = ctx.remote_endpoint[0] if ctx.remote_endpoint else None
        headers = [
            (name, value)
            for name, value in self._headers_for(list(ctx.connect_headers.items()), client)
            if name.lower() not in _HANDSHAKE
        ]
        try:
            async with asyncio.timeout(self._connect_timeout):
                upstream = await self._session().ws_connect(
                    url,
                    protocols=ctx.offered_subprotocols,
                    headers=headers,
                    ssl=self._ssl,
                    autoclose=True,
                    autoping=True,
                    max_msg_size=MAX_MESSAGE,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                )
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if 400 <= exc.status < 500 else 502
            logger.warning("upstream refused the WebSocket: %s %s", exc.status, exc.message)
            ctx.reject(status, f"The upstream refused the WebSocket ({exc.status})")
            return
        except TimeoutError:
            logger.warning("upstream WebSocket connect timed out (%s s)", self._connect_timeout)
            ctx.reject(502, "Bad Gateway: the upstream did not answer the WebSocket in time")
            return
        except (aiohttp.ClientError, OSError) as exc:
            logger.warning("upstream WebSocket failed: %s: %s", type(exc).__name__, exc)
            ctx.reject(502, "Bad Gateway: the upstream is unreachable")
            return
        ctx.subprotocol = upstream.protocol
        expiry = asyncio.get_running_loop().call_later(PAIR_TIMEOUT, self._expire, ctx.id)
        self._awaiting[ctx.id] = _Awaiting(upstream, expiry)

    def _expire(self, connection_id: str) -> None:
        awaiting = self._awaiting.pop(connection_id, None)
        if awaiting is not None:  # the rendezvous never came: drop the upstream
            self._spawn(_close_upstream(awaiting.upstream, 1001, "the client did not arrive"))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)

    def take(self, stream: RelayStream) -> bool:
        """Start forwarding an accepted stream; False when no upstream waits for it (the
        caller closes it)."""
        awaiting = self._awaiting.pop(stream.id, None)
        if awaiting is None or not isinstance(stream, HybridConnectionStream):
            return False
        awaiting.expiry.cancel()
        self._spawn(_forward(stream, awaiting.upstream))
        return True

    async def aclose(self) -> None:
        """Close every forwarded WebSocket (1001 both ways), bounded."""
        for connection_id in list(self._awaiting):
            self._expire(connection_id)
        tasks = list(self._pumps)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 2):
                    await asyncio.gather(*tasks, return_exceptions=True)


async def _close_upstream(
    upstream: aiohttp.ClientWebSocketResponse, code: int, reason: str
) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await upstream.close(code=_sendable(code), message=reason.encode()[:123])


async def _forward(
    stream: HybridConnectionStream, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Both directions until both sides closed."""

    async def sender_to_upstream() -> None:
        while True:
            try:
                message = await stream.receive_message()
            except StreamClosedError:
                return  # we closed the stream: the upstream closed first
            except RelayError:
                await _close_upstream(upstream, 1001, "the client's connection was lost")
                return
            if message is None:  # the sender closed: the upstream's answer completes it
                await _close_upstream(upstream, stream.close_code or 1000, stream.close_reason)
                await close_stream(stream, _sendable(upstream.close_code), "")
                return
            async with asyncio.timeout(SEND_TIMEOUT):
                if isinstance(message, str):
                    await upstream.send_str(message)
                else:
                    await upstream.send_bytes(message)

    async def upstream_to_sender() -> None:
        while True:
            message = await upstream.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                data: str | bytes = message.data
            elif message.type is aiohttp.WSMsgType.BINARY:
                data = message.data
            elif message.type is aiohttp.WSMsgType.CLOSE:
                await close_stream(stream, _sendable(message.data), message.extra or "")
                return
            elif message.type is aiohttp.WSMsgType.ERROR:  # a protocol error, too big
                code = getattr(message.data, "code", 1011)
                await _close_upstream(upstream, code, "")
                await close_stream(stream, _sendable(code), "")
                return
            else:  # CLOSING, CLOSED: the other direction is closing the upstream
                return
            async with asyncio.timeout(SEND_TIMEOUT):
                await stream.send_message(data)

    up = asyncio.create_task(sender_to_upstream())
    down = asyncio.create_task(upstream_to_sender())
    try:
        await asyncio.gather(up, down)
    except asyncio.CancelledError:  # the bridge is stopping
        await _close_upstream(upstream, 1001, "the bridge is stopping")
        await close_stream(stream, 1001, "the bridge is stopping")
        raise
    except Exception as exc:
        logger.warning(
            "WebSocket %s: forwarding failed: %s: %s", stream.id, type(exc).__name__, exc
        )
        await _close_upstream(upstream, 1011, "")
        await close_stream(stream, 1011, "")
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        if not upstream.closed:
            await _close_upstream(upstream, 1000, "")
