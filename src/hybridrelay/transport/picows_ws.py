"""A client-side :class:`~hybridrelay.transport.base.MessageSocket` on picows (optional).

picows (``pip install hybridrelay[fast]``) is a Cython WebSocket library with a callback API:
it hands over *frames* and never blocks on send. This module turns that into our
``MessageSocket`` (see ``docs/DECISIONS.md`` D8 for when it is used):

* **Messages.** Fragments are reassembled here, bounded by ``max_message_size``; a larger
  message (or a single larger frame, which picows itself refuses) ends the connection with
  close code 1009, reported as CLOSE 1009, as the aiohttp socket does.
* **Half-close.** picows does *not* answer a peer's close frame by itself (it is delivered to
  ``on_ws_frame`` like any other frame; only protocol errors make it send a close frame on its
  own). We report the peer's close as CLOSE and keep sending; our own close frame goes out on
  :meth:`PicowsMessageSocket.send_close`, and the connection is dropped once both were seen.
* **Backpressure.** Sending: the transport's ``pause_writing``/``resume_writing`` callbacks
  gate :meth:`send` (it writes, then waits while the transport is above its high-water mark).
  Receiving: messages wait in a queue; above ``_READ_HIGH`` bytes queued the transport stops
  reading (``pause_reading``) until :meth:`receive` has taken it below ``_READ_LOW``.
* **No keep-alive** pings (rendezvous sockets must not be pinged, DATAPATH-BENCH pitfall 5;
  control channels, which need a heartbeat, stay on aiohttp). Pings from the peer are answered
  by picows.
* **Lost connection** without a close frame: CLOSE 1006.

:func:`connect` maps handshake failures the way ``client/_connect.py`` does for aiohttp: an
HTTP status other than 101 becomes :func:`hybridrelay.exceptions.http_error` with the status
and the reason phrase, which is read from the raw status line (picows keeps only an
``HTTPStatus``, which loses the phrase and refuses non-standard codes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import picows

from hybridrelay.exceptions import (
    RelayConnectionError,
    RelayError,
    RelayTimeoutError,
    http_error,
)
from hybridrelay.protocol.websocket import check_header_fields
from hybridrelay.transport.base import MessageKind, WsMessage

__all__ = ["PicowsMessageSocket", "connect"]

_CLOSE_TIMEOUT = 10.0
#: Bytes of received messages queued before the transport stops reading, and where it resumes.
_READ_HIGH = 512 * 1024
_READ_LOW = 128 * 1024
#: picows grows its read buffer as needed; a small start keeps idle sockets cheap
#: (DATAPATH-BENCH 3.4: 28 -> 16 KB per idle connection, no bulk cost).
_READ_BUFFER_INIT = 4096
#: Write-buffer high-water mark of the TCP/TLS transport (None: the transport's default,
#: 64 KiB), and whether picows uses aiofastnet transports (None: picows' default, yes).
#: Module settings for experiments (``bench/experiments/picows_wrapper.py``).
_WRITE_HIGH: int | None = None
_USE_AIOFASTNET: bool | None = None

_BINARY = picows.WSMsgType.BINARY
_TEXT = picows.WSMsgType.TEXT
_CONTINUATION = picows.WSMsgType.CONTINUATION
_CLOSE = picows.WSMsgType.CLOSE


class _QuietLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows logs every connect and disconnect at INFO; that is DEBUG for us.

    A ``LoggerAdapter`` (not a ``Logger``) also stops picows from creating a child logger per
    connection (``picows.client.<fd>``).
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.INFO:
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)


_LOGGER = _QuietLogger(logging.getLogger("hybridrelay.transport.picows"), {})


class PicowsMessageSocket(picows.WSListener):
    """A picows client WebSocket as a :class:`~hybridrelay.transport.base.MessageSocket`.

    It is also the picows listener of its connection (one object per socket). Create it with
    :func:`connect`.
    """

    def __init__(self, max_message_size: int) -> None:
        super().__init__()
        self._max_message_size = max_message_size
        self._transport: picows.WSTransport | None = None
        self._subprotocol: str | None = None
        self._close_sent = False
        self._close_received = False
        self._close_code: int | None = None
        self._close_reason = ""
        # Receiving: complete messages, their total size, a waiting receive(), a fragmented
        # message being reassembled.
        self._queue: deque[WsMessage] = deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._parts_kind: picows.WSMsgType | None = None
        # Sending: set while the transport's write buffer is above its high-water mark.
        self._drain: asyncio.Future[None] | None = None
        self._lost = False

    # -- picows callbacks ----------------------------------------------------------------

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self._transport = transport

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if self._close_received:
            return
        if transport.is_close_frame_sent and not self._close_sent:
            # picows refused something on its own (a frame above max_frame_size, a protocol
            # error) and sent its close frame; its parser may still hand over frames.
            self._picows_closed(transport)
            return
        opcode = frame.msg_type
        if opcode is _BINARY or opcode is _TEXT:
            if self._parts_kind is not None:
                self._fail(1002, "new message inside a fragmented one")
                return
            if frame.fin:
                if opcode is _BINARY:
                    self._deliver(WsMessage(MessageKind.BINARY, frame.get_payload_as_bytes()))
                else:
                    self._deliver_text(frame.get_payload_as_bytes())
                return
            self._parts_kind = opcode
            self._add_part(frame)
        elif opcode is _CONTINUATION:
            if self._parts_kind is None:
                self._fail(1002, "continuation frame without a message")
                return
            if not self._add_part(frame) or not frame.fin:
                return
            data = b"".join(self._parts)
            kind, self._parts_kind = self._parts_kind, None
            self._parts = []
            self._parts_size = 0
            if kind is _BINARY:
                self._deliver(WsMessage(MessageKind.BINARY, data))
            else:
                self._deliver_text(data)
        elif opcode is _CLOSE:
            payload = frame.get_payload_as_bytes()
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            reason = payload[2:].decode("utf-8", "replace")
            self._on_close(code, reason)
            if self._close_sent:
                self._drop()
        # PING is answered by picows; PONG needs nothing.

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self._lost = True
        if not self._close_received:
            if transport.is_close_frame_sent and not self._close_sent:
                self._picows_closed(transport)
            else:
                self._close_sent = True  # nothing more can be sent
                self._on_close(1006, "")
        self._close_sent = True
        self._wake_writer(RelayConnectionError("WebSocket send failed: the connection was lost"))

    def _picows_closed(self, transport: picows.WSTransport) -> None:
        """picows sent a close frame by itself: 1009 for a frame above ``max_frame_size``
        (reported as CLOSE 1009, as aiohttp does), otherwise a protocol error (CLOSE 1006)."""
        handshake = transport.close_handshake
        sent = handshake.sent if handshake is not None else None
        too_big = sent is not None and int(sent.code.value) == 1009
        self._close_sent = True
        self._on_close(1009 if too_big else 1006, "")
        self._drop()

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer(None)

    # -- receiving helpers ---------------------------------------------------------------

    def _add_part(self, frame: picows.WSFrame) -> bool:
        self._parts_size += frame.payload_size
        if self._parts_size > self._max_message_size:
            self._fail(1009, "message too big")
            return False
        self._parts.append(frame.get_payload_as_bytes())
        return True

    def _deliver_text(self, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(1007, "invalid UTF-8 in a text message")
            return
        self._deliver(WsMessage(MessageKind.TEXT, text))

    def _deliver(self, message: WsMessage) -> None:
        self._queue.append(message)
        self._queued_bytes += len(message.data)
        if self._queued_bytes > _READ_HIGH and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.underlying_transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_close(self, code: int, reason: str) -> None:
        self._close_received = True
        self._close_code = code
        self._close_reason = reason
        self._parts = []
        self._queue.append(WsMessage(MessageKind.CLOSE, code=code, reason=reason))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, code: int, reason: str) -> None:
        """A message we refuse: our close frame with ``code``, then drop; report CLOSE code."""
        if self._transport is not None and not self._close_sent:
            self._transport.send_close(picows.WSCloseCode(code), reason.encode())
        self._close_sent = True
        self._on_close(code, "")
        self._drop()

    def _wake_writer(self, exc: BaseException | None) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            if exc is None:
                drain.set_result(None)
            else:
                drain.set_exception(exc)
                drain.exception()  # retrieved: nobody may be waiting

    # -- MessageSocket -------------------------------------------------------------------

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
        while not self._queue:
            if self._close_received:  # the CLOSE was taken already: repeat it
                return WsMessage(
                    MessageKind.CLOSE, code=self._close_code, reason=self._close_reason
                )
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._queue.popleft()
        if message.kind is MessageKind.CLOSE:
            self._queue.appendleft(message)  # keep reporting it
            return message
        self._queued_bytes -= len(message.data)
        if self._reading_paused and self._queued_bytes <= _READ_LOW:
            self._reading_paused = False
            if self._transport is not None and not self._lost:
                self._transport.underlying_transport.resume_reading()
        return message

    def _writable(self) -> picows.WSTransport:
        if self._close_sent:
            raise RelayConnectionError("cannot send after the close frame")
        transport = self._transport
        if transport is None or self._lost or transport.underlying_transport.is_closing():
            raise RelayConnectionError("WebSocket send failed: the connection is closing")
        return transport

    async def _wait_drain(self) -> None:
        drain = self._drain
        if drain is not None:
            await asyncio.shield(drain)

    async def send(self, data: bytes | str) -> None:
        transport = self._writable()
        if isinstance(data, str):
            transport.send(_TEXT, data.encode("utf-8"))
        else:
            transport.send(_BINARY, data)
        if self._drain is not None:
            await self._wait_drain()

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        """Send one frame of a binary message sent in pieces (as
        :meth:`AiohttpMessageSocket.send_fragment`): BINARY first, CONTINUATION after, FIN on
        ``last``. No other message may be sent between ``first`` and ``last``."""
        transport = self._writable()
        transport.send(_BINARY if first else _CONTINUATION, data, last)
        if self._drain is not None:
            await self._wait_drain()

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        if self._close_sent:
            return
        self._close_sent = True
        transport = self._transport
        if transport is None or self._lost or transport.underlying_transport.is_closing():
            self._close_received = True
        else:
            payload = reason.encode("utf-8")[:123]
            transport.send_close(picows.WSCloseCode(code), payload)
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._wait_drain()
            except (RelayConnectionError, TimeoutError):
                self._close_received = True
        if self._close_received:
            self._drop()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self.send_close(code, reason)
        finally:
            if not self._close_received:
                self._on_close(1006, "")
            self._drop()

    def abort(self) -> None:
        if not self._close_received:
            self._on_close(1006, "")
        self._close_sent = True
        if self._transport is not None:
            self._transport.disconnect(graceful=False)

    def _drop(self) -> None:
        # Both close frames were exchanged (or the connection is gone): close the TCP
        # connection after what is buffered (our close frame) has been written.
        if self._transport is not None:
            self._transport.disconnect(graceful=True)


def _status_line(raw_header: bytes | None) -> tuple[int, str] | None:
    """``(status, reason phrase)`` from a raw HTTP response head, or None."""
    if not raw_header:
        return None
    line = raw_header.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].upper().startswith("HTTP/") or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2] if len(parts) > 2 else ""


async def connect(
    url: str,
    *,
    ssl_context: ssl.SSLContext,
    connect_timeout: float,
    headers: Mapping[str, str],
    protocols: Sequence[str],
    max_message_size: int,
) -> PicowsMessageSocket:
    """Open a picows WebSocket to ``url`` (no proxy) within ``connect_timeout`` seconds.

    ``url`` may hold a secret: it never goes into an exception message from here.

    Raises:
        RelayHttpError: (or a subclass) the server answered with an HTTP status.
        RelayTimeoutError: no WebSocket within ``connect_timeout``.
        RelayConnectionError: the connection failed.
    """
    request_headers = dict(headers)
    if protocols:
        request_headers["Sec-WebSocket-Protocol"] = ", ".join(protocols)
    try:  # picows writes header values as given: CR/LF would inject lines
        check_header_fields(request_headers)
    except ValueError as exc:  # names the header, not its value
        raise RelayConnectionError(f"cannot connect: {exc}") from exc
    secure = url[:4].lower() == "wss:"

    def factory() -> PicowsMessageSocket:
        return PicowsMessageSocket(max_message_size)

    invalid_url = False
    try:
        async with asyncio.timeout(connect_timeout):
            transport, socket = await picows.ws_connect(
                factory,
                url,
                ssl_context=ssl_context if secure else None,
                # picows' own timer also bounds the handshake: if we are cancelled while it
                # waits for the 101, picows closes the half-open connection itself.
                websocket_handshake_timeout=connect_timeout,
                logger_name=_LOGGER,
                enable_auto_ping=False,
                enable_auto_pong=True,
                # One frame may not exceed a whole message; larger ones are closed with 1009.
                max_frame_size=max_message_size,
                extra_headers=request_headers,
                max_redirects=0,
                read_buffer_init_size=_READ_BUFFER_INIT,
                use_aiofastnet=_USE_AIOFASTNET,
            )
    except RelayError:
        raise
    except TimeoutError as exc:
        raise RelayTimeoutError(f"no WebSocket within {connect_timeout:g} s") from exc
    except picows.WSHandshakeError as exc:
        status = _status_line(exc.raw_header)
        if status is not None and status[0] != 101:
            raise http_error(*status) from exc
        raise RelayConnectionError(f"WebSocket handshake failed: {type(exc).__name__}") from exc
    except ssl.SSLError as exc:
        raise RelayConnectionError(f"TLS handshake failed: {type(exc).__name__}") from exc
    except picows.WSInvalidURL:  # its message is the URL, which may hold a secret
        invalid_url = True
    except (OSError, ValueError, picows.WSError) as exc:
        raise RelayConnectionError(f"cannot connect: {type(exc).__name__}") from exc
    if invalid_url:  # raised out here so that not even __context__ keeps the URL
        raise RelayConnectionError("cannot connect: malformed URL")
    assert isinstance(socket, PicowsMessageSocket)
    if _WRITE_HIGH is not None:
        transport.underlying_transport.set_write_buffer_limits(high=_WRITE_HIGH)
    response = transport.response
    if response.headers.get("Sec-WebSocket-Extensions"):
        # We offered none (PROTOCOL.md 5.6): RFC 6455 4.1 says fail the connection.
        transport.disconnect(graceful=False)
        raise RelayConnectionError("WebSocket handshake failed: unrequested extension")
    chosen = response.headers.get("Sec-WebSocket-Protocol")
    if chosen is not None:
        chosen = chosen.strip()
        # As aiohttp: a protocol we did not offer is ignored (subprotocol stays None).
        socket._subprotocol = chosen if chosen in protocols else None
    return socket
