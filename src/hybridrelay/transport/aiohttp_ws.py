"""The :class:`~hybridrelay.transport.base.MessageSocket` implementation on aiohttp, for sockets
that aiohttp serves or dials. The relay takes every WebSocket it serves away from aiohttp after
the 101 (splices, rendezvous, control channels: D9, D23) and the SDK's client connections are
:mod:`hybridrelay.transport.frames_ws`; this adapter is left for the tests' peers
(tests/server/http_peer.py, tests/client/ws_peers.py). The close handshake is
:class:`~hybridrelay.protocol.closing.CloseHandshake`.

aiohttp is used with ``autoclose=False`` so that a close frame from the peer is *reported*, not
answered at once: the relay forwards it to the other leg and keeps carrying data the other way
until that side closes too (a half-closed TCP stream crossing the relay). Our own close frame is
sent with ``send_frame(CLOSE)`` rather than ``close()``, because ``close()`` would wait for the
peer's close and throw away the data that arrives meanwhile.

Two private attributes of aiohttp are touched, both in :meth:`AiohttpMessageSocket._drop`, to
stop aiohttp from sending a second close frame when the connection is dropped after the close
handshake; ``tests/test_transport.py`` pins that behaviour so an aiohttp upgrade cannot silently
change it (the dependency is pinned to one minor version).

:meth:`AiohttpMessageSocket.send_fragment` sends one binary message in several frames (HTTP
bodies must be exactly one message, PROTOCOL.md 6.2, and may be too large to hold in memory).
aiohttp can only send whole messages (FIN always set), so it writes the frame itself to the
writer's transport; it reads ``ws._writer`` and waits on the writer's protocol
``_drain_helper()`` for backpressure, exactly as aiohttp's own ``send_frame`` does.
``tests/server/test_http_relay.py`` (server side, uploads) and ``http_peer.py`` (client side,
masked response fragments) exercise it on every large body.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp._websocket.helpers import websocket_mask

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.protocol.closing import CloseHandshake
from hybridrelay.protocol.websocket import OP_BINARY, OP_CONTINUATION, frame_header
from hybridrelay.transport.base import CloseState, MessageKind, WsMessage

__all__ = ["AiohttpMessageSocket"]

_CLOSE_TIMEOUT = 10.0
#: How long :meth:`AiohttpMessageSocket.aclose` waits for the peer's answering close frame.
_PEER_CLOSE_WAIT = 2.0

AiohttpWebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


class AiohttpMessageSocket(CloseState):
    """Adapts an aiohttp server or client WebSocket to :class:`MessageSocket`.

    Args:
        ws: a prepared ``web.WebSocketResponse`` or a connected ``ClientWebSocketResponse``,
            created with ``autoclose=False``.
        close_transport: drops the underlying connection (server: ``request.transport.close``;
            client: the response's ``close``).
    """

    __slots__ = ("_close_transport", "_closing", "_dropped", "_receiving", "_ws")

    def __init__(self, ws: AiohttpWebSocket, close_transport: Callable[[], None]) -> None:
        self._ws = ws
        self._close_transport = close_transport
        self._closing = CloseHandshake()
        #: Set once the connection is dropped (both close frames, or gone).
        self._dropped = asyncio.Event()
        #: A :meth:`receive` is waiting on aiohttp (it will see the peer's close frame).
        self._receiving = False

    @classmethod
    def server(cls, ws: web.WebSocketResponse, request: web.BaseRequest) -> AiohttpMessageSocket:
        transport = request.transport

        def close() -> None:
            if transport is not None:
                transport.close()

        return cls(ws, close)

    @classmethod
    def client(cls, ws: aiohttp.ClientWebSocketResponse) -> AiohttpMessageSocket:
        return cls(ws, ws._response.close)

    @property
    def subprotocol(self) -> str | None:
        if isinstance(self._ws, web.WebSocketResponse):
            return self._ws.ws_protocol
        return self._ws.protocol

    async def receive(self) -> WsMessage:
        closing = self._closing
        if closing.received:
            return WsMessage(MessageKind.CLOSE, code=closing.code or 1006, reason=closing.reason)
        while True:
            self._receiving = True
            try:
                msg = await self._ws.receive()
            except RuntimeError:  # aiohttp: "WebSocket connection is closed."
                msg = aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None)
            finally:
                self._receiving = False
            kind = msg.type
            if kind is aiohttp.WSMsgType.BINARY:
                return WsMessage(MessageKind.BINARY, msg.data)
            if kind is aiohttp.WSMsgType.TEXT:
                return WsMessage(MessageKind.TEXT, msg.data)
            if kind in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue
            if kind is aiohttp.WSMsgType.CLOSE:
                code = int(msg.data) if msg.data is not None else 1005
                step = closing.receive(code, msg.extra or "")
                if step.drop:
                    self._drop()
                return WsMessage(MessageKind.CLOSE, code=code, reason=msg.extra or "")
            else:  # CLOSING, CLOSED, ERROR: the connection went away without a close frame
                # aiohttp reports "message too big" as an ERROR carrying a WebSocketError
                # (its close_code is then whatever the peer's close frame said).
                # A protocol error of the peer's (1002, an unmasked frame among them) keeps
                # its code too.
                if isinstance(msg.data, aiohttp.WebSocketError):
                    code = msg.data.code
                else:
                    code = 1009 if self._ws.close_code == 1009 else 1006
                closing.lost()  # nothing more can be sent
                closing.code = code
                self._drop()
                return WsMessage(MessageKind.CLOSE, code=code)

    async def send(self, data: bytes | str) -> None:
        if self._closing.sent:
            raise RelayConnectionError("cannot send after the close frame")
        try:
            if isinstance(data, str):
                await self._ws.send_str(data)
            else:
                await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            raise RelayConnectionError(f"WebSocket send failed: {exc}") from exc

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        """Send one frame of a binary message that is sent in pieces (RFC 6455 section 5.4).

        The first frame of the message is a BINARY frame, every later one a CONTINUATION frame;
        the frame with ``last=True`` (FIN) ends the message. Between ``first`` and ``last`` the
        caller MUST NOT send any other message on this socket (control frames that aiohttp sends
        on its own -- pongs, pings -- are allowed between fragments by the RFC). Waits while the
        peer is slow (the transport's write buffer is above its high-water mark).

        Only for sockets without compression (the relay and the SDK never negotiate it).
        """
        if self._closing.sent:
            raise RelayConnectionError("cannot send after the close frame")
        writer = self._ws._writer
        if writer is None:
            raise RelayConnectionError("WebSocket is not connected")
        if writer.compress:
            raise RelayConnectionError("fragmented sending is not supported with compression")
        transport = writer.transport
        if transport.is_closing():
            raise RelayConnectionError("WebSocket send failed: the connection is closing")
        opcode = OP_BINARY if first else OP_CONTINUATION
        header = frame_header(last, opcode, len(data), masked=writer.use_mask)
        if writer.use_mask:  # client side: RFC 6455 5.3, a fresh random mask per frame
            mask = os.urandom(4)
            payload = bytearray(data)
            websocket_mask(mask, payload)
            transport.write(header + mask + payload)
        elif len(data) > 4096:
            transport.write(header)
            transport.write(data)
        else:
            transport.write(header + data)
        # Backpressure, as in aiohttp's WebSocketWriter.send_frame.
        protocol = writer.protocol
        if protocol.writing_paused:
            try:
                await protocol._drain_helper()
            except (ConnectionError, RuntimeError) as exc:
                raise RelayConnectionError(f"WebSocket send failed: {exc}") from exc

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        step = self._closing.send(code, reason)
        if step.frame is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._ws.send_frame(step.frame, aiohttp.WSMsgType.CLOSE)
        except (ConnectionError, RuntimeError, aiohttp.ClientError, TimeoutError):
            self._closing.lost()
            self._drop()
            return
        if step.drop:  # the peer had closed already (a close arriving meanwhile drops itself)
            self._drop()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self.send_close(code, reason)
            if not self._dropped.is_set():
                await self._await_peer_close()
        finally:
            self._closing.lost()
            self._drop()

    async def _await_peer_close(self) -> None:
        """Wait (at most :data:`_PEER_CLOSE_WAIT`) for the peer's answering close frame before
        the connection is dropped (RFC 6455 7.1.1). Dropped at once, the peer's answer meets a
        closed socket, the kernel answers it with a reset, and a peer that had not read our
        close frame yet loses it with the reset (hyco-ws reported 1006 instead of 1001)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_PEER_CLOSE_WAIT):
                if self._receiving:  # the reader sees the close frame and drops
                    await self._dropped.wait()
                    return
                while (await self.receive()).kind is not MessageKind.CLOSE:
                    pass  # what the peer sent before its close frame: nobody reads it now

    def abort(self) -> None:
        self._closing.lost()
        self._drop()

    def _drop(self) -> None:
        # Both close frames have been exchanged (or the connection is gone): tell aiohttp the
        # socket is closed so that it sends no second close frame, then drop the connection.
        self._ws._set_closed()
        self._close_transport()
        self._dropped.set()
