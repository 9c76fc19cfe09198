"""HTTP request handling for :class:`~hybridrelay.client.HybridConnectionListener`
(PROTOCOL.md section 6, listener side).

Set ``listener.request_handler`` to an ``async def handler(ctx: RelayedHttpContext)``; every
``request`` the relay sends runs it in a task of its own::

    async def handler(ctx: RelayedHttpContext) -> None:
        body = await ctx.read()
        await ctx.respond(200, headers={"content-type": "text/plain"})
        await ctx.write(b"you sent " + body)
        await ctx.finish()

How a response travels (as the .NET listener and hyco-https do it):

* up to 64 KiB, finished before more is written: one ``response`` message plus one binary
  message, inline on the control channel (or on the request's rendezvous if the request came
  over one);
* beyond 64 KiB, or when still being written 2 s after the first bytes: the listener opens
  the request's rendezvous (if the request did not already come over one) and streams the body
  there as ONE binary message in fragments, as the handler writes it.
  :meth:`RelayedHttpContext.flush` switches to streaming at once (server-sent events).

Request bodies arrive whole (the relay sends each body as one WebSocket message, which aiohttp
reassembles): at most ``STREAM_MAX_MESSAGE`` (16 MiB) per request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

from hybridrelay.client._connect import STREAM_MAX_MESSAGE, WebSocketConnector
from hybridrelay.exceptions import ProtocolError, RelayError, StreamClosedError
from hybridrelay.protocol.http import without_hop_by_hop
from hybridrelay.protocol.messages import Request, Response, encode_message, parse_message
from hybridrelay.transport.base import FragmentSocket, MessageKind, MessageSocket

__all__ = ["HttpRequestDispatcher", "RelayedHttpContext", "RequestHandler"]

logger = logging.getLogger("hybridrelay.client.http")

#: Responses up to this size go inline (PROTOCOL.md 6.2, 6.3).
INLINE_RESPONSE_LIMIT = 64 * 1024
#: Opening a rendezvous (.NET listeners give up after 20 s).
RENDEZVOUS_TIMEOUT = 20.0
#: The full request on a rendezvous must arrive within this time ...
REQUEST_TIMEOUT = 60.0
#: ... and its body (one message, possibly large and slow) within this.
BODY_TIMEOUT = 300.0
#: One send to the relay (a message, or one fragment of a streamed body).
SEND_TIMEOUT = 60.0
CLOSE_TIMEOUT = 10.0
#: A response still being written this long after its first bytes streams from then on, so
#: that a slow producer's data reaches the sender (the .NET listener does the same).
STREAM_AFTER = 2.0
#: Requests handled at once per listener; beyond that they are answered 503 (bounded too).
MAX_CONCURRENT_REQUESTS = 256
MAX_REJECTS_IN_FLIGHT = 32

NO_HANDLER_STATUS = 501
HANDLER_FAILED_STATUS = 500
BUSY_STATUS = 503

RequestHandler = Callable[["RelayedHttpContext"], Awaitable[None]]
"""Serves one relayed HTTP request: reads it from, and answers it through, the context."""


class RelayedHttpContext:
    """One relayed HTTP request and its response.

    Attributes:
        id: the relay's request id.
        method: the HTTP method.
        target: the request target as the sender used it, including the hybrid connection's
            name: ``/{entity}/{suffix}?{query}`` (``sb-hc-*`` parameters removed by the relay).
        headers: request headers (repeated ones joined with ``", "``); look names up with
            :meth:`header` (case-insensitive).
        remote_endpoint: the sender's (address, port) as the relay saw it, if known.
    """

    def __init__(
        self,
        dispatcher: HttpRequestDispatcher,
        request: Request,
        body: bytes,
        *,
        control: MessageSocket | None,
        rendezvous: MessageSocket | None,
    ) -> None:
        self._dispatcher = dispatcher
        self.id = request.id
        self.method = request.method or "GET"
        self.target = request.request_target or "/"
        self.headers: dict[str, str] = dict(request.request_headers or {})
        endpoint = request.remote_endpoint
        self.remote_endpoint = (endpoint.address, endpoint.port) if endpoint else None
        self._address = request.address
        self._body: bytes | None = body
        self._control = control
        self._rendezvous = rendezvous
        self._status = 200
        self._reason: str | None = None
        self._response_headers: dict[str, str] = {}
        self._responded = False
        self._buffer = bytearray()
        self._head_sent = False
        self._streaming = False
        self._first_fragment = True
        self._finished = False
        self._first_write: float | None = None

    def __repr__(self) -> str:
        return f"<RelayedHttpContext {self.id} {self.method} {self.path}>"

    # -- request -------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The target's path (raw, with the entity name)."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        """The target's raw query string (without ``?``)."""
        return self.target.partition("?")[2]

    def header(self, name: str, default: str | None = None) -> str | None:
        """A request header by case-insensitive name."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return default

    @property
    def body(self) -> AsyncIterator[bytes]:
        """The request body as an async iterator of chunks (readable once)."""
        return self._iter_body()

    async def _iter_body(self) -> AsyncIterator[bytes]:
        data = await self.read()
        if data:
            yield data

    async def read(self) -> bytes:
        """The whole request body (b"" once it has been read)."""
        data, self._body = self._body or b"", None
        return data

    # -- response ------------------------------------------------------------------------

    @property
    def responded(self) -> bool:
        return self._responded

    @property
    def finished(self) -> bool:
        return self._finished

    async def respond(
        self,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Set the status line and headers (sent with the first body bytes or at finish).

        Hop-by-hop headers (those a ``Connection`` header names too), ``Content-Length`` and
        ``Host`` are dropped: the relay frames the response (PROTOCOL.md 6.4).

        Raises:
            RuntimeError: called twice, or after :meth:`finish`.
            ValueError: a status outside 200-999 or a reason with control characters.
        """
        if self._responded or self._finished:
            raise RuntimeError("respond() was already called")
        if not 200 <= status <= 999:
            raise ValueError("status must be 200..999 (1xx cannot be relayed)")
        if reason is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in reason):
            raise ValueError("the reason phrase must not contain control characters")
        self._status = status
        self._reason = reason
        self._response_headers = dict(
            without_hop_by_hop([(str(k), str(v)) for k, v in (headers or {}).items()])
        )
        self._responded = True

    async def write(self, data: bytes) -> None:
        """Append to the body; beyond 64 KiB the response streams over a rendezvous."""
        if self._finished:
            raise StreamClosedError("the response is finished")
        if not self._responded:
            await self.respond()
        if not data:
            return
        if self._streaming:
            await self._send_fragment(bytes(data), last=False)
            return
        loop = asyncio.get_running_loop()
        if self._first_write is None:
            self._first_write = loop.time()
        self._buffer += data
        if (
            len(self._buffer) > INLINE_RESPONSE_LIMIT
            or loop.time() - self._first_write >= STREAM_AFTER
        ):
            await self._start_streaming()

    async def flush(self) -> None:
        """Send what was written so far now and stream the rest (opens the rendezvous)."""
        if self._finished:
            raise StreamClosedError("the response is finished")
        if not self._responded:
            await self.respond()
        if not self._streaming:
            await self._start_streaming()

    async def finish(self) -> None:
        """Complete the response. Idempotent."""
        if self._finished:
            return
        if not self._responded:
            await self.respond()
        self._finished = True
        if self._streaming:
            await self._send_fragment(b"", last=True)
            await self._close_rendezvous()
            return
        body = bytes(self._buffer)
        self._buffer.clear()
        head = self._head(bool(body))
        if self._rendezvous is not None:
            await self._send(self._rendezvous, head)
            if body:
                await self._send(self._rendezvous, body)
            self._head_sent = True
            await self._close_rendezvous()
            return
        control = self._dispatcher.control_for(self._control)
        if control is None:
            raise StreamClosedError("the control channel this request came on is gone")
        async with self._dispatcher.send_lock:  # JSON and body adjacent (PROTOCOL.md 4.2)
            self._head_sent = True
            await self._send(control, head)
            if body:
                await self._send(control, body)

    # -- internals -----------------------------------------------------------------------

    def _head(self, has_body: bool) -> str:
        return encode_message(
            Response(
                request_id=self.id,
                status_code=self._status,
                status_description=self._reason,
                response_headers=self._response_headers,
                body=has_body,
            )
        )

    async def _start_streaming(self) -> None:
        if self._rendezvous is None:
            self._rendezvous = await self._dispatcher.open_rendezvous(self._address)
        self._head_sent = True
        await self._send(self._rendezvous, self._head(True))
        self._streaming = True
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            await self._send_fragment(data, last=False)

    async def _send_fragment(self, data: bytes, *, last: bool) -> None:
        socket = self._rendezvous
        assert socket is not None
        if not isinstance(socket, FragmentSocket):
            raise RelayError("fragmented sending needs a socket with send_fragment")
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await socket.send_fragment(data, first=self._first_fragment, last=last)
        except TimeoutError as exc:
            raise StreamClosedError("the relay did not take the response body in time") from exc
        self._first_fragment = False

    @staticmethod
    async def _send(socket: MessageSocket, data: str | bytes) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await socket.send(data)
        except TimeoutError as exc:
            raise StreamClosedError("the relay did not take the response in time") from exc

    async def _close_rendezvous(self) -> None:
        socket, self._rendezvous = self._rendezvous, None
        if socket is not None:
            await self._dispatcher.close_rendezvous(socket)

    async def _fail(self, status: int, description: str) -> None:
        """Replace an unsent response with an error (the handler failed or is missing)."""
        if self._head_sent:
            self.abort()
            return
        self._finished = False
        self._responded = False
        self._buffer.clear()
        await self.respond(status, description)
        await self.finish()

    def abort(self) -> None:
        """Drop a streamed response mid-way (the sender sees the connection cut)."""
        self._finished = True
        socket, self._rendezvous = self._rendezvous, None
        if socket is not None:
            socket.abort()


class HttpRequestDispatcher:
    """Runs the request handler for the ``request`` messages of one listener.

    Created by the listener, which feeds it the control channel's ``request`` messages and
    binary bodies in order (:meth:`on_request`, :meth:`on_binary`) and calls
    :meth:`channel_changed` when the control channel is (re)connected.
    """

    def __init__(
        self,
        *,
        connector: WebSocketConnector,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
        get_handler: Callable[[], RequestHandler | None],
        get_control: Callable[[], MessageSocket | None],
        send_lock: asyncio.Lock,
        listener_id: str,
    ) -> None:
        self._connector = connector
        self._spawn = spawn
        self._get_handler = get_handler
        self._get_control = get_control
        self.send_lock = send_lock
        self._listener_id = listener_id
        self._awaiting_body: Request | None = None
        self._in_flight = 0
        self._rejects_in_flight = 0

    # -- from the control channel (called in order, synchronously) -------------------------

    def channel_changed(self) -> None:
        self._awaiting_body = None

    def on_request(self, request: Request) -> None:
        if request.address_only:
            self._start(self._serve_rendezvous(request), request, inline=False)
        elif request.body:
            self._awaiting_body = request  # the very next message is the body (6.2)
        else:
            self._start_inline(request, b"")

    def on_binary(self, data: bytes | str) -> None:
        request, self._awaiting_body = self._awaiting_body, None
        if request is None:
            return  # not ours (or a stray empty message): ignore
        self._start_inline(request, data.encode() if isinstance(data, str) else data)

    def _start_inline(self, request: Request, body: bytes) -> None:
        ctx = RelayedHttpContext(self, request, body, control=self._get_control(), rendezvous=None)
        self._start(self._handle(ctx), request, inline=True)

    def _start(self, coro: Coroutine[Any, Any, None], request: Request, *, inline: bool) -> None:
        if self._in_flight >= MAX_CONCURRENT_REQUESTS:
            coro.close()
            if inline and self._rejects_in_flight < MAX_REJECTS_IN_FLIGHT:
                ctx = RelayedHttpContext(
                    self, request, b"", control=self._get_control(), rendezvous=None
                )
                self._rejects_in_flight += 1
                self._spawn(self._busy(ctx), "http-busy")
            else:
                logger.warning("listener %s: overloaded, dropping request", self._listener_id)
            return
        self._in_flight += 1
        self._spawn(self._counted(coro), "http")

    async def _counted(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        finally:
            self._in_flight -= 1

    async def _busy(self, ctx: RelayedHttpContext) -> None:
        try:
            await ctx._fail(BUSY_STATUS, "The listener has too many requests in progress")
        except RelayError as exc:
            logger.info("listener %s: could not answer 503: %s", self._listener_id, exc)
        finally:
            self._rejects_in_flight -= 1

    # -- rendezvous ----------------------------------------------------------------------

    async def open_rendezvous(self, address: str) -> FragmentSocket:
        # Verbatim, no token: the URL is the credential (and never logged).
        return await self._connector.connect(
            address, connect_timeout=RENDEZVOUS_TIMEOUT, max_msg_size=STREAM_MAX_MESSAGE
        )

    async def close_rendezvous(self, socket: MessageSocket) -> None:
        """Send our close and wait (bounded) for the relay's, then drop the connection."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await socket.send_close(1000)
                while (await socket.receive()).kind is not MessageKind.CLOSE:
                    pass
        except (TimeoutError, RelayError):
            pass
        finally:
            socket.abort()

    def control_for(self, control: MessageSocket | None) -> MessageSocket | None:
        """The control channel if it is still the one a request came on."""
        current = self._get_control()
        return current if current is not None and current is control else None

    async def _serve_rendezvous(self, announcement: Request) -> None:
        """An address-only request: the full request (+ body) comes over the rendezvous."""
        try:
            socket = await self.open_rendezvous(announcement.address)
        except RelayError as exc:
            logger.warning(
                "listener %s: request rendezvous %s failed: %s",
                self._listener_id,
                announcement.id,
                exc,
            )
            return
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                first = await socket.receive()
            if first.kind is not MessageKind.TEXT:
                raise ProtocolError("expected a request message on the rendezvous")
            request = parse_message(first.data)
            if not isinstance(request, Request) or request.address_only:
                raise ProtocolError("expected a full request message on the rendezvous")
            body = b""
            if request.body:
                async with asyncio.timeout(BODY_TIMEOUT):
                    follow = await socket.receive()
                if follow.kind is MessageKind.CLOSE:
                    raise ProtocolError("the rendezvous closed before the request body")
                data = follow.data
                body = data.encode() if isinstance(data, str) else data
        except (TimeoutError, ProtocolError, RelayError) as exc:
            logger.warning(
                "listener %s: request %s over rendezvous failed: %s",
                self._listener_id,
                announcement.id,
                exc,
            )
            socket.abort()
            return
        ctx = RelayedHttpContext(self, request, body, control=None, rendezvous=socket)
        await self._handle(ctx)

    # -- the handler ---------------------------------------------------------------------

    async def _handle(self, ctx: RelayedHttpContext) -> None:
        track = str(uuid.uuid4())
        try:
            handler = self._get_handler()
            if handler is None:
                await ctx._fail(
                    NO_HANDLER_STATUS,
                    f"RequestHandler has not been configured on the listener. TrackingId:{track}",
                )
                return
            try:
                await handler(ctx)
            except Exception:
                logger.exception(
                    "listener %s: request handler failed (request %s, TrackingId:%s)",
                    self._listener_id,
                    ctx.id,
                    track,
                )
                await ctx._fail(
                    HANDLER_FAILED_STATUS,
                    "The Listener's custom RequestHandler threw an exception. "
                    f"See Listener logs for details. TrackingId:{track}",
                )
                return
            await ctx.finish()
        except RelayError as exc:
            logger.info(
                "listener %s: response to request %s failed: %s", self._listener_id, ctx.id, exc
            )
            ctx.abort()
        finally:
            if not ctx.finished or ctx._rendezvous is not None:
                ctx.abort()
