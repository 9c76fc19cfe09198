"""The relay's side of a listener's control channel, on the frame-level data path (D23).

The control channel carries two messages per relayed HTTP request (the ``request`` out, the
``response`` and its body back). Served by aiohttp's ``WebSocketResponse`` that cost, per
message, a trip through its reader and queue, a future, a coroutine resumed in the channel's
task and its writer's frame building; the unmasked-frame check in front of its parser was a
Python loop of its own (DECISIONS D17). After the 101 the relay now takes the connection away
from aiohttp (:func:`~hybridrelay.transport.splice.hand_over`) and serves it with the pure
framing code, as it does rendezvous (:class:`~hybridrelay.transport.server_leg.ServerLeg`):

* client frames are checked as RFC 6455 asks of a server (an unmasked frame fails the
  connection with 1002, invalid UTF-8 with 1007, a message over ``max_message_size`` with
  1009: the close frame goes out with the code and the connection is closed);
* each whole text or binary message is handed to a
  :class:`~hybridrelay.transport.base.MessageSink` in the read callback that completed it: no
  task, queue or future per message, and messages in the order they came. Nothing waits to be
  taken, so nothing is queued beyond the one message being assembled (at most
  ``max_message_size``: the reader refuses a larger one from its frame headers, before its
  payload arrives);
* pings are answered (not while our write buffer is full: a peer that does not read would
  only grow it); with ``keep_alive`` the leg does what aiohttp's ``heartbeat=`` did: a ping
  once nothing has come from the peer for ``keep_alive`` seconds, and if nothing comes within
  half of that the connection is dropped without a close frame, reported as 1006;
* writing: a text message and the binary one that follows it, without waiting
  (:meth:`ControlLeg.write_message`); what is written in one turn of the event loop goes to
  the transport at the end of that turn, in one write (the requests of the HTTP senders
  served in one turn cost the relay a few system calls and the listener a few reads, not one
  each), or at once past ``COALESCED_WRITE_LIMIT`` (4 KiB: the listener starts on the first
  requests while the relay still reads the others, D27); :attr:`ControlLeg.write_paused`
  says when the transport is above its high-water mark and :meth:`ControlLeg.drain` waits
  for it;
* closing: our close frame, then the peer's answer awaited for ``PEER_CLOSE_WAIT`` before the
  connection is dropped (dropped at once, the peer's answer meets a closed socket and the
  reset can cost the peer our close frame: hyco-ws reported 1006 instead of 1001).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameError,
    server_frame,
    server_frame_header,
    whole_client_frames,
)
from hybridrelay.transport.base import COALESCED_WRITE_LIMIT, MessageSink
from hybridrelay.transport.receive_buffer import receive_buffer
from hybridrelay.transport.server_leg import ServerLeg

__all__ = ["PEER_CLOSE_WAIT", "ControlLeg"]

logger = logging.getLogger("hybridrelay.server")

#: How long the peer may take to answer our close frame before the connection is dropped.
PEER_CLOSE_WAIT = 2.0


class _Discard:
    """The sink of a leg closed before it was given one: what still arrives is dropped."""

    def on_text(self, text: str) -> None:
        pass

    def on_binary(self, data: bytes) -> None:
        pass

    def on_close(self, code: int, reason: str) -> None:
        pass


class ControlLeg(ServerLeg):
    """A listener's control channel on a taken-over transport (see the module's docstring).

    Created with reading paused; :meth:`start` gives it its sink, reads what came with the
    upgrade and resumes reading.
    """

    close_wait = PEER_CLOSE_WAIT

    def __init__(
        self, transport: asyncio.Transport, *, max_message_size: int, keep_alive: float | None
    ) -> None:
        super().__init__(transport, max_message_size=max_message_size)
        self._max_message_size = max_message_size
        self._sink: MessageSink = _Discard()
        self._parts: list[bytearray] = []
        self._reported = False
        loop = asyncio.get_running_loop()
        self._clock = loop.time
        self._keep_alive = keep_alive
        self._keep_alive_timer: asyncio.TimerHandle | None = None
        #: When the peer was last heard from (any bytes), and whether our ping went out with
        #: nothing heard since. A flag, not the ping's time compared with ``_heard_at``: a
        #: loop's clock may not move between the two (uvloop's is libuv's, cached for each
        #: turn of the loop in whole milliseconds), and the peer's answer read in the turn that
        #: sent the ping then looked as old as the ping: the channel was dropped as silent.
        self._heard_at = self._clock()
        self._ping_unanswered = False
        self._dropped: asyncio.Future[None] | None = None
        self._loop = loop
        #: The messages written in this turn of the event loop, not yet given to the transport.
        self._batch: bytearray | None = None

    def __repr__(self) -> str:
        return f"<ControlLeg sent={self._closing.sent} received={self._closing.received}>"

    def start(self, sink: MessageSink | None) -> None:
        """Deliver to ``sink`` (None: drop what arrives, for a leg about to be closed)."""
        if sink is not None:
            self._sink = sink
        self._read_early()
        if self._lost or self._closing.received:
            return
        self.transport.resume_reading()
        interval = self._keep_alive
        if interval is not None and not self._closing.sent:
            self._heard_at = self._clock()
            self._keep_alive_timer = asyncio.get_running_loop().call_at(
                self._heard_at + interval, self._keep_alive_tick
            )

    # -- writing ------------------------------------------------------------------------------

    @property
    def write_paused(self) -> bool:
        """The transport is above its high-water mark: :meth:`drain` before writing more."""
        return self._write_paused

    def write_message(self, text: str, body: bytes | None = None) -> None:
        """Write a text message and, right after it, the binary message ``body``, without
        waiting: into this turn of the event loop's batch, written at its end (see the
        module's docstring), or at once when the batch reaches ``COALESCED_WRITE_LIMIT``.

        Raises:
            RelayConnectionError: our close frame went out, or the connection is closing.
        """
        if self._closing.sent:
            raise RelayConnectionError("cannot send after the close frame")
        if self._lost or self.transport.is_closing():
            raise RelayConnectionError("WebSocket send failed: the connection is closed")
        payload = text.encode("utf-8")
        batch = self._batch
        if batch is None:
            batch = self._batch = bytearray()
            self._loop.call_soon(self._flush)
        batch += server_frame_header(True, OP_TEXT, len(payload))
        batch += payload
        if body is not None:
            batch += server_frame_header(True, OP_BINARY, len(body))
            batch += body
        if len(batch) >= COALESCED_WRITE_LIMIT:
            self._flush()

    def _flush(self) -> None:
        """Write this turn's batch (before anything else is written, and at the turn's end)."""
        batch, self._batch = self._batch, None
        if batch and not self._lost and not self.transport.is_closing():
            self.transport.write(batch)

    async def drain(self) -> None:
        """Return once the transport is below its high-water mark.

        Raises:
            RelayConnectionError: the connection was lost.
        """
        await self._drain()

    # -- closing ------------------------------------------------------------------------------

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        self._flush()  # what was written before it goes before it
        super().close_nowait(code, reason)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send our close frame (once) and return once the connection is dropped: when the
        peer answered, or ``PEER_CLOSE_WAIT`` later (the close timer's bound)."""
        self.close_nowait(code, reason)
        if self._lost or self._closing.dropped:
            return
        if self._dropped is None:
            self._dropped = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._dropped)

    def _drop(self) -> None:
        super()._drop()
        self._wake_closers()

    def _wake_closers(self) -> None:
        waiter, self._dropped = self._dropped, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _gone(self, news: bool) -> None:
        self._wake_closers()
        self._report(self._closing.code or 1006, "")

    def _report(self, code: int, reason: str) -> None:
        """Tell the sink the channel is over (once)."""
        if self._reported:
            return
        self._reported = True
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
            self._keep_alive_timer = None
        self._sink.on_close(code, reason)

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the framing rules (or sent too big a message): close with ``code``
        and drop the connection; the reader cannot read on to find the peer's answer."""
        logger.debug("control channel closed: %s (%d)", reason, code)
        self.close_nowait(code, reason)
        self._closing.give_up()
        self._drop()
        self._report(code, reason)

    # -- keep-alive ---------------------------------------------------------------------------

    def _keep_alive_tick(self) -> None:
        self._keep_alive_timer = None
        interval = self._keep_alive
        if interval is None or self._lost or self._closing.sent or self._closing.received:
            return  # a closing leg has its close timer
        if self._ping_unanswered:
            self._link_dead(f"no pong within {interval / 2:g} s of a keep-alive ping")
            return
        now = self._clock()
        loop = asyncio.get_running_loop()
        due = self._heard_at + interval
        if now < due:  # heard from since: the next ping is due an interval after that
            self._keep_alive_timer = loop.call_at(due, self._keep_alive_tick)
            return
        self._flush()
        self.transport.write(server_frame(OP_PING, b""))
        self._ping_unanswered = True
        self._keep_alive_timer = loop.call_at(now + interval / 2, self._keep_alive_tick)

    def _link_dead(self, reason: str) -> None:
        logger.debug("control channel dropped: %s", reason)
        self._closing.give_up()
        self._drop()
        self._report(1006, reason)

    # -- reading ------------------------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> None:
        data = receive_buffer()[:nbytes]
        self._heard_at = self._clock()
        self._ping_unanswered = False
        if self._started:
            self._received(data)
        else:
            self._early.append(bytes(data))

    def _received(self, data: memoryview) -> None:
        if self._closing.received:
            return
        reader = self._reader
        if reader.between_messages:
            # The common read: whole small text messages (the listener's responses), read
            # without the general reader; it takes whatever follows the first frame that is
            # anything else, with every check it makes.
            frames, used = whole_client_frames(data, self._max_message_size, websocket_mask)
            if frames:
                sink = self._sink
                for opcode, payload in frames:
                    if opcode == OP_TEXT:
                        try:
                            text = payload.decode("utf-8")
                        except UnicodeDecodeError:
                            self._fail(1007, "text message is not valid UTF-8")  # as the reader
                            return
                        sink.on_text(text)
                    else:
                        sink.on_binary(bytes(payload))
                if used == len(data):
                    return
                data = data[used:]
        try:
            pieces, controls = reader.feed(data)
        except FrameError as exc:
            self._deliver(exc.pieces, reader.message_ends)
            self._fail(exc.code, str(exc))
            return
        if reader.message_ends:
            self._deliver(pieces, reader.message_ends)
        elif pieces:
            self._parts += pieces
        for control in controls:
            if control.opcode == OP_PING:
                if not self._write_paused:
                    self._flush()
                    self._answer_ping(control.payload)
            elif control.opcode == OP_CLOSE:
                step = self._closing.receive(control.code, control.reason)
                if step.drop:  # the answer to ours
                    self._drop()
                if step.news:
                    self._report(control.code or 1005, control.reason)
            # OP_PONG: its bytes were heard (keep-alive)

    def _deliver(self, pieces: list[bytearray], ends: list[tuple[int, int]]) -> None:
        """Hand the messages that ended in this read to the sink; keep the rest's pieces."""
        sink = self._sink
        start = 0
        for count, opcode in ends:
            data: bytes | bytearray
            if self._parts:
                data = b"".join((*self._parts, *pieces[start:count]))
                self._parts = []
            elif count - start == 1:
                data = pieces[start]
            else:
                data = b"".join(pieces[start:count])
            start = count
            if opcode == OP_TEXT:
                sink.on_text(data.decode("utf-8"))  # the reader checked it is UTF-8 (else 1007)
            else:
                sink.on_binary(bytes(data))
        if start < len(pieces):
            self._parts += pieces[start:]
