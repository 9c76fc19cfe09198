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

It is the SDK's only client WebSocket: sender and rendezvous sockets, listener control
channels and connections through an HTTP proxy alike.

* The close handshake is :class:`~hybridrelay.protocol.closing.CloseHandshake`: a close frame
  from the peer is reported, not answered (half-close, D2); our close frame goes out on
  ``send_close``/``close_nowait``, and the connection is dropped once both were seen, or when
  the peer does not answer ours within ``CLOSE_TIMEOUT``. This socket only arms the timer and
  writes the bytes.
* Pings are answered. With ``keepalive`` (control channels) a ping goes out every
  ``keepalive`` seconds, and a pong not back within half of that drops the connection,
  reported as a close 1006 whose reason says so. With ``stream_keepalive`` (relayed streams:
  the bridge's, a listener's rendezvous) the rule is the relay's for its legs
  (``transport/splice.py``), so that a slow reader is never dropped: a ping only after an
  interval in which nothing came and our reading was not paused, the drop when the next
  interval brings nothing either; while bytes wait to go out, the drop when the relay has
  acknowledged nothing for an interval at two ticks in a row
  (:func:`~hybridrelay.tcp_keepalive.acks_stalled`). So a link that went silent is found
  within three intervals by this end too. One timer per connection, nothing per frame but a
  flag.
* Through a proxy (:class:`Proxy`) the connection is an HTTP ``CONNECT`` tunnel (basic auth
  from the proxy URL's userinfo); a refusal is a :class:`RelayConnectionError` naming the
  proxy's status, and ``wss://`` gets its TLS over the tunnel (``loop.start_tls``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import ssl
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.exceptions import (
    ProtocolError,
    RelayConnectionError,
    http_error,
)
from hybridrelay.protocol.addressing import REJECTED_BY_HEADER, REJECTED_BY_LISTENER
from hybridrelay.protocol.closing import CloseHandshake
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
    masked_frame,
    parse_response_head,
    upgrade_request,
    whole_server_frames,
)
from hybridrelay.tcp_keepalive import acks_stalled, send_queued
from hybridrelay.transport.base import (
    COALESCED_WRITE_LIMIT,
    FramedSocketBase,
    MessageKind,
    StreamSink,
    WsMessage,
)
from hybridrelay.transport.connect_failure import connect_failure
from hybridrelay.transport.entropy import EntropyPool
from hybridrelay.transport.receive_buffer import receive_buffer
from hybridrelay.transport.warm import WarmPool

__all__ = ["FrameSocket", "Proxy", "connect", "mask_key"]

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


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy that tunnels with ``CONNECT``.

    Attributes:
        host, port: where the proxy listens.
        authorization: the ``Proxy-Authorization`` value (basic auth), or None.
    """

    host: str
    port: int
    authorization: str | None = None

    def __repr__(self) -> str:  # the credentials stay out of logs
        auth = ", authorization=<hidden>" if self.authorization else ""
        return f"Proxy({self.host!r}, {self.port}{auth})"

    def connect_request(self, host: str, port: int) -> bytes:
        """The ``CONNECT`` request for a tunnel to ``host:port``."""
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.authorization:
            lines.append(f"Proxy-Authorization: {self.authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def connect(
    url: str,
    *,
    ssl_context: ssl.SSLContext,
    connect_timeout: float,
    headers: dict[str, str],
    protocols: tuple[str, ...] | list[str] = (),
    max_message_size: int,
    warm: WarmPool[FrameSocket] | None = None,
    proxy: Proxy | None = None,
    keepalive: float | None = None,
    stream_keepalive: float | None = None,
) -> FrameSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``) within ``connect_timeout``.

    With ``warm``, the connection is taken from that pool when it has one for the address
    (see :mod:`hybridrelay.transport.warm`), and one stale there is replaced by a new one.
    With ``proxy``, through a ``CONNECT`` tunnel of that proxy (never warm). With
    ``keepalive``, pinged every that many seconds; with ``stream_keepalive``, pinged after
    that many seconds of silence (see the module's docstring).

    ``url`` may hold a secret (a rendezvous address): it never goes into an exception message
    or a log line from here.

    Raises:
        RelayHttpError: (or a subclass) the server answered with an HTTP status.
        RelayTimeoutError: no WebSocket within ``connect_timeout``.
        RelayConnectionError: the connection or the handshake failed, or the proxy refused.
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
                if proxy is None:
                    await loop.create_connection(
                        lambda: fresh,
                        host,
                        port,
                        ssl=ssl_context if secure else None,
                        server_hostname=host if secure else None,
                    )
                else:
                    await loop.create_connection(lambda: fresh, proxy.host, proxy.port)
                    await fresh.tunnel(proxy.connect_request(host, port))
                    if secure:
                        await fresh.start_tls(ssl_context, host)
        except BaseException:
            fresh.abort()
            raise
        return fresh

    socket: FrameSocket | None = None
    try:
        async with asyncio.timeout(connect_timeout):
            head: ResponseHead | None = None
            if warm is not None and proxy is None:
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
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if isinstance(exc, TimeoutError | OSError):  # ssl.SSLError is an OSError
            via = f"{proxy.host}:{proxy.port}" if proxy is not None else None
            raise connect_failure(address, exc, timeout=connect_timeout, via=via) from exc
        if isinstance(exc, ProtocolError):
            raise RelayConnectionError(
                f"cannot connect to {address}: WebSocket handshake failed: {exc}"
            ) from exc
        raise
    if head.status != 101:
        socket.abort()
        by_listener = head.headers.get(REJECTED_BY_HEADER.lower()) == REJECTED_BY_LISTENER
        raise http_error(head.status, head.reason, by_listener=by_listener)
    try:
        subprotocol = check_upgrade_response(head, key, tuple(protocols))
    except ProtocolError as exc:
        socket.abort()
        raise RelayConnectionError(f"WebSocket handshake failed: {exc}") from exc
    socket.open(subprotocol)
    if keepalive is not None:
        socket.keep_alive(keepalive)
    elif stream_keepalive is not None:
        socket.keep_alive_when_silent(stream_keepalive)
    return socket


#: Mask keys are cut from this many bytes of ``os.urandom`` at a time (see :func:`mask_key`).
_MASK_KEYS = EntropyPool(4)


def mask_key() -> bytes:
    """A fresh mask key (RFC 6455 5.3: from a strong source of entropy, unpredictable to the
    peer): the next 4 bytes of a pool of ``os.urandom`` batches (``transport/entropy.py``),
    each used once. One system call per 1,024 frames instead of one per frame (getrandom was
    ~5 % of a listener's CPU per relayed request)."""
    return _MASK_KEYS.take()


def _client_frame(opcode: int, data: bytes | bytearray | memoryview, fin: bool = True) -> bytearray:
    """One masked frame with a fresh key (:func:`mask_key`), masked by aiohttp's C loop."""
    return masked_frame(opcode, data, mask_key(), websocket_mask, fin=fin)


class FrameSocket(FramedSocketBase, asyncio.BufferedProtocol):
    """A client WebSocket (see the module's docstring); made by :func:`connect`."""

    def __init__(self, max_message_size: int) -> None:
        self._max_message_size = max_message_size
        self._reader = FrameForwarder(
            websocket_mask, max_message_size=max_message_size, masked=False
        )
        self._reader.payload_only = True
        self._reader.track_messages = True
        self._transport: asyncio.Transport | None = None
        # The loop the connection runs on (from connection_made): asyncio.get_running_loop()
        # costs a getpid system call on Python 3.11, and receive() and the batched writes
        # want the loop for every message.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subprotocol: str | None = None
        self._closing = CloseHandshake()
        self._lost = False
        self._close_timer: asyncio.TimerHandle | None = None
        # Keep-alive: the interval, and the pending ping or pong deadline.
        self._keepalive: float | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._pong_due = False
        # Stream keep-alive: the interval; bytes came since the last tick; the last tick
        # pinged (or found the acknowledgements stalled); the sink paused our reading.
        self._silence: float | None = None
        self._heard = False
        self._suspect = False
        self._sink_paused = False
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
        # Frames of send_nowait(later=True) in this turn of the event loop, written together
        # at its end or once they reach COALESCED_WRITE_LIMIT (a few system calls for many
        # small responses, and the relay starts on the first ones; None: nothing waits).
        self._later: bytearray | None = None
        # Splice mode.
        self._sink: StreamSink | None = None
        # Partial binary messages (stream_binary): the largest text message then.
        self._partial_text_limit: int | None = None

    def __repr__(self) -> str:
        state = "open" if self._is_open else "connecting"
        closing = self._closing
        if closing.sent or closing.received:
            state = f"close sent={closing.sent} received={closing.received}"
        return f"<FrameSocket {state}>"

    # -- the handshake ------------------------------------------------------------------------

    async def tunnel(self, request: bytes) -> None:
        """Send a proxy's ``CONNECT`` request; return once the tunnel is up.

        Raises:
            RelayConnectionError: the proxy answered with a status other than 2xx.
        """
        head = await self.handshake(request)
        if not 200 <= head.status < 300:
            raise RelayConnectionError(
                f"the proxy refused the tunnel: {head.status} {head.reason}".rstrip()
            )
        if self._early:
            raise RelayConnectionError("the proxy sent data before the tunnel was used")
        self._head_waiter = None

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str) -> None:
        """TLS over the connection (a proxy's tunnel) to ``server_hostname``."""
        transport = self._transport
        if transport is None or self._lost:
            raise ConnectionResetError("the connection was closed before TLS")
        loop = asyncio.get_running_loop()
        secured = await loop.start_tls(
            transport, self, ssl_context, server_hostname=server_hostname
        )
        if secured is None:
            raise ConnectionResetError("the connection was closed during TLS")
        self._transport = secured
        self._transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

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

    async def receive(self) -> WsMessage:
        while not self._messages:
            if self._close_message is not None:
                return self._close_message
            self._receive_waiter = (self._loop or asyncio.get_running_loop()).create_future()
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

    def send_nowait(
        self, *messages: bytes | str, then_fragment: bytes | None = None, later: bool = False
    ) -> bool:
        """Send whole messages in one write (a response's head and its body: one system call,
        one segment, rather than two), and ``then_fragment``, the first fragment of a binary
        message that :meth:`send_fragment` continues; True when the transport is over its
        high-water mark and :meth:`drain` should be awaited.

        ``later``: written at the end of this turn of the event loop together with whatever
        else is sent so, or as soon as that reaches ``COALESCED_WRITE_LIMIT`` (a listener
        answering many requests in one turn makes a few system calls, not one each); any
        other send writes them first, in order."""
        frames = bytearray()
        for data in messages:
            if isinstance(data, str):
                frames += _client_frame(OP_TEXT, data.encode("utf-8"), True)
            else:
                frames += _client_frame(OP_BINARY, data, True)
        if then_fragment is not None:
            frames += _client_frame(OP_BINARY, then_fragment, False)
        self._write_frames(frames, later=later)
        return self._write_paused

    async def drain(self) -> None:
        """Return once the transport is below its high-water mark."""
        if self._write_paused:
            await self._drain()

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        self._write(OP_BINARY if first else OP_CONTINUATION, data, last)
        if self._write_paused:
            await self._drain()

    def abort(self) -> None:
        self._closing.give_up()
        self._stop_keepalive()
        if self._transport is not None and not self._lost:
            self._transport.abort()

    def stream_binary(self, max_text_size: int) -> None:
        """From now on deliver binary messages in parts as their bytes arrive (``more`` set on
        all but the last part, see :class:`~hybridrelay.transport.base.WsMessage`) instead of
        whole: a streamed HTTP body, which has no size limit (open the socket with a
        ``max_message_size`` as large as bodies may be). Text messages stay whole, at most
        ``max_text_size`` bytes (close 1009 beyond)."""
        self._partial_text_limit = max_text_size

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
            if self._transport is not None and not self._lost and not self._closing.received:
                self._transport.resume_reading()
        if self._write_paused:
            sink.on_pause()

    def write_nowait(self, data: bytes | bytearray | memoryview) -> None:
        # Never raises: it runs in the caller's read callback. A connection that is closing
        # takes nothing more, and the sink learns of the end through on_close.
        transport = self._transport
        if len(data) <= MAX_SPLICE_MESSAGE:
            if not (self._closing.sent or transport is None or transport.is_closing()):
                transport.write(_client_frame(OP_BINARY, data))
            return
        view = memoryview(data)
        for start in range(0, len(view), MAX_SPLICE_MESSAGE):
            if self._closing.sent or transport is None or transport.is_closing():
                return
            transport.write(_client_frame(OP_BINARY, view[start : start + MAX_SPLICE_MESSAGE]))

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        step = self._closing.send(code, reason)
        if step.frame is None:
            return
        if self._transport is not None and not self._lost:
            self._transport.write(_client_frame(OP_CLOSE, step.frame))
        if step.drop:
            self._drop()
        elif step.arm and self._close_timer is None and not self._lost:
            # The peer owes us its close frame; a peer that never sends it is dropped.
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT, self._close_timed_out
            )

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self._closing.give_up().drop:
            self.abort()

    def pause_reading(self) -> None:
        self._sink_paused = True
        if self._transport is not None and not self._lost:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._sink_paused = False
        if self._transport is not None and not self._lost and not self._closing.received:
            self._transport.resume_reading()

    # -- keep-alive -------------------------------------------------------------------------------

    def keep_alive(self, interval: float) -> None:
        """Ping every ``interval`` seconds; a pong not back within half of it drops the
        connection (reported as a close 1006 that says so)."""
        self._keepalive = interval
        self._stop_keepalive()
        if not self._lost:
            self._keepalive_timer = asyncio.get_running_loop().call_later(interval, self._ping)

    def _ping(self) -> None:
        interval = self._keepalive
        transport = self._transport
        if interval is None or transport is None or self._lost or self._closing.sent:
            self._keepalive_timer = None
            return
        transport.write(_client_frame(OP_PING, b""))
        self._pong_due = True
        self._keepalive_timer = asyncio.get_running_loop().call_later(
            interval / 2, self._pong_missed
        )

    def _pong_missed(self) -> None:
        self._keepalive_timer = None
        if not self._pong_due or self._lost:
            return
        interval = self._keepalive or 0.0
        self._link_dead(f"no pong within {interval / 2:g} s of a keep-alive ping")

    def _link_dead(self, reason: str) -> None:
        """Keep-alive found the link dead: drop it, reported as a close 1006 that says why."""
        logger.info("WebSocket dropped: %s", reason)
        if self._close_message is None:
            self._report_close(1006, reason)
        self.abort()

    def keep_alive_when_silent(self, interval: float) -> None:
        """A relayed stream's keep-alive (see the module's docstring): judged every
        ``interval`` seconds."""
        self._silence = interval
        self._stop_keepalive()
        if not self._lost:
            self._keepalive_timer = asyncio.get_running_loop().call_later(
                interval, self._silence_tick
            )

    def _silence_tick(self) -> None:
        self._keepalive_timer = None
        interval = self._silence
        transport = self._transport
        if interval is None or transport is None or self._lost or self._closing.sent:
            return  # our close frame is out: CLOSE_TIMEOUT bounds the rest
        heard, self._heard = self._heard, False
        if heard or self._sink_paused or self._reading_paused:
            self._suspect = False  # alive, or silent because we do not read it
        elif send_queued(transport):
            # A ping would wait behind the queued bytes: the relay's acknowledgements tell.
            stalled = acks_stalled(transport.get_extra_info("socket"), interval)
            if stalled and self._suspect:
                self._link_dead(f"no acknowledgement for {2 * interval:g} s")
                return
            self._suspect = stalled
        elif self._closing.received:
            self._suspect = False  # the relay sends nothing more, not even a pong
        elif not self._suspect:
            transport.write(_client_frame(OP_PING, b""))
            self._suspect = True
        else:
            self._link_dead(f"nothing received for {interval:g} s after a keep-alive ping")
            return
        self._keepalive_timer = asyncio.get_running_loop().call_later(interval, self._silence_tick)

    def _pong_received(self) -> None:
        if not self._pong_due:
            return  # unsolicited (RFC 6455 5.5.3): no answer to anything
        self._pong_due = False
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        self._keepalive_timer = None
        if self._keepalive is not None and not self._lost:
            self._keepalive_timer = asyncio.get_running_loop().call_later(
                self._keepalive, self._ping
            )

    def _stop_keepalive(self) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        self._pong_due = False
        self._suspect = False

    # -- writing --------------------------------------------------------------------------------

    def _write(self, opcode: int, data: bytes | bytearray | memoryview, fin: bool) -> None:
        self._write_frames(_client_frame(opcode, data, fin))

    def _write_frames(self, frames: bytearray, *, later: bool = False) -> None:
        if self._closing.sent:
            raise RelayConnectionError("cannot send after the close frame")
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            raise RelayConnectionError("WebSocket send failed: the connection is closed")
        if self._later is not None:
            self._later += frames
            if not later or len(self._later) >= COALESCED_WRITE_LIMIT:
                self._write_later()
        elif later:
            self._later = frames
            (self._loop or asyncio.get_running_loop()).call_soon(self._write_later)
        else:
            transport.write(frames)

    def _write_later(self) -> None:
        frames, self._later = self._later, None
        transport = self._transport
        if frames and transport is not None and not self._lost and not transport.is_closing():
            transport.write(frames)

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
        self._loop = asyncio.get_running_loop()

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = receive_buffer()[:nbytes]
        self._heard = True
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
        self._stop_keepalive()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(
                ConnectionResetError("the connection was closed during the handshake")
            )
        self._closing.lost()  # nothing more can be sent
        if self._close_message is None:  # also after aclose()/abort(): wake a waiting receive()
            self._report_close(1006, "")
        self._drain_lost()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._sink is not None:
            self._sink.on_pause()

    def resume_writing(self) -> None:
        self._drained()
        if self._sink is not None:
            self._sink.on_resume()

    # -- reading --------------------------------------------------------------------------------

    def _received(self, data: memoryview) -> None:
        if self._closing.received:
            return
        reader = self._reader
        if self._sink is None and not self._parts and reader.between_messages:
            # Whole small messages (a control channel's) skip the general reader.
            frames, used = whole_server_frames(data, self._max_message_size)
            for opcode, payload in frames:
                if not self._enqueue_data(opcode, payload):
                    return
            if used == len(data):
                return
            data = data[used:]
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
                if not self._closing.sent and self._transport is not None:
                    self._transport.write(_client_frame(OP_PONG, control.payload))
            elif control.opcode == OP_CLOSE:
                step = self._closing.receive(control.code, control.reason)
                if step.news:
                    self._report_close(control.code, control.reason)
                if step.drop:
                    self._drop()
            elif control.opcode == OP_PONG:
                self._pong_received()

    def _deliver(self, pieces: list[bytearray], ends: list[tuple[int, int]]) -> None:
        sink = self._sink
        if sink is not None:
            for piece in pieces:
                sink.on_data(piece)
            return
        start = 0
        partial = self._partial_text_limit is not None
        for count, opcode in ends:
            self._parts += pieces[start:count]
            start = count
            data = b"".join(self._parts)
            self._parts = []
            if partial and opcode == OP_BINARY:
                self._enqueue(WsMessage(MessageKind.BINARY, data), len(data))
            elif not self._enqueue_data(opcode, data):
                return
        self._parts += pieces[start:]
        if partial and self._parts:
            if self._reader.message_opcode == OP_BINARY:
                data = b"".join(self._parts)
                self._parts = []
                self._enqueue(WsMessage(MessageKind.BINARY, data, more=True), len(data))
            elif sum(map(len, self._parts)) > (self._partial_text_limit or 0):
                self._parts = []
                self._fail(1009, "text message too big")

    def _enqueue_data(self, opcode: int, data: bytes) -> bool:
        """Queue one whole data message; a text message that is not UTF-8 fails the connection
        (1007) and gives False."""
        if opcode != OP_TEXT:
            self._enqueue(WsMessage(MessageKind.BINARY, data), len(data))
            return True
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "text message is not valid UTF-8")
            return False
        self._enqueue(WsMessage(MessageKind.TEXT, text), len(data))
        return True

    def _enqueue(self, message: WsMessage, size: int) -> None:
        self._messages.append(message)
        self._queued += size
        if self._queued > RECEIVE_HIGH and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None and not self._lost:
                self._transport.pause_reading()
        self._wake()

    def _report_close(self, code: int | None, reason: str) -> None:
        self._closing.received = True
        self._close_message = WsMessage(MessageKind.CLOSE, code=code, reason=reason)
        if self._sink is not None:
            self._sink.on_close(1005 if code is None else code, reason)
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
        self._closing.give_up()
        self._drop()
