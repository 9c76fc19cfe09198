"""The relay's side of an HTTP request rendezvous, on the frame-level data path (D9).

aiohttp's WebSocket reassembles a fragmented message before handing it over, so an HTTP body
relayed through it (one WebSocket message, PROTOCOL.md 6.2) was held whole by the relay, with
a size cap, and the HTTP client saw nothing until the listener had finished. After the 101 the
relay takes the rendezvous' transport away from aiohttp, as a splice does
(:func:`~hybridrelay.transport.splice.hand_over`), and reads it with the same pure framing code:

* text messages (the listener's ``response``) are delivered whole, up to ``max_text_size``;
* binary messages (a response body) are delivered in parts as their bytes arrive:
  :class:`~hybridrelay.transport.base.WsMessage` items with ``more=True``, the message's last
  part with ``more=False``; there is no size limit, only the bounded queue below;
* reading pauses while more than ``RECEIVE_HIGH`` bytes wait to be taken, so memory is bounded
  by that and the transports' buffers, never by a body's size;
* writing: whole text messages and the fragments of one binary message (an upload), unmasked
  server frames, waiting while the transport's write buffer is above its high-water mark;
* pings are answered; the close handshake is :class:`~hybridrelay.protocol.closing.CloseHandshake`;
  a peer that does not answer our close frame within ``CLOSE_TIMEOUT`` is dropped.

What it shares with the control channel's leg (the hand-over's early bytes, writing, the close
handshake) is :class:`~hybridrelay.transport.server_leg.ServerLeg`.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from hybridrelay.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    FrameError,
    server_frame,
    server_frame_header,
)
from hybridrelay.transport.base import MessageKind, WsMessage
from hybridrelay.transport.server_leg import CLOSE_TIMEOUT, ServerLeg

__all__ = ["CLOSE_TIMEOUT", "RECEIVE_HIGH", "MessageLeg"]

logger = logging.getLogger("hybridrelay.server")

#: Bytes waiting to be taken above which the transport stops reading, and below which it
#: resumes.
RECEIVE_HIGH = 256 * 1024
RECEIVE_LOW = 64 * 1024
#: No binary message is too big: the body streams (FrameForwarder still needs a bound).
_UNBOUNDED = 2**62


class MessageLeg(ServerLeg):
    """A server WebSocket on a taken-over transport: whole text messages, binary messages in
    parts (see the module's docstring). Created with reading paused; :meth:`start` reads what
    came with the upgrade and resumes it."""

    def __init__(self, transport: asyncio.Transport, *, max_text_size: int) -> None:
        super().__init__(transport, max_message_size=_UNBOUNDED)
        self._max_text_size = max_text_size
        self._messages: collections.deque[WsMessage] = collections.deque()
        self._queued = 0
        self._reading_paused = False
        self._text: list[bytearray] = []
        self._text_size = 0
        self._close_message: WsMessage | None = None
        self._receive_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<MessageLeg sent={self._closing.sent} received={self._closing.received}>"

    def start(self) -> None:
        self._read_early()
        if not self._lost and not self._reading_paused and not self._closing.received:
            self.transport.resume_reading()

    # -- MessageSocket ----------------------------------------------------------------------

    async def receive(self) -> WsMessage:
        """The next text message, binary part, or the close (again every time after it)."""
        while not self._messages:
            if self._close_message is not None:
                return self._close_message
            self._receive_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._receive_waiter
            finally:
                self._receive_waiter = None
        message = self._messages.popleft()
        self._queued -= len(message.data)
        if self._reading_paused and self._queued <= RECEIVE_LOW:
            self._reading_paused = False
            if not self._lost and not self._closing.received:
                self.transport.resume_reading()
        return message

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            self._write(server_frame(OP_TEXT, data.encode("utf-8")))
        else:
            self._write(server_frame_header(True, OP_BINARY, len(data)), data)
        await self._drain()

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        opcode = OP_BINARY if first else OP_CONTINUATION
        self._write(server_frame_header(last, opcode, len(data)), data)
        await self._drain()

    # -- the loss -------------------------------------------------------------------------------

    def _gone(self, news: bool) -> None:
        if news or self._close_message is None:
            self._report_close(self._closing.code or 1006, "")

    # -- reading ------------------------------------------------------------------------------

    def _received(self, data: memoryview) -> None:
        if self._closing.received:
            return
        reader = self._reader
        try:
            pieces, controls = reader.feed(data)
        except FrameError as exc:
            self._deliver(exc.pieces, reader.message_ends)
            self._fail(exc.code, str(exc))
            return
        if pieces or reader.message_ends:
            if not self._deliver(pieces, reader.message_ends):
                return
        for control in controls:
            if control.opcode == OP_PING:
                self._answer_ping(control.payload)
            elif control.opcode == OP_CLOSE:
                step = self._closing.receive(control.code, control.reason)
                if step.news:
                    self._report_close(control.code or 1005, control.reason)
                if step.drop:
                    self._drop()
            # OP_PONG: the relay sends no pings on a rendezvous

    def _deliver(self, pieces: list[bytearray], ends: list[tuple[int, int]]) -> bool:
        """Queue whole text messages and binary parts; False when the leg failed."""
        start = 0
        for count, opcode in ends:
            if not self._take(pieces[start:count], opcode, last=True):
                return False
            start = count
        rest = pieces[start:]
        if rest:
            return self._take(rest, self._reader.message_opcode, last=False)
        return True

    def _take(self, pieces: list[bytearray], opcode: int, *, last: bool) -> bool:
        if opcode == OP_TEXT:
            self._text += pieces
            self._text_size += sum(map(len, pieces))
            if self._text_size > self._max_text_size:
                self._fail(1009, "text message too big")
                return False
            if last:
                data = b"".join(self._text)
                self._text, self._text_size = [], 0
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:  # the reader checks UTF-8; kept for safety
                    self._fail(1007, "text message is not valid UTF-8")
                    return False
                self._enqueue(WsMessage(MessageKind.TEXT, text), len(data))
            return True
        data = b"".join(pieces)
        self._enqueue(WsMessage(MessageKind.BINARY, data, more=not last), len(data))
        return True

    def _enqueue(self, message: WsMessage, size: int) -> None:
        self._messages.append(message)
        self._queued += size
        if self._queued > RECEIVE_HIGH and not self._reading_paused:
            self._reading_paused = True
            if not self._lost:
                self.transport.pause_reading()
        self._wake()

    def _report_close(self, code: int, reason: str) -> None:
        self._close_message = WsMessage(MessageKind.CLOSE, code=code, reason=reason)
        self._wake()

    def _wake(self) -> None:
        waiter = self._receive_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, code: int, reason: str) -> None:
        logger.debug("HTTP rendezvous closed: %s (%d)", reason, code)
        self.close_nowait(code, reason)
        self._report_close(1009 if code == 1009 else 1006, "")
        self._closing.give_up()
        self._drop()
