"""What the relay's message legs share: a server WebSocket on a transport taken from aiohttp.

After a 101 the relay can take the connection away from aiohttp
(:func:`~hybridrelay.transport.splice.hand_over`, D9) and serve the WebSocket itself, with the
pure framing code (:class:`~hybridrelay.protocol.websocket.FrameForwarder`: masked client
frames in, checked against RFC 6455, payload only, message ends tracked) and the close
handshake of :class:`~hybridrelay.protocol.closing.CloseHandshake`. Two legs do that with
messages rather than a splice's frames: an HTTP request's rendezvous
(:class:`~hybridrelay.transport.http_leg.MessageLeg`) and a listener's control channel
(:class:`~hybridrelay.transport.control_leg.ControlLeg`). :class:`ServerLeg` is their common
part:

* it is created with reading paused; the bytes aiohttp had read behind the upgrade come in
  through aiohttp's parser interface (``feed_data``) and are read first when the leg starts;
* writing: unmasked server frames, a payload over 4 KiB written apart from its header (no
  copy); :meth:`ServerLeg._drain` waits while the transport's write buffer is above its
  high-water mark;
* our close frame goes out once (:meth:`ServerLeg.close_nowait`); the connection is dropped
  when both close frames went by, or when the peer does not answer ours within
  :attr:`ServerLeg.close_wait`; a closing transport that does not flush within
  ``CLOSE_TIMEOUT`` is aborted.

Each subclass reads the frames (``_received``) and says what the loss of the connection means
to its user (``_gone``).
"""

from __future__ import annotations

import asyncio

from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.protocol.closing import CloseHandshake
from hybridrelay.protocol.websocket import OP_CLOSE, OP_PONG, FrameForwarder, server_frame
from hybridrelay.transport.base import FramedSocketBase
from hybridrelay.transport.receive_buffer import receive_buffer

__all__ = ["CLOSE_TIMEOUT", "WRITE_HIGH", "WRITE_LOW", "ServerLeg"]

#: The transport's write buffer limits (``pause_writing`` above the high mark).
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
#: How long a closing transport may take to flush, and by default the peer to answer our
#: close frame.
CLOSE_TIMEOUT = 10.0
#: Payloads up to this size are joined to their frame header (one write, one copy).
_JOIN_UP_TO = 4096


class ServerLeg(FramedSocketBase, asyncio.BufferedProtocol):
    """A server WebSocket on a taken-over transport (see the module's docstring)."""

    #: How long the peer may take to answer our close frame before the connection is dropped.
    close_wait = CLOSE_TIMEOUT

    def __init__(self, transport: asyncio.Transport, *, max_message_size: int) -> None:
        self.transport = transport
        self._reader = FrameForwarder(websocket_mask, max_message_size=max_message_size)
        self._reader.payload_only = True
        self._reader.track_messages = True
        self._closing = CloseHandshake()
        self._lost = False
        self._started = False
        self._early: list[bytes] = []
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)

    def _read_early(self) -> None:
        """Mark the leg started and read what came with (or right after) the upgrade."""
        self._started = True
        early, self._early = self._early, []
        for data in early:
            self._received(memoryview(data))

    # -- MessageSocket's state ----------------------------------------------------------------

    @property
    def subprotocol(self) -> str | None:
        return None

    # -- closing ------------------------------------------------------------------------------

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Send our close frame once; the connection is dropped when both went by, or when
        the peer does not answer within :attr:`close_wait`."""
        step = self._closing.send(code, reason)
        if step.frame is None:
            return
        if not self._lost:
            self.transport.write(server_frame(OP_CLOSE, step.frame))
            # Read on (even when paused for the queue) so that the peer's answer is seen.
            if not self._closing.received:
                self.transport.resume_reading()
        if step.drop:
            self._drop()
        elif step.arm and self._close_timer is None and not self._lost:
            self._close_timer = asyncio.get_running_loop().call_later(
                self.close_wait, self._close_timed_out
            )

    def abort(self) -> None:
        self._closing.give_up()
        if not self._lost:
            self.transport.abort()

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self._closing.give_up().drop:
            self._drop()

    def _drop(self) -> None:
        """Close the connection (after flushing); abort it if that takes too long."""
        if self._lost:
            return
        self.transport.close()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    # -- writing ------------------------------------------------------------------------------

    def _write(self, head: bytes, payload: bytes | None = None) -> None:
        if self._closing.sent:
            raise RelayConnectionError("cannot send after the close frame")
        if self._lost or self.transport.is_closing():
            raise RelayConnectionError("WebSocket send failed: the connection is closed")
        if payload is None:
            self.transport.write(head)
        elif len(payload) <= _JOIN_UP_TO:
            self.transport.write(head + payload)
        else:
            self.transport.write(head)
            self.transport.write(payload)

    def _answer_ping(self, payload: bytes) -> None:
        if not self._closing.sent and not self._lost:
            self.transport.write(server_frame(OP_PONG, payload))

    async def _drain(self) -> None:
        """Return once the transport is below its high-water mark."""
        if self._write_paused:
            await super()._drain()

    # -- what a subclass does -----------------------------------------------------------------

    def _received(self, data: memoryview) -> None:
        """Bytes read from the connection, once started."""
        raise NotImplementedError

    def _gone(self, news: bool) -> None:
        """The connection is gone; ``news`` when no close frame had come from the peer."""
        raise NotImplementedError

    # -- asyncio protocol callbacks ----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = receive_buffer()[:nbytes]
        if self._started:
            self._received(data)
        else:
            self._early.append(bytes(data))

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        """aiohttp's parser interface (:func:`hand_over`): bytes read behind the upgrade."""
        self._early.append(bytes(data))
        return False, b""

    def feed_eof(self) -> None:
        """aiohttp's parser interface; the loss is handled in :meth:`connection_lost`."""

    def eof_received(self) -> bool | None:
        return None  # a WebSocket ends with close frames; a bare EOF ends the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        news = self._closing.lost().news
        self._gone(news)
        self._drain_lost()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._drained()
