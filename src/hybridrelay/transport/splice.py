"""The splice: a relayed connection's two WebSocket legs joined frame by frame.

Once the sender and the listener have both upgraded (E2 and E3), the relay is the WebSocket
server of both legs and has nothing to do but pass frames across: unmask what one side sends,
forward it unmasked to the other, answer pings, carry the close frames. Doing that at the level
of *messages* (aiohttp's WebSocketResponse, one ``receive()`` and one ``send()`` per message
in a task per direction) costs a task wake-up and a reassembled copy per message and keeps a
reader, a queue and a writer per leg. So after the 101 the relay takes the transports over:

* :func:`take_over` answers the upgrade with aiohttp (the 101 goes out through its response
  writer), collects whatever aiohttp had already buffered behind the request, makes a
  :class:`SpliceLeg` the transport's protocol and then tells aiohttp's protocol that its
  connection is gone (``connection_lost``): for aiohttp the request is over, its handler
  returns at once, and its per-connection state (the parsed request, the HTTP parser, the
  handler task: ~12 KiB per WebSocket; RSS per relayed connection 29.7 -> 4.8 KiB) is freed.
  The leg is kept alive by its transport; the caller tracks it (``on_lost``) for shutdown.
* Each :class:`SpliceLeg` is an :class:`asyncio.BufferedProtocol`: the transport reads into one
  receive buffer shared by every leg of the event loop (the leg keeps nothing of it: a frame's
  payload is unmasked into the bytes written to the other leg, a partial header is copied), so
  an idle leg holds no buffer at all. :class:`~hybridrelay.protocol.websocket.FrameForwarder`
  does the framing; the leg does the I/O in the callback that delivered the bytes: no task, no
  queue, no reassembly.
* Backpressure: when the other leg's transport is over its high-water mark it calls
  ``pause_writing`` on its leg, which pauses *reading* on this one; ``resume_writing`` resumes
  it. Nothing is buffered in the relay beyond the transports' own write buffers.
* Close (PROTOCOL.md 5.5): a close frame is forwarded with the same code and reason when legal,
  and the other direction keeps flowing until that side closes too (a half-closed TCP stream
  crossing the relay). A leg whose connection is lost, or that breaks the framing rules, gets
  (or sends) 1006 / 1002 / 1007 / 1009, and the other side a close frame (1011, or 1009).
  A leg that was sent its close frame and does not answer within ``CLOSE_TIMEOUT`` after its
  partner has gone is dropped, as is one whose write buffer does not drain after ``close()``.
* Keep-alive (``keep_alive``, the relay's ``limits.keep_alive_interval``): a leg the relay has
  heard nothing from for an interval is pinged, and dropped (its partner gets 1011) if it is
  still silent an interval later: a link that went silent (no FIN, no RST) is released within
  three intervals. Never while the silence is the relay's own doing: while the leg's reading
  is paused (its partner cannot take more). While bytes wait in its send queue a ping would
  wait behind them, so the kernel is asked instead (``tcp_keepalive.acks_stalled``): a leg
  that owes an acknowledgement and sent none for an interval, at two ticks in a row, is
  dropped the same way; a reader with a closed window answers the kernel's window probes. So
  a slow but live reader is never dropped, which is why a ping with a fixed pong deadline was
  not used (docs/DECISIONS.md D1). One timer per leg, nothing per frame but a flag.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.exceptions import ProtocolError
from hybridrelay.protocol.azbridge import ReplyDecoder
from hybridrelay.protocol.closing import CloseHandshake, sendable_close_code
from hybridrelay.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameError,
    FrameForwarder,
    frame_header,
    handshake_headers,
    server_frame,
)
from hybridrelay.tcp_keepalive import acks_stalled, send_queued
from hybridrelay.transport.receive_buffer import receive_buffer

__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_RAW_FRAME",
    "RawLeg",
    "Splice",
    "SpliceLeg",
    "hand_over",
    "take_over",
]

logger = logging.getLogger("hybridrelay.server")

#: How long a leg may take to answer our close frame once its partner has gone, and how long a
#: closing transport may take to flush.
CLOSE_TIMEOUT = 10.0

#: Below this many bytes, the frames produced by one read are joined into one write.
_JOIN_BELOW = 64 * 1024
#: Largest frame made of one read from a :class:`RawLeg`: the whole receive buffer, as the
#: bridge's pump sends (frames_ws.MAX_SPLICE_MESSAGE).
MAX_RAW_FRAME = 256 * 1024


class Splice:
    """The two legs of one relayed connection.

    The listener's leg is taken over first (its accept arrives while the sender waits) and
    set as :attr:`listener`; the sender's handler then takes its own leg over and calls
    :meth:`join`. If that never happens, :meth:`abandon` closes the listener's leg.
    """

    __slots__ = ("joined", "listener", "sender")

    def __init__(self) -> None:
        self.sender: SpliceLeg | RawLeg | None = None
        self.listener: SpliceLeg | None = None
        self.joined = False

    def join(self, sender: SpliceLeg | RawLeg) -> None:
        """Start forwarding between ``sender`` and the (already taken over) listener leg.

        ``sender`` is the sender's WebSocket leg, or a plain connection accepted by the relay's
        own ingress (:class:`RawLeg`): then the listener's data frames reach it as payload only.
        """
        listener = self.listener
        assert listener is not None and not self.joined
        self.sender = sender
        sender.peer, listener.peer = listener, sender
        listener.forwarder.payload_only = isinstance(sender, RawLeg)
        self.joined = True
        sender.start()
        listener.start()

    def abandon(self, reason: str) -> None:
        """The splice will not be joined: close the listener's leg (1001) if there is one."""
        if not self.joined and self.listener is not None:
            self.listener.close_now(1001, reason)


class _Leg(asyncio.BufferedProtocol):
    """What the two kinds of leg share: the partner, the loss, and flow control (when this
    leg's write buffer is full, the partner's reading is paused)."""

    __slots__ = (
        "_close_timer",
        "_on_lost",
        "_started",
        "bytes_forwarded",
        "close_received",
        "close_sent",
        "lost",
        "name",
        "peer",
        "transport",
        "write_full",
    )

    transport: asyncio.Transport
    peer: _Leg | None
    _on_lost: Callable[[Any], None] | None

    def __init__(self, name: str, on_lost: Callable[[Any], None] | None) -> None:
        self.name = name
        self._on_lost = on_lost
        self.peer = None
        self.close_sent = False
        self.close_received = False
        self.lost = False
        self.bytes_forwarded = 0
        # Between the transport's pause_writing and resume_writing: the partner is not read.
        # Kept here because start() must not resume a partner paused before (or while) it ran.
        self.write_full = False
        self._started = False
        self._close_timer: asyncio.TimerHandle | None = None

    def send_close(self, code: int, reason: str = "") -> None:
        raise NotImplementedError

    def close_now(self, code: int, reason: str = "") -> None:
        """Only a WebSocket leg is closed this way (a raw leg's partner always is one)."""
        raise NotImplementedError

    def expect_close_answer(self) -> None:
        raise NotImplementedError

    def write_pieces(self, pieces: list[bytearray], total: int) -> None:
        raise NotImplementedError

    def _tell_partner_gone(self) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._started:
            self._tell_partner_gone()
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        # Our write buffer is full: stop reading what the partner sends us.
        self.write_full = True
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_full = False
        if self.peer is not None and not self.peer.lost and not self.peer.close_received:
            self.peer.transport.resume_reading()

    def _may_read(self) -> bool:
        """Whether :meth:`start` may resume reading: not while the partner's write buffer is
        full (what start() forwarded may itself have filled it)."""
        peer = self.peer
        return not self.lost and not self.close_received and not (peer and peer.write_full)


class SpliceLeg(_Leg):
    """One upgraded leg of a splice (the relay is its WebSocket server).

    Created by :func:`take_over` with reading paused; :meth:`start` (via :meth:`Splice.join`)
    forwards what arrived meanwhile and resumes reading.
    """

    __slots__ = (
        "_closing",
        "_early",
        "_heard",
        "_keep_alive",
        "_keep_alive_timer",
        "_pinged",
        "forwarder",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        max_message_size: int,
        name: str = "",
        on_lost: Callable[[SpliceLeg], None] | None = None,
        keep_alive: float | None = None,
    ) -> None:
        super().__init__(name, on_lost)
        self.transport = transport
        self.forwarder = FrameForwarder(websocket_mask, max_message_size=max_message_size)
        self._early: list[bytes] = []
        self._keep_alive = keep_alive
        self._keep_alive_timer: asyncio.TimerHandle | None = None
        self._heard = False
        self._pinged = False
        # Decides the close handshake; close_sent/close_received mirror it for the data path
        # (plain attributes, read on every forwarded read).
        self._closing = CloseHandshake()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        early, self._early = self._early, []
        for data in early:
            self._received(data)
        if self._may_read():
            self.transport.resume_reading()
        if self.lost:
            self._tell_partner_gone()
        elif self._keep_alive is not None:
            self._keep_alive_timer = asyncio.get_running_loop().call_later(
                self._keep_alive, self._keep_alive_tick
            )

    def send_close(self, code: int, reason: str = "") -> None:
        """Send our close frame once (this leg may go on sending to us).

        The close timer is not armed here (the handshake's ``arm``): while its partner is
        there, a leg sent our close is half-closed and may go on sending for as long as it
        likes; :meth:`expect_close_answer` arms it once nothing more can be forwarded.
        """
        if self.lost:
            return
        step = self._closing.send(code, reason)
        if step.frame is None:
            return
        self.close_sent = True
        self.transport.write(server_frame(OP_CLOSE, step.frame))
        if step.drop:
            self._drop()

    def close_now(self, code: int, reason: str = "") -> None:
        """Send our close frame (if not yet sent) and drop the connection once it is out."""
        self.send_close(code, reason)
        self._closing.give_up()
        self.close_received = True
        self._drop()

    def expect_close_answer(self) -> None:
        """We sent our close frame and nothing more will be forwarded to it: read this leg
        (it may have been paused because its partner could not take more) until its close
        frame comes, and drop it if that takes longer than ``CLOSE_TIMEOUT``."""
        if self.lost:
            return
        if not self.close_received and self._started:
            self.transport.resume_reading()
        if self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Drop the connection now; the partner is told (1011) unless this leg had closed."""
        self._closing.give_up()
        self.close_sent = True  # nothing more is written to it
        if not self.lost:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing.lost()
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        super().connection_lost(exc)

    # -- keep-alive (see the module's docstring) -----------------------------------------------

    def _keep_alive_tick(self) -> None:
        self._keep_alive_timer = None
        interval = self._keep_alive
        if interval is None or self.lost or self.close_received or self.close_sent:
            return  # a closing leg has CLOSE_TIMEOUT
        heard, self._heard = self._heard, False
        peer = self.peer
        if heard or (peer is not None and peer.write_full):
            self._pinged = False  # alive, or silent because we do not read it
        elif send_queued(self.transport):
            # A ping would wait behind the queued bytes: the peer's acknowledgements tell.
            # _pinged: the last tick found them stalled too.
            stalled = acks_stalled(self.transport.get_extra_info("socket"), interval)
            if stalled and self._pinged:
                logger.info(
                    "splice leg %s dropped: no acknowledgement for %g s", self.name, 2 * interval
                )
                self.abort()
                return
            self._pinged = stalled
        elif not self._pinged:
            self.transport.write(server_frame(OP_PING, b""))
            self._pinged = True
        else:
            logger.info("splice leg %s dropped: silent for %g s after a ping", self.name, interval)
            self.abort()  # the partner is told (1011) when the connection is gone
            return
        self._keep_alive_timer = asyncio.get_running_loop().call_later(
            interval, self._keep_alive_tick
        )

    def _drop(self) -> None:
        """Both close frames are through (or the leg is unusable): close the connection.

        ``close()`` flushes what is still buffered first; a peer that never reads does not get
        to keep the connection open past ``CLOSE_TIMEOUT``.
        """
        if self.lost:
            return
        self.transport.close()
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    # -- asyncio protocol callbacks ----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = receive_buffer()[:nbytes]
        self._heard = True
        if self._started:
            self._received(data)
        else:  # only before start(): bytes that came with or right after the upgrade
            self._early.append(bytes(data))

    def eof_received(self) -> bool | None:
        return None  # a WebSocket ends with close frames; a bare EOF ends the leg

    # -- the two aiohttp hooks of take_over() -------------------------------------------------

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """aiohttp's parser interface: the bytes it buffered behind the upgrade request."""
        self._early.append(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        """aiohttp's parser interface; the loss is handled in :meth:`connection_lost`."""

    # -- forwarding ----------------------------------------------------------------------------

    def _received(self, data: bytes | memoryview) -> None:
        if self.close_received:
            return
        try:
            pieces, controls = self.forwarder.feed(data)
        except FrameError as exc:
            if exc.pieces:
                self._forward(exc.pieces)
            self._fail(exc.code, str(exc))
            return
        if pieces:
            self._forward(pieces)
        for control in controls:
            if control.opcode == OP_PING:
                if not self.close_sent:
                    self.transport.write(server_frame(OP_PONG, control.payload))
            elif control.opcode == OP_CLOSE:
                step = self._closing.receive(control.code, control.reason)
                self.close_received = True
                self.transport.pause_reading()
                assert self.peer is not None
                self.peer.send_close(self._closing.answer_code, control.reason)
                if step.drop:
                    self._drop()
            # OP_PONG: nothing more to do (its bytes counted as heard, for keep-alive)

    def _forward(self, pieces: list[bytearray]) -> None:
        peer = self.peer
        assert peer is not None
        if peer.close_sent or peer.lost:
            return  # the partner is closing: nothing more may be sent to it
        total = sum(map(len, pieces))
        self.bytes_forwarded += total
        peer.write_pieces(pieces, total)

    def write_pieces(self, pieces: list[bytearray], total: int) -> None:
        """Write what the partner forwards (frames, already unmasked)."""
        _write_pieces(self.transport, pieces, total)

    def _fail(self, code: int, reason: str) -> None:
        """This leg broke the framing rules: close it with ``code``, tell the partner."""
        logger.debug("splice leg closed: %s (%d)", reason, code)
        self.close_now(code, reason)
        peer = self.peer
        if peer is not None:
            peer.send_close(1009 if code == 1009 else 1011, "peer violated the WebSocket protocol")
            peer.expect_close_answer()

    def _tell_partner_gone(self) -> None:
        """This leg's connection is gone: the partner gets a close frame and a deadline."""
        peer = self.peer
        if peer is None:
            return
        if not self.close_received:  # lost without a close frame (1006 -> 1011 on the wire)
            peer.send_close(sendable_close_code(1006), "")
        peer.expect_close_answer()


class RawLeg(_Leg):
    """A plain TCP or Unix connection accepted by the relay's own ingress, as a splice's sender.

    Bytes read from it go to the listener's leg as binary frames (unmasked: the relay is that
    WebSocket's server) of at most ``MAX_RAW_FRAME`` bytes, one per read; the listener's data
    frames come back as their payload only (:attr:`FrameForwarder.payload_only`).
    Half-close crosses as in the bridge (PROTOCOL.md 5.5): EOF from the connection becomes our
    close frame (1000) to the listener; the listener's close frame with 1000 becomes
    ``shutdown(SHUT_WR)``, with any other code a reset (the far side failed); the connection is
    closed once both directions are done.

    With a ``preamble`` (an azbridge logical port, see :mod:`hybridrelay.protocol.azbridge`),
    :meth:`start` sends it first, and the listener's first three payload bytes are its reply:
    only what follows an accepting reply reaches the connection; a refusal resets it. The
    connection's own bytes are sent behind the preamble at once (the edge keeps what follows
    the preamble), which saves the reply's round trip before the first byte.

    Created with reading paused (``connection_made``); :meth:`start` (via :meth:`Splice.join`)
    resumes it.
    """

    __slots__ = ("_early", "_on_connected", "_preamble", "_reply", "peername")

    def __init__(
        self,
        *,
        name: str = "",
        on_connected: Callable[[RawLeg], None] | None = None,
        on_lost: Callable[[RawLeg], None] | None = None,
    ) -> None:
        # close_sent: nothing more is written to the connection (EOF sent, or reset);
        # close_received: the connection sent its EOF.
        super().__init__(name, on_lost)
        self._on_connected = on_connected
        self.transport = cast(asyncio.Transport, None)
        self.peername: Any = None
        self._preamble = b""
        self._early: list[bytes] = []
        self._reply: ReplyDecoder | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def set_preamble(self, preamble: bytes) -> None:
        """Send ``preamble`` before the connection's bytes and expect azbridge's reply."""
        self._preamble = preamble
        self._reply = ReplyDecoder()

    def start(self) -> None:
        self._started = True
        peer = self.peer
        assert peer is not None
        if self._preamble:
            peer.transport.write(server_frame(OP_BINARY, self._preamble))
        early, self._early = self._early, []
        for frame in early:
            self.bytes_forwarded += len(frame)
            peer.transport.write(frame)
        if self.lost:
            self._tell_partner_gone()
        elif self.close_received:  # its EOF came before start() (uvloop: see buffer_updated)
            peer.send_close(1000)
        elif self._may_read():
            self.transport.resume_reading()

    def send_close(self, code: int, reason: str = "") -> None:
        """The partner ended its direction: half-close (1000) or reset (anything else)."""
        if self.close_sent or self.lost:
            return
        self.close_sent = True
        if code != 1000 or self._reply is not None:  # failed, or closed without a reply
            self.transport.abort()
            return
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # reset meanwhile (not read yet): nothing can reach it any more
                self.transport.abort()
                return
        if self.close_received:
            self._drop()

    def expect_close_answer(self) -> None:
        """The partner is gone or sends nothing more: nothing this connection sends can go
        anywhere, so close it (after flushing what is queued)."""
        self.close_sent = True
        self._drop()

    def abort(self) -> None:
        self.close_sent = True
        if not self.lost and self.transport is not None:
            self.transport.abort()

    def _drop(self) -> None:
        if self.lost or self.transport is None:
            return
        self.transport.close()
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    # -- asyncio protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.peername = transport.get_extra_info("peername")
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()[:MAX_RAW_FRAME]

    def buffer_updated(self, nbytes: int) -> None:
        frame = frame_header(True, OP_BINARY, nbytes) + receive_buffer()[:nbytes]
        if not self._started:
            # Reading is paused until start(), but uvloop starts reading after
            # connection_made whatever it asked: pause again, or the client could fill
            # _early without bound while the listener is being asked.
            self._early.append(frame)
            self.transport.pause_reading()
            return
        peer = self.peer
        if peer is None or peer.close_sent or peer.lost:
            return  # the listener is closing: nothing more may be sent to it
        self.bytes_forwarded += nbytes
        peer.transport.write(frame)

    def eof_received(self) -> bool:
        self.close_received = True
        if self.peer is not None:
            self.peer.send_close(1000)
        if self.close_sent:
            self._drop()
        return True  # keep the transport open: the other direction may still be flowing

    # -- forwarding ----------------------------------------------------------------------------

    def write_pieces(self, pieces: list[bytearray], total: int) -> None:
        """The listener's payload bytes; the first three answer the preamble."""
        if self._reply is None:
            _write_pieces(self.transport, pieces, total)
            return
        try:
            reply = self._reply.feed(b"".join(pieces))
        except ProtocolError as exc:
            reply, reason = None, str(exc)
        else:
            if reply is None:
                return  # the reply is not complete yet
            reason = reply.describe()
        rest, self._reply = (self._reply.rest, None)
        if reply is None or not reply.accepted:
            logger.debug("%s: port refused: %s", self.name, reason)
            self.abort()
            if self.peer is not None:
                self.peer.close_now(1000, "")
            return
        if rest:
            self.transport.write(rest)

    def _tell_partner_gone(self) -> None:
        peer = self.peer
        if peer is None:
            return
        if not self.close_received:  # reset, or lost before its EOF
            peer.send_close(1011, "the ingress connection was lost")
        peer.expect_close_answer()


def _write_pieces(transport: asyncio.Transport, pieces: list[bytearray], total: int) -> None:
    if len(pieces) == 1:
        transport.write(pieces[0])
        return
    if total < _JOIN_BELOW:
        transport.write(b"".join(pieces))
    else:
        for piece in pieces:
            transport.write(piece)


class _HandedOver(Protocol):
    """What :func:`hand_over` makes the connection's protocol: an asyncio protocol that also
    takes aiohttp's parser calls (the bytes read behind the upgrade)."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...

    def feed_eof(self) -> None: ...


P = TypeVar("P", bound=_HandedOver)


async def take_over(
    request: web.BaseRequest,
    subprotocol: str | None,
    *,
    max_message_size: int,
    name: str = "",
    on_lost: Callable[[SpliceLeg], None] | None = None,
    response_headers: dict[str, str] | None = None,
    keep_alive: float | None = None,
) -> tuple[web.StreamResponse, SpliceLeg | None]:
    """Answer the upgrade with 101 and make a :class:`SpliceLeg` the connection's protocol.

    Returns the response (for the aiohttp handler to return at once: the connection is no
    longer aiohttp's) and the leg, with reading paused until :meth:`Splice.join`; the leg is
    None when the connection went away during the upgrade. ``on_lost`` is called once the
    leg's connection is gone. The request must already have been checked with
    :func:`~hybridrelay.protocol.websocket.handshake_headers` (pass its result as
    ``response_headers`` to avoid computing it twice). ``keep_alive``: the leg's keep-alive
    interval once joined (see the module's docstring), None for none.
    """
    headers = response_headers or handshake_headers(request.headers, subprotocol)
    return await hand_over(
        request,
        headers,
        lambda transport: SpliceLeg(
            transport,
            max_message_size=max_message_size,
            name=name,
            on_lost=on_lost,
            keep_alive=keep_alive,
        ),
    )


async def hand_over(
    request: web.BaseRequest,
    headers: dict[str, str],
    make_protocol: Callable[[asyncio.Transport], P],
) -> tuple[web.StreamResponse, P | None]:
    """Answer the upgrade with 101 (``headers``) and make ``make_protocol(transport)`` the
    connection's protocol, with reading paused; None when the connection went away during
    the upgrade. :func:`take_over` for a splice; the relay's HTTP rendezvous
    (:class:`~hybridrelay.transport.http_leg.MessageLeg`) too."""
    response = web.StreamResponse(status=101, headers=headers)
    handler_protocol = request.protocol
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await response.prepare(request)
    except (ConnectionError, RuntimeError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()
        return response, None
    transport = request.transport
    if transport is None or transport.is_closing():
        return response, None
    handler_protocol.keep_alive(False)
    leg = make_protocol(transport)
    # Bytes aiohttp read behind the request are handed to the leg by set_parser(); from then
    # on the leg is the transport's protocol and aiohttp's parser sees nothing more.
    set_parser = cast(Callable[[Any], None], handler_protocol.set_parser)
    set_parser(leg)
    transport.pause_reading()
    transport.set_protocol(cast(asyncio.BaseProtocol, leg))
    # Hand-over complete: for aiohttp the connection is gone. Its protocol first lets go of
    # the transport (else its force_close() would close it), then forgets the connection (its
    # server's connection count, keep-alive timer, parser); its request loop ends without
    # touching the transport when our handler returns (the 101 needs no further write).
    handler_protocol.transport = None
    try:
        handler_protocol.connection_lost(None)
    except Exception:  # aiohttp's bookkeeping only: the leg works regardless
        logger.debug("aiohttp's protocol failed to let go of a spliced connection", exc_info=True)
    return response, leg
