"""Our own small WebSocket interface, so the library underneath can change.

Everything above this layer (relay server, SDK, bridge) talks to a :class:`MessageSocket`:
whole messages in and out, a close frame that can be sent while still receiving (the
WebSocket way to half-close a stream, which is how a TCP ``shutdown(SHUT_WR)`` crosses the
relay), and an abortive close. The implementations are :mod:`hybridrelay.transport.frames_ws`
(every client connection of the SDK, D11), :mod:`hybridrelay.transport.http_leg` (the relay's
side of an HTTP rendezvous) and :mod:`hybridrelay.transport.aiohttp_ws` (the tests' peers).
The relay's control channels deliver by callback instead, to a :class:`MessageSink`
(:mod:`hybridrelay.transport.control_leg`).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from hybridrelay.exceptions import RelayConnectionError

if TYPE_CHECKING:
    from hybridrelay.protocol.closing import CloseHandshake

__all__ = [
    "COALESCED_WRITE_LIMIT",
    "CloseCode",
    "CloseState",
    "FragmentSocket",
    "MessageKind",
    "MessageSink",
    "MessageSocket",
    "FramedSocketBase",
    "SpliceSocket",
    "StreamSink",
    "StreamSocket",
    "WsMessage",
]


#: Messages written in one turn of the event loop go out together at its end (one system call
#: for many small ones), but never more than this many bytes at once: past it the batch is
#: written now. The relay and its listener are a pipeline; a batch holding a whole turn's
#: requests (50 senders' worth, ~30 KiB) let the listener start only once the relay's turn
#: was over, and answers came back the same way, so the two processes worked in turn rather
#: than side by side: 4 KiB (about six requests) took `serve-app`'s small GETs from ~6,900 to
#: ~10,000 req/s and cost the relay no more CPU (docs/DECISIONS.md D27).
COALESCED_WRITE_LIMIT = 4 * 1024


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class MessageKind(enum.Enum):
    TEXT = "text"
    BINARY = "binary"
    CLOSE = "close"


@dataclass(frozen=True, slots=True)
class WsMessage:
    """One WebSocket message, or the peer's close (``kind is CLOSE``; ``code``/``reason`` set).

    A connection lost without a close frame is reported as CLOSE with code 1006.

    ``more`` is only set by sockets asked for partial messages (a streamed HTTP body,
    :meth:`~hybridrelay.transport.frames_ws.FrameSocket.stream_binary`): this BINARY item is
    a part of a message whose further parts follow; the last part has ``more`` False.
    """

    kind: MessageKind
    data: bytes | str = b""
    code: int | None = None
    reason: str = ""
    more: bool = False


class MessageSocket(Protocol):
    """A WebSocket carrying whole messages, with half-close."""

    @property
    def subprotocol(self) -> str | None: ...

    @property
    def close_sent(self) -> bool:
        """True once this side has sent its close frame (it may still receive)."""
        ...

    @property
    def close_received(self) -> bool:
        """True once the peer's close frame (or the loss of the connection) was seen."""
        ...

    async def receive(self) -> WsMessage:
        """The next message; after the peer's close, CLOSE again every time."""
        ...

    async def send(self, data: bytes | str) -> None:
        """Send one message (``str`` as text, bytes as binary); waits while the peer is slow."""
        ...

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        """Send our close frame once; receiving continues until the peer closes too."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close now: send our close frame if not sent yet, then drop the connection."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a close frame."""
        ...


class CloseState:
    """:attr:`MessageSocket.close_sent` and :attr:`MessageSocket.close_received` of a socket
    whose close handshake is its ``_closing``."""

    __slots__ = ()
    _closing: CloseHandshake

    @property
    def close_sent(self) -> bool:
        return self._closing.sent

    @property
    def close_received(self) -> bool:
        return self._closing.received


class FramedSocketBase(CloseState):
    """The base of our own framing protocols (``FrameSocket``, ``ServerLeg``): ``send_close`` and
    ``aclose`` over their ``close_nowait`` and ``_drop``, and a send's wait while the transport
    is above its high-water mark, ended by :meth:`_drained` or failed by :meth:`_drain_lost`."""

    _lost: bool
    _write_paused: bool
    _drain_waiter: asyncio.Future[None] | None

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        raise NotImplementedError

    def _drop(self) -> None:
        raise NotImplementedError

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        self.close_nowait(code, reason)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        self.close_nowait(code, reason)
        self._closing.give_up()
        self._drop()

    async def _drain(self) -> None:
        if self._lost:
            raise RelayConnectionError("WebSocket send failed: the connection was lost")
        if self._drain_waiter is None:
            self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.shield(self._drain_waiter)
        except ConnectionError as exc:
            raise RelayConnectionError(f"WebSocket send failed: {exc}") from exc

    def _drained(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drain_lost(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the connection was lost"))
            waiter.exception()  # retrieved: nobody may be waiting on it


class MessageSink(Protocol):
    """Where a socket that delivers by callback (the relay's control channels,
    :class:`~hybridrelay.transport.control_leg.ControlLeg`) hands each whole message: in the
    event loop's read callback, in order, with no task, queue or future in between."""

    def on_text(self, text: str) -> None: ...

    def on_binary(self, data: bytes) -> None: ...

    def on_close(self, code: int, reason: str) -> None:
        """The peer's close frame (1005 when it had no code), the connection lost (1006), or
        the connection failed by this end (the code it sent); called once, after the last
        message."""
        ...


class StreamSink(Protocol):
    """Where a :class:`SpliceSocket` delivers what arrives once it is attached: in the event
    loop's read callback, with no task and no queue in between."""

    def on_data(self, data: bytes | bytearray) -> None:
        """Payload bytes of the peer's data frames, in order (message boundaries dropped)."""
        ...

    def on_close(self, code: int, reason: str) -> None:
        """The peer's close frame (its direction is done), or 1006 when the connection was
        lost without one; called once, after the last :meth:`on_data`."""
        ...

    def on_pause(self) -> None:
        """The socket's write buffer is full: stop calling ``write_nowait`` until
        :meth:`on_resume`."""
        ...

    def on_resume(self) -> None: ...


@runtime_checkable
class SpliceSocket(Protocol):
    """A socket that can hand its bytes to a :class:`StreamSink` by callback (our own client
    socket, :mod:`hybridrelay.transport.frames_ws`): the bridge's pumps forward a TCP socket
    to it and back without a task per direction."""

    def attach(self, sink: StreamSink) -> None:
        """Deliver to ``sink`` from now on (messages already queued first); ``receive`` must
        not be called any more."""
        ...

    def write_nowait(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as binary messages now; the sink's ``on_pause`` says when to stop."""
        ...

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Send our close frame (once); the connection is dropped when both were sent."""
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None: ...


@runtime_checkable
class FragmentSocket(MessageSocket, Protocol):
    """A :class:`MessageSocket` that can also send one binary message in several frames."""

    async def send_fragment(self, data: bytes, *, first: bool, last: bool) -> None:
        """One frame of a binary message: BINARY if ``first``, else CONTINUATION; FIN if
        ``last``. No other message may be sent between the first and the last frame."""
        ...


@runtime_checkable
class StreamSocket(FragmentSocket, SpliceSocket, Protocol):
    """What a relayed stream runs on (our own client socket,
    :class:`~hybridrelay.transport.frames_ws.FrameSocket`): messages, fragments, and
    attaching to a :class:`StreamSink`."""
