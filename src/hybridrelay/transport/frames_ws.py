"""Our own WebSocket client on asyncio transports: the SDK's sender and rendezvous sockets.

Since the relay splices frames on its transports (D9), the bridges are the busiest processes
on the path, and what they spend goes to aiohttp's client: building a ``ws_connect`` (request
object, URL parsing, connector, response object) for every tunnel, and a queue, a future and
a task wake-up for every message. This socket (docs/DECISIONS.md D11) does the same work with
the pure pieces the relay already uses:

* the handshake is :func:`~hybridrelay.protocol.websocket.upgrade_request` written on a fresh
  connection and the answer read with :func:`~hybridrelay.protocol.websocket.parse_response_head`
  / :func:`~hybridrelay.protocol.websocket.check_upgrade_response`; an HTTP status instead of
  101 becomes :func:`~hybridrelay.exceptions.http_error` with its reason phrase (which carries
  the relay's or the listener's description, PROTOCOL.md 5.4);
* frames are read by :class:`~hybridrelay.protocol.websocket.FrameForwarder` in the server to
  client direction (unmasked, payload only, message ends tracked), into the receive buffer
  shared by all our protocols; frames are written masked with a fresh key per frame;
* as a :class:`~hybridrelay.transport.base.MessageSocket` (and ``FragmentSocket``) it queues
  whole messages for ``receive()``, pausing the transport above 512 KiB queued;
* as a :class:`~hybridrelay.transport.base.SpliceSocket` it can be *attached* to a
  :class:`~hybridrelay.transport.base.StreamSink`: payload bytes then go to the sink from the
  read callback, and the bridge writes the other way with ``write_nowait``: no task, no queue.

A close frame from the peer is reported, not answered (half-close, D2); our close frame goes
out on ``send_close``/``close_nowait``, and the connection is dropped once both were seen.
Pings are answered; none are sent (control channels, which need a heartbeat, stay on aiohttp,
as does every connection through an HTTP proxy).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import ssl
from typing import cast
from urllib.parse import urlsplit

from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.exceptions import (
    ProtocolError,
    RelayConnectionError,
    RelayTimeoutError,
    http_error,
)
from hybridrelay.protocol.websocket import (
    MAX_RESPONSE_HEAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameForwarder,
    ResponseHead,
    check_upgrade_response,
    close_payload,
    masked_frame,
    parse_response_head,
    upgrade_request,
)
from hybridrelay.transport.base import MessageKind, StreamSink, WsMessage
from hybridrelay.transport.receive_buffer import receive_buffer
from hybridrelay.transport.warm import WarmPool

__all__ = ["FrameSocket", "connect"]

logger = logging.getLogger("hybridrelay.client")

#: Queued received bytes above which the transport stops reading (message mode).
RECEIVE_HIGH = 512 * 1024
RECEIVE_LOW = 128 * 1024
#: The transport's write buffer limits (``pause_writing`` above the high mark).
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
#: ``write_nowait`` sends binary messages of at most this size: one read of the bridge's socket
#: (asyncio reads up to 256 KiB). Rendezvous streams have no message size limit (PROTOCOL.md
#: 5.5); 256 against 64 KiB measured +6 to +20 % bulk throughput and -14 % CPU per GB.
MAX_SPLICE_MESSAGE = 256 * 1024
#: How long a connection may take to flush on close, or the peer to answer our close frame
#: once nothing more is expected from it.
CLOSE_TIMEOUT = 10.0


async def connect(
    url: str,
    *,
    ssl_context: ssl.SSLContext,
    connect_timeout: float,
    headers: dict[str, str],
    protocols: tuple[str, ...] | list[str] = (),
    max_message_size: int,
    warm: WarmPool[FrameSocket] | None = None,
) -> FrameSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``) within ``connect_timeout``.

    With ``warm``, the connection is taken from that pool when it has one for the address
    (see :mod:`hybridrelay.transport.warm`), and one stale there is replaced by a new one.

    ``url`` may hold a secret (a rendezvous address): it never goes into an exception message
    or a log line from here.

    Raises:
        RelayHttpError: (or a subclass) the server answered with an HTTP status.
        RelayTimeoutError: no WebSocket within ``connect_timeout``.
        RelayConnectionError: the connection or the handshake failed.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RelayConnectionError("cannot connect: malformed URL") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise RelayConnectionError("cannot connect: not a ws:// or wss:// URL")
    secure = scheme == "wss"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    try:
        request = upgrade_request(
            target, parts.netloc.rpartition("@")[2], key, headers, tuple(protocols)
        )
    except ValueError as exc:
        raise RelayConnectionError(f"cannot connect: {exc}") from exc
    host = parts.hostname
    port = port or (443 if secure else 80)
    loop = asyncio.get_running_loop()

    async def open_connection() -> FrameSocket:
        """A new connection, set up (TLS too) and silent: the handshake is the caller's."""
        fresh = FrameSocket(max_message_size)
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(
                    lambda: fresh,
                    host,
                    port,
                    ssl=ssl_context if secure else None,
                    server_hostname=host if secure else None,
                )
        except BaseException:
            fresh.abort()
            raise
        return fresh

    socket: FrameSocket | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            head: ResponseHead | None = None
            if warm is not None:
                socket = warm.take((secure, host, port, max_message_size), open_connection)
            if socket is not None:
                try:
                    head = await socket.handshake(request)
                except ConnectionResetError:
                    if not socket.nothing_received():
                        raise
                    # A warm connection the server closed as we used it: connect anew.
                    socket.abort()
                    socket = None
            if socket is None:
                socket = await open_connection()
                head = await socket.handshake(request)
            assert head is not None
    except BaseException as exc:
        if socket is not None:
            socket.abort()
        if isinstance(exc, TimeoutError):
            raise RelayTimeoutError(f"no WebSocket within {connect_timeout:g} s") from exc
        if isinstance(exc, ssl.SSLError):
            raise RelayConnectionError(f"TLS handshake failed: {type(exc).__name__}") from exc
        if isinstance(exc, OSError):
            raise RelayConnectionError(f"cannot connect: {type(exc).__name__}") from exc
        if isinstance(exc, ProtocolError):
            raise RelayConnectionError(f"WebSocket handshake failed: {exc}") from exc
        raise
    if head.status != 101:
        socket.abort()
        raise http_error(head.status, head.reason)
    try:
        subprotocol = check_upgrade_response(head, key, tuple(protocols))
    except ProtocolError as exc:
        socket.abort()
        raise RelayConnectionError(f"WebSocket handshake failed: {exc}") from exc
    socket.open(subprotocol)
    return socket


def _client_frame(opcode: int, data: bytes | bytearray | memoryview, fin: bool = True) -> bytearray:
    """One masked frame with a fresh random key (RFC 6455 5.3), masked by aiohttp's C loop."""
    return masked_frame(opcode, data, os.urandom(4), websocket_mask, fin=fin)


class FrameSocket(asyncio.BufferedProtocol):
    """A client WebSocket (see the module's docstring); made by :func:`connect`."""

    def __init__(self, max_message_size: int) -> None:
        self._reader = FrameForwarder(
            websocket_mask, max_message_size=max_message_size, masked=False
        )
        self._reader.payload_only = True
        self._reader.track_messages = True
        self._transport: asyncio.Transport | None = None
        self._subprotocol: str | None = None
        self._close_sent = False
        self._close_received = False
        self._lost = False
        self._close_timer: asyncio.TimerHandle | None = None
        # The handshake: the response head, then what came after it until open().
        self._is_open = False
        self._head = bytearray()
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._early = bytearray()
        # Message mode.
        self._messages: collections.deque[WsMessage] = collections.deque()
        self._queued = 0
        self._parts: list[bytearray] = []
        self._close_message: WsMessage | None = None
        self._receive_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        # Sending.
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Splice mode.
        self._sink: StreamSink | None = None

    def __repr__(self) -> str:
        state = "open" if self._is_open else "connecting"
        if self._close_sent or self._close_received:
            state = f"close sent={self._close_sent} received={self._close_received}"
        return f"<FrameSocket {state}>"

    # -- the handshake ------------------------------------------------------------------------

    async def handshake(self, request: bytes) -> ResponseHead:
        """Send the upgrade request; the response head (the caller checks it)."""
        transport = self._transport
        if transport is None or self._lost:
            raise ConnectionResetError("the connection was closed before the handshake")
        self._head_waiter = asyncio.get_running_loop().create_future()
        transport.write(request)
        return await self._head_waiter

    def warm_usable(self) -> bool:
        """Connected, and silent both ways: it may still carry a handshake (the warm pool)."""
        transport = self._transport
        return (
            transport is not None
            and not self._lost
            and not transport.is_closing()
            and self._head_waiter is None
            and not self._early
        )

    def nothing_received(self) -> bool:
        """Not a byte came from the server (a handshake that failed this way may be retried
        on a new connection: the server never answered this one)."""
        return not self._head and not self._early

    def open(self, subprotocol: str | None) -> None:
        """The upgrade was accepted: frames may flow; what arrived meanwhile is read now."""
        self._subprotocol = subprotocol
        self._is_open = True
        early, self._early = bytes(self._early), bytearray()
        if early:
            self._received(memoryview(early))
        if self._transport is not None and not self._lost and not self._reading_paused:
            self._transport.resume_reading()

    # -- MessageSocket ------------------------------------------------------------------------

    @property
    def subprotocol(self) -> str | None:
        return self._subprotocol

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def close_received(self) -> bool:
        return self._close_received

    async def receive(self) -> WsMessage:
        while not self._messages:
            if self._close_message is not None:
                return self._close_message
            self._receive_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._receive_waiter
            finally:
                self._receive_waiter = None
        message = self._messages.popleft()
        if message.kind is not MessageKind.CLOSE:
            self._queued -= len(message.data)
            if self._reading_paused and self._queued <= RECEIVE_LOW:
                self._reading_paused = False
                if self._transport is not None and not self._lost:
                    self._transport.resume_reading()
        return message

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            self._write(OP_TEXT, data.encode("utf-8"), True)
        else:
            self._write(OP_BINARY, data, True)
        if self._write_paused:
            await self._drain()

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        self._write(OP_BINARY if first else OP_CONTINUATION, data, last)
        if self._write_paused:
            await self._drain()

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        self.close_nowait(code, reason)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self.close_nowait(code, reason)
        self._close_received = True
        self._drop()

    def abort(self) -> None:
        self._close_sent = self._close_received = True
        if self._transport is not None and not self._lost:
            self._transport.abort()

    # -- SpliceSocket ---------------------------------------------------------------------------

    def attach(self, sink: StreamSink) -> None:
        self._sink = sink
        messages, self._messages = list(self._messages), collections.deque()
        self._queued = 0
        close: WsMessage | None = None
        for message in messages:
            if message.kind is MessageKind.CLOSE:
                close = message  # after the part of a message that came before it
            elif message.data:
                data = message.data
                sink.on_data(data.encode("utf-8") if isinstance(data, str) else data)
        parts, self._parts = self._parts, []
        for part in parts:
            sink.on_data(part)
        if close is not None:
            sink.on_close(close.code or 1005, close.reason)
        if self._reading_paused:  # paused for the queue: the sink decides from now on
            self._reading_paused = False
            if self._transport is not None and not self._lost and not self._close_received:
                self._transport.resume_reading()
        if self._write_paused:
            sink.on_pause()

    def write_nowait(self, data: bytes | bytearray | memoryview) -> None:
        # Never raises: it runs in the caller's read callback. A connection that is closing
        # takes nothing more, and the sink learns of the end through on_close.
        transport = self._transport
        if len(data) <= MAX_SPLICE_MESSAGE:
            if not (self._close_sent or transport is None or transport.is_closing()):
                transport.write(_client_frame(OP_BINARY, data))
            return
        view = memoryview(data)
        for start in range(0, len(view), MAX_SPLICE_MESSAGE):
            if self._close_sent or transport is None or transport.is_closing():
                return
            transport.write(_client_frame(OP_BINARY, view[start : start + MAX_SPLICE_MESSAGE]))

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        if self._close_sent:
            return
        self._close_sent = True
        if self._transport is not None and not self._lost:
            self._transport.write(_client_frame(OP_CLOSE, close_payload(code, reason)))
        if self._close_received:
            self._drop()
        elif self._close_timer is None and not self._lost:
            # The peer owes us its close frame; a peer that never sends it is dropped.
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def pause_reading(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._lost and not self._close_received:
            self._transport.resume_reading()

    # -- writing --------------------------------------------------------------------------------

    def _write(self, opcode: int, data: bytes | bytearray | memoryview, fin: bool) -> None:
        if self._close_sent:
            raise RelayConnectionError("cannot send after the close frame")
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            raise RelayConnectionError("WebSocket send failed: the connection is closed")
        transport.write(_client_frame(opcode, data, fin))

    async def _drain(self) -> None:
        if self._lost:
            raise RelayConnectionError("WebSocket send failed: the connection was lost")
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.shield(self._drain_waiter)
        except ConnectionError as exc:
            raise RelayConnectionError(f"WebSocket send failed: {exc}") from exc

    def _drop(self) -> None:
        """Close the connection (after flushing); abort it if that takes too long."""
        if self._transport is None or self._lost:
            return
        self._transport.close()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    # -- asyncio protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = receive_buffer()[:nbytes]
        if self._is_open:
            self._received(data)
        elif self._head_waiter is None or self._head_waiter.done():
            self._early += data  # after the head, before open(): bounded by the pause below
            if len(self._early) > RECEIVE_HIGH and self._transport is not None:
                self._transport.pause_reading()
        else:
            self._head += data
            self._head_complete()

    def _head_complete(self) -> None:
        waiter = self._head_waiter
        assert waiter is not None
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_RESPONSE_HEAD:
                waiter.set_exception(ProtocolError("the response head is too long"))
            return
        self._early += self._head[end + 4 :]
        head, self._head = bytes(self._head[:end]), bytearray()
        try:
            waiter.set_result(parse_response_head(head))
        except ProtocolError as exc:
            waiter.set_exception(exc)

    def eof_received(self) -> bool | None:
        return None  # a WebSocket ends with close frames; a bare EOF ends the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(
                ConnectionResetError("the connection was closed during the handshake")
            )
        self._close_sent = True  # nothing more can be sent
        if self._close_message is None:  # also after aclose()/abort(): wake a waiting receive()
            self._report_close(1006, "")
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(ConnectionResetError("the connection was lost"))
            self._drain_waiter.exception()  # retrieved: nobody may be waiting on it

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._sink is not None:
            self._sink.on_pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._sink is not None:
            self._sink.on_resume()

    # -- reading --------------------------------------------------------------------------------

    def _received(self, data: memoryview) -> None:
        if self._close_received:
            return
        reader = self._reader
        try:
            pieces, controls = reader.feed(data)
        except FrameError as exc:
            self._deliver(exc.pieces, reader.message_ends)
            self._fail(exc.code, str(exc))
            return
        if pieces or reader.message_ends:
            self._deliver(pieces, reader.message_ends)
        for control in controls:
            if control.opcode == OP_PING:
                if not self._close_sent and self._transport is not None:
                    self._transport.write(_client_frame(OP_PONG, control.payload))
            elif control.opcode == OP_CLOSE:
                self._report_close(control.code, control.reason)
                if self._close_sent:
                    self._drop()
            # OP_PONG: we send no pings

    def _deliver(self, pieces: list[bytearray], ends: list[tuple[int, int]]) -> None:
        sink = self._sink
        if sink is not None:
            for piece in pieces:
                sink.on_data(piece)
            return
        start = 0
        for count, opcode in ends:
            self._parts += pieces[start:count]
            start = count
            data = b"".join(self._parts)
            self._parts = []
            if opcode == OP_TEXT:
                self._enqueue(WsMessage(MessageKind.TEXT, data.decode("utf-8")), len(data))
            else:
                self._enqueue(WsMessage(MessageKind.BINARY, data), len(data))
        self._parts += pieces[start:]

    def _enqueue(self, message: WsMessage, size: int) -> None:
        self._messages.append(message)
        self._queued += size
        if self._queued > RECEIVE_HIGH and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None and not self._lost:
                self._transport.pause_reading()
        self._wake()

    def _report_close(self, code: int, reason: str) -> None:
        self._close_received = True
        self._close_message = WsMessage(MessageKind.CLOSE, code=code, reason=reason)
        if self._sink is not None:
            self._sink.on_close(code, reason)
        else:
            self._messages.append(self._close_message)
        self._wake()

    def _wake(self) -> None:
        waiter = self._receive_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the framing rules (or sent too big a message): close with ``code``;
        reported as 1009 for a message too big, else as a lost connection (1006)."""
        logger.debug("WebSocket closed: %s (%d)", reason, code)
        self.close_nowait(code, reason)
        self._report_close(1009 if code == 1009 else 1006, "")
        self._drop()
