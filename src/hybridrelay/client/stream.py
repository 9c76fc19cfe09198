"""HybridConnectionStream: one relayed connection, as a byte stream and as messages.

Half-close is the WebSocket close frame (PROTOCOL.md 5.5): :meth:`write_eof` sends ours and
reading goes on until the peer's arrives; that is how the bridge carries a TCP
``shutdown(SHUT_WR)`` across the relay.
"""

from __future__ import annotations

import asyncio
import logging

from hybridrelay.exceptions import RelayConnectionError, StreamClosedError
from hybridrelay.transport.base import (
    MessageKind,
    SpliceSocket,
    StreamSink,
    StreamSocket,
)

__all__ = ["MAX_WRITE_MESSAGE", "HybridConnectionStream"]

logger = logging.getLogger("hybridrelay.client")

#: :meth:`HybridConnectionStream.write` sends binary messages of at most this size.
MAX_WRITE_MESSAGE = 64 * 1024
#: How long :meth:`HybridConnectionStream.aclose` waits for the peer's close frame.
CLOSE_TIMEOUT = 10.0

# Close codes that mean "the connection broke" rather than "the peer closed".
_BROKEN = frozenset({1006})


class HybridConnectionStream:
    """A WebSocket relayed between a sender and a listener.

    Reading and writing may happen in two different tasks at once; two concurrent readers (or
    writers) are serialised. Data reads and writes have no timeout of their own, like a socket:
    an idle peer is not an error. A connection that breaks shows up as
    :class:`RelayConnectionError`.

    Attributes:
        id: the connection id (``sb-hc-id``), shared by both ends.
        subprotocol: the negotiated WebSocket sub-protocol, if any.
        connect_headers: on the listener side the sender's upgrade headers; ``{}`` on the sender.
        remote_endpoint: the sender's address as the relay saw it (listener side), else None.
        close_code: the peer's close code once EOF was read, else None.
        close_reason: the peer's close reason once EOF was read.
    """

    def __init__(
        self,
        socket: StreamSocket,
        *,
        id: str,
        connect_headers: dict[str, str] | None = None,
        remote_endpoint: tuple[str, int] | None = None,
    ) -> None:
        self._socket = socket
        self.id = id
        self.subprotocol: str | None = socket.subprotocol
        self.connect_headers: dict[str, str] = dict(connect_headers or {})
        self.remote_endpoint = remote_endpoint
        self.close_code: int | None = None
        self.close_reason = ""
        # Unread rest of the last message, sliced without copying; at most one message.
        self._leftover = memoryview(b"")
        self._eof = False
        self._closed = False  # our aclose() was called
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "eof" if self._eof else "open"
        return f"<HybridConnectionStream id={self.id!r} {state}>"

    @property
    def at_eof(self) -> bool:
        """True once the peer's close frame was read and no data is left."""
        return self._eof and not self._leftover

    @property
    def eof_sent(self) -> bool:
        """True once our close frame was sent (:meth:`write_eof` or :meth:`aclose`)."""
        return self._socket.close_sent

    def _check_open(self) -> None:
        if self._closed:
            raise StreamClosedError("the stream was closed")

    async def _next_message(self, *, skip_empty: bool) -> bytes | str | None:
        """The next data message, or None at EOF. Caller holds the read lock.

        ``skip_empty``: for :meth:`read`, where ``b""`` must keep meaning EOF, an empty message
        carries nothing and is skipped; :meth:`receive_message` returns it (None is its EOF).
        """
        while True:
            message = await self._socket.receive()
            self._check_open()  # aclose() from another task while we waited
            if message.kind is MessageKind.CLOSE:
                self._eof = True
                if self.close_code is None:
                    self.close_code = message.code
                    self.close_reason = message.reason
                if message.code in _BROKEN:
                    raise RelayConnectionError("the connection was lost without a close frame")
                return None
            if message.data or not skip_empty:
                return message.data

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at EOF (the peer's close frame).

        Data is returned across message boundaries; text messages as their UTF-8 bytes.

        Raises:
            StreamClosedError: after our own :meth:`aclose`.
            RelayConnectionError: the connection broke.
        """
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self._check_open()
        async with self._read_lock:
            if not self._leftover:
                if self._eof:
                    return b""
                data = await self._next_message(skip_empty=True)
                if data is None:
                    return b""
                if isinstance(data, bytes) and len(data) <= max_bytes:
                    return data  # the common case (the bridge's pump): the message, not a copy
                self._leftover = memoryview(data.encode() if isinstance(data, str) else data)
            chunk = self._leftover[:max_bytes]
            self._leftover = self._leftover[len(chunk) :]
            if not self._leftover:
                self._leftover = memoryview(b"")  # drop the reference to the message
            return bytes(chunk)

    async def receive_message(self) -> bytes | str | None:
        """The next whole message (type kept), or None at EOF.

        Bytes left over by a partial :meth:`read` are returned first, as one bytes message.
        """
        self._check_open()
        async with self._read_lock:
            if self._leftover:
                rest = bytes(self._leftover)
                self._leftover = memoryview(b"")
                return rest
            if self._eof:
                return None
            return await self._next_message(skip_empty=False)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as binary messages of at most 64 KiB; waits while the peer is slow.

        Raises:
            StreamClosedError: after :meth:`write_eof` or :meth:`aclose`.
            RelayConnectionError: the connection broke.
        """
        self._check_open()
        view = memoryview(data).cast("B")
        if not view:
            return
        async with self._write_lock:
            self._check_send()
            if isinstance(data, bytes) and len(data) <= MAX_WRITE_MESSAGE:
                await self._socket.send(data)  # the common case: one message, no copy
                return
            for start in range(0, len(view), MAX_WRITE_MESSAGE):
                await self._socket.send(bytes(view[start : start + MAX_WRITE_MESSAGE]))

    async def send_message(self, data: bytes | str) -> None:
        """Send ``data`` as one WebSocket message: ``str`` as text, bytes as binary."""
        self._check_open()
        async with self._write_lock:
            self._check_send()
            await self._socket.send(data)

    def _check_send(self) -> None:
        self._check_open()
        if self._socket.close_sent:
            raise StreamClosedError("write_eof() was called: this side cannot send any more")

    def attach(self, sink: StreamSink) -> SpliceSocket:
        """Hand what arrives on this stream to ``sink`` by callback, and return the socket to
        write to without awaiting (``write_nowait``, ``close_nowait``, flow control): how the
        bridge forwards a TCP socket with no task per direction.

        Bytes left over by a partial :meth:`read` (and the peer's close, if it was read) go to
        the sink first. After this, :meth:`read`, :meth:`receive_message`, :meth:`write` and
        :meth:`send_message` must not be used; :meth:`aclose` still ends the stream (it waits,
        bounded, for the peer's close frame).

        Raises:
            StreamClosedError: after :meth:`aclose`.
            RuntimeError: a read or write is in progress in another task.
        """
        self._check_open()
        socket = self._socket
        if self._read_lock.locked() or self._write_lock.locked():
            raise RuntimeError("attach() while a read or write is in progress")
        leftover, self._leftover = bytes(self._leftover), memoryview(b"")
        if leftover:
            sink.on_data(leftover)
        if self._eof and self.close_code is not None:
            sink.on_close(self.close_code, self.close_reason)
        socket.attach(sink)
        return socket

    async def write_eof(self) -> None:
        """Half-close: send our close frame (1000). Reading goes on until the peer closes.

        Idempotent. Waits for writes in progress so that no data is cut off.
        """
        self._check_open()
        async with self._write_lock:
            await self._socket.send_close(1000)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close both ways: send our close frame, wait (bounded) for the peer's, drop.

        Idempotent; never raises a connection error. Data still unread is discarded.
        """
        await self._close(code, reason, CLOSE_TIMEOUT)

    async def _close(self, code: int, reason: str, wait: float) -> None:
        """Send our close frame, wait up to ``wait`` seconds for the peer's, drop."""
        if self._closed:
            return
        self._closed = True
        self._leftover = memoryview(b"")
        try:
            async with asyncio.timeout(wait):
                if not self._socket.close_sent:
                    await self._socket.send_close(code, reason)
                # Wait for the peer's close frame so that it sees a clean close handshake.
                # If another task is inside read() it gets the close (and StreamClosedError);
                # the lock then lets us through to a socket that is already done.
                async with self._read_lock:
                    while not self._socket.close_received:
                        message = await self._socket.receive()
                        if message.kind is MessageKind.CLOSE and self.close_code is None:
                            self.close_code, self.close_reason = message.code, message.reason
        except (TimeoutError, RelayConnectionError):
            logger.debug("stream %s: no clean close handshake", self.id)
        finally:
            if self._socket.close_received:
                await self._socket.aclose(code, reason)  # both frames seen: just drop
            else:
                self._socket.abort()

    async def __aenter__(self) -> HybridConnectionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
