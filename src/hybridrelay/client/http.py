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

A response's ``Content-Length`` (if the handler gives one) is passed on: the relay then streams
under it, else with chunked encoding. Repeated ``Set-Cookie`` headers (pass the headers as
(name, value) pairs) travel in hybridrelay's ``repeatedResponseHeaders`` (PROTOCOL.md 6.4).

Request bodies stream: a small one (<= 64 KiB, inline) is there at once, a larger or chunked
one is read from the request's rendezvous as the handler asks for it
(:meth:`RelayedHttpContext.read_chunk`, :attr:`RelayedHttpContext.body`), any size, in memory
bounded by the socket's buffer; :meth:`RelayedHttpContext.read` gathers it whole (then it is
held in memory, of course). When the sender goes away while a streamed response is under way,
the relay closes the rendezvous: :meth:`RelayedHttpContext.wait_disconnected` returns and
further writes raise :class:`~hybridrelay.exceptions.StreamClosedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

from hybridrelay.client._connect import STREAM_MAX_MESSAGE, WebSocketConnector
from hybridrelay.exceptions import ProtocolError, RelayError, StreamClosedError
from hybridrelay.protocol.http import split_repeated_headers, without_hop_by_hop
from hybridrelay.protocol.messages import Request, encode_response, parse_message
from hybridrelay.transport.base import FragmentSocket, MessageKind, MessageSocket
from hybridrelay.transport.frames_ws import FrameSocket

__all__ = ["HttpRequestDispatcher", "RelayedHttpContext", "RequestHandler"]

logger = logging.getLogger("hybridrelay.client.http")

#: Responses up to this size go inline (PROTOCOL.md 6.2, 6.3).
INLINE_RESPONSE_LIMIT = 64 * 1024
#: A streamed body is sent in frames of at most this size (one socket read's worth).
FRAGMENT_SIZE = 256 * 1024
#: Opening a rendezvous (.NET listeners give up after 20 s).
RENDEZVOUS_TIMEOUT = 20.0
#: The full request on a rendezvous must arrive within this time ...
REQUEST_TIMEOUT = 60.0
#: ... and each part of its body (one message, possibly large and slow) within this.
BODY_TIMEOUT = 300.0
#: A request rendezvous carries bodies of any size (they stream, in parts).
UNBOUNDED_BODY = 2**62
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

_KEEP_LENGTH = frozenset({"content-length"})

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
        streamed_body: bool = False,
    ) -> None:
        self._dispatcher = dispatcher
        self.id = request.id
        self.method = request.method or "GET"
        self.target = request.request_target or "/"
        # The parsed message's own dict (parse_message makes a new one for each message).
        self.headers: dict[str, str] = request.request_headers or {}
        endpoint = request.remote_endpoint
        self.remote_endpoint = (endpoint.address, endpoint.port) if endpoint else None
        self._address = request.address
        self._body: bytes | None = body
        # The body's parts are still to be read from the rendezvous.
        self._body_pending = streamed_body and rendezvous is not None
        self._control = control
        self._rendezvous = rendezvous
        self._status = 200
        self._reason: str | None = None
        self._response_headers: dict[str, str] = {}
        self._repeated_headers: tuple[tuple[str, str], ...] = ()
        # The relay closed the rendezvous (the sender went away), or the exchange is over; the
        # event only once someone waits for it (most exchanges end with nobody waiting).
        self._gone = False
        self._gone_event: asyncio.Event | None = None
        self._on_disconnect: list[Callable[[], None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self._responded = False
        self._buffer = bytearray()
        self._head_sent = False
        self._streaming = False
        self._first_fragment = True
        self._finished = False
        self._first_write: float | None = None
        self._bytes_sent = 0
        # A rendezvous opened as the request arrived (an event stream will want one).
        self._early_rendezvous: asyncio.Task[FrameSocket] | None = None

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
        """The request body as an async iterator of chunks as they arrive (readable once)."""
        return self._iter_body()

    async def _iter_body(self) -> AsyncIterator[bytes]:
        while chunk := await self.read_chunk():
            yield chunk

    async def read_chunk(self) -> bytes:
        """The next part of the request body as it arrives; b"" at its end.

        Raises:
            StreamClosedError: the body broke off, or no part came within ``BODY_TIMEOUT``.
        """
        if self._body is not None:
            data, self._body = self._body, None
            if data:
                return data
        socket = self._rendezvous
        while self._body_pending and socket is not None:
            try:
                async with asyncio.timeout(BODY_TIMEOUT):
                    message = await socket.receive()
            except TimeoutError as exc:
                raise StreamClosedError("the request body stalled") from exc
            if message.kind is MessageKind.CLOSE:
                self._body_pending = False
                self._mark_disconnected()
                raise StreamClosedError("the request body broke off")
            if message.kind is MessageKind.TEXT:
                raise StreamClosedError("the relay sent text inside the request body")
            self._body_pending = message.more
            if message.data:
                part = message.data
                return part.encode() if isinstance(part, str) else part
        return b""

    @property
    def more_body(self) -> bool:
        """Whether :meth:`read_chunk` may still return data (the body is not over)."""
        return bool(self._body) or self._body_pending

    async def read(self) -> bytes:
        """The whole request body (b"" once it has been read); held in memory."""
        parts = [chunk async for chunk in self.body]
        return b"".join(parts)

    async def wait_disconnected(self) -> None:
        """Return once the sender is gone (the relay closed the rendezvous this request's
        response streams on) or the exchange is over. A response that went inline on the
        control channel gives no such sign: this then returns when it is finished.

        Call it once the request body was read (the rest of it is skipped otherwise).
        """
        self._watch()
        await self._wait_gone()

    async def _wait_gone(self) -> None:
        if self._gone:
            return
        if self._gone_event is None:
            self._gone_event = asyncio.Event()
        await self._gone_event.wait()

    @property
    def disconnected(self) -> bool:
        """True once :meth:`wait_disconnected` would return at once."""
        return self._gone

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (once, from the event loop) when :meth:`wait_disconnected` would
        return: the sender is gone, or the exchange is over. Like :meth:`wait_disconnected`,
        call it once the request body was read."""
        if self._gone:
            asyncio.get_running_loop().call_soon(callback)
            return
        self._on_disconnect.append(callback)
        self._watch()

    def _mark_disconnected(self) -> None:
        if self._gone:
            return
        self._gone = True
        if self._gone_event is not None:
            self._gone_event.set()
        callbacks, self._on_disconnect = self._on_disconnect, []
        for callback in callbacks:
            callback()

    def _watch(self) -> None:
        """Read the rendezvous (after the body) for the relay's close, in a task of its own."""
        socket = self._rendezvous
        if self._watcher is not None or socket is None or self._gone:
            return

        async def watch() -> None:
            try:
                while self._body_pending:
                    await self.read_chunk()
                while (await socket.receive()).kind is not MessageKind.CLOSE:
                    pass
            except RelayError:
                pass
            self._mark_disconnected()

        self._watcher = asyncio.create_task(watch())

    # -- response ------------------------------------------------------------------------

    @property
    def responded(self) -> bool:
        return self._responded

    @property
    def status(self) -> int:
        """The response's status (200 until :meth:`respond` says otherwise)."""
        return self._status

    @property
    def bytes_sent(self) -> int:
        """Body bytes written so far."""
        return self._bytes_sent

    @property
    def finished(self) -> bool:
        return self._finished

    async def respond(
        self,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        """Set the status line and headers (sent with the first body bytes or at finish).

        ``headers`` is a mapping or (name, value) pairs (to repeat a name: ``Set-Cookie``).
        Hop-by-hop headers (those a ``Connection`` header names too) and ``Host`` are dropped
        (PROTOCOL.md 6.4); ``Content-Length`` is kept: the relay streams under it (and cuts a
        body that does not match it), and a HEAD response passes it on.

        Raises:
            RuntimeError: called twice, or after :meth:`finish`.
            ValueError: a status outside 200-999 or a reason with control characters.
        """
        self._set_status(status, reason)
        pairs: Iterable[tuple[str, str]]
        if headers is None:
            pairs = ()
        elif isinstance(headers, list | tuple):  # (name, value) pairs: no ABC check (~0.4 us)
            pairs = headers
        elif isinstance(headers, Mapping):
            pairs = headers.items()
        else:
            pairs = headers
        self._response_headers, self._repeated_headers = split_repeated_headers(
            without_hop_by_hop([(str(k), str(v)) for k, v in pairs], keep=_KEEP_LENGTH)
        )
        self._responded = True

    def _set_status(self, status: int, reason: str | None) -> None:
        if self._responded or self._finished:
            raise RuntimeError("respond() was already called")
        if not 200 <= status <= 999:
            raise ValueError("status must be 200..999 (1xx cannot be relayed)")
        if reason is not None and any(ord(ch) < 32 or ord(ch) == 127 for ch in reason):
            raise ValueError("the reason phrase must not contain control characters")
        self._status = status
        self._reason = reason

    def respond_merged(
        self,
        status: int,
        reason: str | None,
        headers: dict[str, str],
        repeated: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """:meth:`respond` for a caller that made its header pass itself (a reverse proxy
        does one over its upstream's headers anyway): ``headers`` and ``repeated`` are what
        :func:`~hybridrelay.protocol.http.split_repeated_headers` makes of pairs that
        :func:`~hybridrelay.protocol.http.without_hop_by_hop` (``Content-Length`` kept) let
        through, taken as they are (the dict is not copied); the status and reason are
        checked as there.

        Raises:
            RuntimeError: called twice, or after :meth:`finish`.
            ValueError: a status outside 200-999 or a reason with control characters.
        """
        self._set_status(status, reason)
        self._response_headers = headers
        self._repeated_headers = repeated
        self._responded = True

    async def write(self, data: bytes) -> None:
        """Append to the body; beyond 64 KiB the response streams over a rendezvous."""
        if self._finished:
            raise StreamClosedError("the response is finished")
        if not self._responded:
            await self.respond()
        if not data:
            return
        self._bytes_sent += len(data)
        if self._streaming:
            await self._send_fragment(data, last=False)
            return
        # time.monotonic, not the loop's time: asyncio.get_running_loop() costs a getpid
        # system call on Python 3.11, and this runs for every response.
        now = time.monotonic()
        if self._first_write is None:
            self._first_write = now
        if len(self._buffer) + len(data) > INLINE_RESPONSE_LIMIT:
            # Too big to go inline: stream it from here, without copying it into the buffer.
            await self._start_streaming()
            await self._send_fragment(data, last=False)
            return
        self._buffer += data
        if now - self._first_write >= STREAM_AFTER:
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
        if self._early_rendezvous is not None:  # (no coroutine to await when there is none)
            await self._adopt_early_rendezvous(required=False)
        if self._rendezvous is not None:
            await self._send(self._rendezvous, head, *((body,) if body else ()))
            self._head_sent = True
            await self._close_rendezvous()
            return
        control = self._dispatcher.control_for(self._control)
        if control is None:
            raise StreamClosedError("the control channel this request came on is gone")
        messages = (head, body) if body else (head,)
        lock = self._dispatcher.send_lock
        if isinstance(control, FrameSocket) and not lock.locked():
            # JSON and body go out in one write, before anything else can: adjacent without
            # taking the lock (an acquire and release per request), which nobody holds now;
            # it is taken only to wait for the transport to drain, as before, so that the
            # other answers wait too instead of piling up in its buffer.
            self._head_sent = True
            if control.send_nowait(*messages, later=True):  # _send, with the lock for the drain
                await _drained(control, lock)
        else:
            async with lock:  # JSON and body adjacent (PROTOCOL.md 4.2)
                self._head_sent = True
                await self._send(control, *messages, later=True)
        self._end()

    # -- internals -----------------------------------------------------------------------

    def _head(self, has_body: bool) -> str:
        return encode_response(
            self.id,
            self._status,
            self._reason,
            self._response_headers,
            body=has_body,
            repeated_headers=self._repeated_headers,
        )

    def open_rendezvous_early(self) -> None:
        """Start opening the request's rendezvous now, while the handler works: a response
        that streams (server-sent events) then finds it open instead of waiting the connect
        and upgrade round trips before its first bytes. The response goes there whatever
        its size (the relay takes it on a rendezvous the listener opened, PROTOCOL.md 6.3)."""
        if self._rendezvous is None and self._early_rendezvous is None:
            self._early_rendezvous = asyncio.create_task(
                self._dispatcher.open_rendezvous(self._address)
            )

    async def _adopt_early_rendezvous(self, *, required: bool) -> None:
        """Wait for the rendezvous opened early (if any) and use it; ``required``: open one
        now if there is none (or it failed), else the response goes on the control channel."""
        task, self._early_rendezvous = self._early_rendezvous, None
        if task is not None:
            try:
                self._rendezvous = await task
            except RelayError:
                if not required:
                    return
        if required and self._rendezvous is None:
            self._rendezvous = await self._dispatcher.open_rendezvous(self._address)

    async def _start_streaming(self) -> None:
        await self._adopt_early_rendezvous(required=True)
        socket = self._rendezvous
        assert socket is not None
        self._head_sent = True
        head = self._head(True)
        data = bytes(self._buffer)
        self._buffer.clear()
        if data and isinstance(socket, FrameSocket):
            # The head and the first bytes in one write: one segment, one wake-up of the relay
            # before the sender gets them (the first server-sent event).
            await self._send(socket, head, then_fragment=data)
            self._first_fragment = False
            data = b""
        else:
            await self._send(socket, head)
        self._streaming = True
        if not self._body_pending:
            self._watch()  # the relay's close says the sender went away
        if data:
            await self._send_fragment(data, last=False)

    async def _send_fragment(self, data: bytes, *, last: bool) -> None:
        socket = self._rendezvous
        assert socket is not None
        if not isinstance(socket, FragmentSocket):
            raise RelayError("fragmented sending needs a socket with send_fragment")
        # A large write goes out in frames of at most FRAGMENT_SIZE, each after the transport
        # drained below its high-water mark: handing a TLS transport 16 MiB at once made it
        # buffer (and encrypt) all of it in small records, heap memory that glibc then kept
        # (serve-app grew by hundreds of MiB over a series of 16 MiB responses, issue 14).
        view = memoryview(data)
        start = 0
        while True:
            if self._gone:
                raise StreamClosedError("the sender went away")
            piece = bytes(view[start : start + FRAGMENT_SIZE])
            start += len(piece)
            final = last and start >= len(view)
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await socket.send_fragment(piece, first=self._first_fragment, last=final)
            except TimeoutError as exc:
                raise StreamClosedError("the relay did not take the response body in time") from exc
            self._first_fragment = False
            if start >= len(view):
                return

    @staticmethod
    async def _send(
        socket: MessageSocket,
        *messages: str | bytes,
        then_fragment: bytes | None = None,
        later: bool = False,
    ) -> None:
        """Send whole messages, adjacent; on our own sockets in one write, and without a
        timeout's set-up unless the transport makes us wait (the common case is no wait);
        ``then_fragment``: the first fragment of a binary message, in the same write (our
        sockets only); ``later``: together with the other answers of this turn of the event
        loop."""
        try:
            if isinstance(socket, FrameSocket):
                if socket.send_nowait(*messages, then_fragment=then_fragment, later=later):
                    await _drained(socket)
                return
            assert then_fragment is None, "a first fragment goes with the head on our sockets only"
            async with asyncio.timeout(SEND_TIMEOUT):
                for data in messages:
                    await socket.send(data)
        except TimeoutError as exc:
            raise StreamClosedError("the relay did not take the response in time") from exc

    async def _close_rendezvous(self) -> None:
        socket, self._rendezvous = self._rendezvous, None
        watcher = self._watcher
        if socket is not None:
            if watcher is None:
                await self._dispatcher.close_rendezvous(socket)
            else:  # the watcher reads the relay's close: wait for it (bounded)
                with contextlib.suppress(RelayError):
                    await socket.send_close(1000)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self._wait_gone()
                socket.abort()
        self._end()

    def _end(self) -> None:
        early, self._early_rendezvous = self._early_rendezvous, None
        if early is not None:
            early.cancel()
            early.add_done_callback(_abort_opened)
        self._mark_disconnected()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()

    async def _fail(self, status: int, description: str) -> None:
        """Replace an unsent response with an error (the handler failed or is missing)."""
        if self._head_sent:
            self.abort()
            return
        self._finished = False
        self._responded = False
        self._buffer.clear()
        self._bytes_sent = 0
        await self.respond(status, description)
        await self.finish()

    def abort(self) -> None:
        """Drop a streamed response mid-way (the sender sees the connection cut)."""
        self._finished = True
        socket, self._rendezvous = self._rendezvous, None
        if socket is not None:
            socket.abort()
        self._end()


async def _drained(socket: FrameSocket, lock: asyncio.Lock | None = None) -> None:
    """After a send on our socket went over its high-water mark: wait (bounded) for the
    transport to drain, holding ``lock`` if given (so that the other answers wait too)."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            if lock is None:
                await socket.drain()
            else:
                async with lock:
                    await socket.drain()
    except TimeoutError as exc:
        raise StreamClosedError("the relay did not take the response in time") from exc


def _wants_event_stream(request: Request) -> bool:
    """Whether the sender asks for server-sent events (``Accept: text/event-stream``, what
    every browser's EventSource sends): that response will stream."""
    for name, value in (request.request_headers or {}).items():
        if len(name) == 6 and name.lower() == "accept":
            return "text/event-stream" in value.lower()
    return False


def _abort_opened(task: asyncio.Task[FrameSocket]) -> None:
    """Drop a rendezvous that was opened early and is not needed (the response was cut)."""
    if not task.cancelled() and task.exception() is None:
        task.result().abort()


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
        if self._in_flight < MAX_CONCURRENT_REQUESTS and _wants_event_stream(request):
            ctx.open_rendezvous_early()
        self._start(self._handle(ctx, counted=True), request, inline=True)

    def _start(self, coro: Coroutine[Any, Any, None], request: Request, *, inline: bool) -> None:
        """Run ``coro`` (which counts itself out of ``_in_flight`` when it ends), or answer 503
        when too many requests are in progress."""
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
        self._spawn(coro, "http")

    async def _busy(self, ctx: RelayedHttpContext) -> None:
        try:
            await ctx._fail(BUSY_STATUS, "The listener has too many requests in progress")
        except RelayError as exc:
            logger.info("listener %s: could not answer 503: %s", self._listener_id, exc)
        finally:
            self._rejects_in_flight -= 1

    # -- rendezvous ----------------------------------------------------------------------

    async def open_rendezvous(self, address: str) -> FrameSocket:
        # Verbatim, no token: the URL is the credential (and never logged). Binary messages
        # (a request body) come in parts, of any size; text (the request) stays bounded.
        socket = await self._connector.connect(
            address, connect_timeout=RENDEZVOUS_TIMEOUT, max_msg_size=UNBOUNDED_BODY
        )
        socket.stream_binary(STREAM_MAX_MESSAGE)
        return socket

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
            await self._serve_rendezvous_request(announcement)
        finally:
            self._in_flight -= 1

    async def _serve_rendezvous_request(self, announcement: Request) -> None:
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
        except (TimeoutError, ProtocolError, RelayError) as exc:
            logger.warning(
                "listener %s: request %s over rendezvous failed: %s",
                self._listener_id,
                announcement.id,
                exc,
            )
            socket.abort()
            return
        ctx = RelayedHttpContext(
            self,
            request,
            b"",
            control=None,
            rendezvous=socket,
            streamed_body=bool(request.body),
        )
        await self._handle(ctx)

    # -- the handler ---------------------------------------------------------------------

    async def _handle(self, ctx: RelayedHttpContext, *, counted: bool = False) -> None:
        """Run the handler for ``ctx`` and complete its response; ``counted``: one of the
        requests in ``_in_flight`` (an inline one: no wrapper coroutine per request)."""
        try:
            handler = self._get_handler()
            if handler is None:
                track = str(uuid.uuid4())  # made only when needed: one costs ~2 us
                await ctx._fail(
                    NO_HANDLER_STATUS,
                    f"RequestHandler has not been configured on the listener. TrackingId:{track}",
                )
                return
            try:
                await handler(ctx)
            except Exception:
                track = str(uuid.uuid4())
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
            if counted:
                self._in_flight -= 1
            if not ctx.finished or ctx._rendezvous is not None:
                ctx.abort()
