"""The forwarding pump: a TCP or Unix socket on one side, a relayed stream on the other.

The socket side is an :class:`asyncio.Protocol` (:class:`SocketLeg`) rather than streams, for
throughput. The pump is :class:`CallbackPump`, on the stream's attached socket
(:meth:`HybridConnectionStream.attach`, our own client socket: DECISIONS D11): the socket's
``data_received`` writes to the stream with ``write_nowait`` and the stream's sink writes to the
socket, both in the event loop's read callbacks, with no task per direction. Flow control runs
end to end: *reading* pauses on one side while the other side's write buffer is above its
high-water mark (``pause_writing``/``resume_writing``; before the pump starts, the socket holds
at most ``high_water`` bytes plus one ``recv``).

Half-close is kept both ways (STYLE.md §3.10): EOF from the socket becomes our close frame
(1000); the peer's close frame 1000 becomes ``transport.write_eof()``; the socket is closed only
when both directions are done. A stream closed by the peer with a code other than 1000 (the
other bridge could not reach its destination, or its socket was reset) resets our socket
instead, so the client sees the failure promptly.

Only the connect and close steps are timed; data may be idle for as long as the ends like.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, cast

from hybridrelay.client import SpliceSocket, StreamSink
from hybridrelay.exceptions import RelayError
from hybridrelay.observability.bridge_metrics import ForwardMetrics

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "READ_CHUNK",
    "CallbackPump",
    "ConnectionGroup",
    "PipeStats",
    "RelayStream",
    "SocketLeg",
    "close_stream",
    "pipe",
]

logger = logging.getLogger("hybridrelay.bridge")

#: Bytes buffered from a socket before it stops reading (azbridge uses 64 KiB socket buffers).
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: Largest read from the relayed stream at a time.
READ_CHUNK = 64 * 1024
#: How long closing a socket or a stream may take before it is aborted.
CLOSE_TIMEOUT = 10.0


class RelayStream(Protocol):
    """What the bridge uses of :class:`hybridrelay.client.HybridConnectionStream`."""

    @property
    def id(self) -> str: ...

    @property
    def close_code(self) -> int | None: ...

    async def read(self, max_bytes: int = ...) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def write_eof(self) -> None: ...

    async def aclose(self, code: int = ..., reason: str = ...) -> None: ...

    def attach(self, sink: StreamSink) -> SpliceSocket: ...


class SocketLeg(asyncio.Protocol):
    """A TCP or Unix stream socket with bounded buffering and half-close.

    Args:
        on_connected: called from ``connection_made`` (the ingress uses it to start the
            connection's task).
    """

    def __init__(self, *, on_connected: Callable[[SocketLeg], None] | None = None) -> None:
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self.peername: Any = None
        self._buffer: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._reading_paused = False
        self._writable = True
        self._splice: CallbackPump | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.peername = transport.get_extra_info("peername")
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        if self._splice is not None:
            self._splice.from_socket(data)
            return
        # Before the pump: held (bounded by pausing), handed over by forward_to().
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self._splice is not None:
            self._splice.socket_eof()
        return True  # keep the transport open: we may still send (half-close)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._lost_exc = exc
        self._writable = True
        if self._splice is not None:
            self._splice.socket_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writable = False
        if self._splice is not None:
            self._splice.socket_full()

    def resume_writing(self) -> None:
        self._writable = True
        if self._splice is not None:
            self._splice.socket_drained()

    def forward_to(self, splice: CallbackPump) -> None:
        """From now on hand everything that arrives to ``splice`` (what was buffered first)."""
        self._splice = splice
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            splice.from_socket(data)
        if self._eof:
            splice.socket_eof()
        elif self._lost:
            splice.socket_lost(self._lost_exc)
        elif self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if not self._writable:
            splice.socket_full()

    # -- used by the pump --------------------------------------------------------------------

    def write_eof(self) -> None:
        """Half-close our sending side (``shutdown(SHUT_WR)``)."""
        if self.transport is not None and not self._lost and not self.transport.is_closing():
            if self.transport.can_write_eof():
                self.transport.write_eof()

    async def aclose(self, grace: float = CLOSE_TIMEOUT) -> None:
        """Close after flushing what is buffered; abort if that takes longer than ``grace``."""
        if self.transport is None:
            return
        self.transport.close()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.transport.abort()

    def abort(self) -> None:
        """Reset the socket at once (buffered data is dropped)."""
        if self.transport is not None:
            self.transport.abort()


@dataclass
class PipeStats:
    """What one forwarded connection carried."""

    bytes_up: int = 0  # socket -> relay
    bytes_down: int = 0  # relay -> socket
    started: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started


async def close_stream(
    stream: RelayStream, code: int = 1000, reason: str = "", grace: float = CLOSE_TIMEOUT
) -> None:
    """``stream.aclose`` bounded by ``grace`` seconds; never raises a relay error."""
    try:
        async with asyncio.timeout(grace):
            await stream.aclose(code, reason)
    except (TimeoutError, RelayError):
        logger.debug("stream %s: close did not complete cleanly", stream.id)


async def pipe(
    leg: SocketLeg,
    stream: RelayStream,
    metrics: ForwardMetrics,
    *,
    initial: bytes = b"",
    close_timeout: float = CLOSE_TIMEOUT,
) -> PipeStats:
    """Pump both directions until both are done, then close both ends.

    Owns ``leg`` and ``stream`` from here on: both are closed when this returns, whatever
    happens (cancellation included; closing is bounded by ``close_timeout``).

    Args:
        metrics: the forward's, which count the connection opened now and closed with its
            bytes when the pump ends; also when a drain cancels it (the counts so far).
        initial: bytes already read from the stream (after a preamble) to send first.

    Returns:
        The byte counts (``bytes_up``: what the socket sent to the relay, whichever end the
        socket is); ``error`` says why the connection ended early, if it did.
    """
    stats = PipeStats()
    metrics.opened()
    try:
        if initial and leg.transport is not None and not leg.transport.is_closing():
            # Written at once (it is already in memory), so that it goes out before whatever
            # attach() delivers; the socket's flow control applies from here on.
            leg.transport.write(initial)
            stats.bytes_down += len(initial)
        pump = CallbackPump(leg, stats)
        try:
            socket = stream.attach(pump)
        except BaseException:
            await _close_both(leg, stream, False, close_timeout)
            raise
        return await pump.run(stream, socket, close_timeout)
    finally:
        metrics.closed(stats.bytes_up, stats.bytes_down)


async def _close_both(leg: SocketLeg, stream: RelayStream, clean: bool, grace: float) -> None:
    """The end of a pump: flush and close both ends, or reset the socket and close the stream
    with 1011 (the other bridge then resets its socket too)."""
    if clean:
        await leg.aclose(grace)
        await close_stream(stream, 1000, "", grace)
    else:
        leg.abort()
        await close_stream(stream, 1011, "forwarded socket failed", grace)


class CallbackPump:
    """Both directions of one connection by callback: the socket (a :class:`SocketLeg` in
    forwarding mode) and the stream's attached socket (this is its :class:`StreamSink`).

    ``done`` resolves when both directions ended cleanly (the socket's EOF went out as our
    close frame 1000, the peer's close frame 1000 came in as ``write_eof``), or at the first
    failure (``error`` says which).
    """

    def __init__(self, leg: SocketLeg, stats: PipeStats) -> None:
        self._leg = leg
        self._stats = stats
        self._socket: SpliceSocket | None = None
        self._up_done = False
        self._down_done = False
        self.error: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(
        self, stream: RelayStream, socket: SpliceSocket, close_timeout: float
    ) -> PipeStats:
        """Forward until ``done``, then close both ends (as :func:`pipe` does)."""
        self._socket = socket
        leg = self._leg
        clean = False
        try:
            leg.forward_to(self)
            await self.done  # no timeout: data may be idle for as long as the ends like
            clean = self.error is None
        finally:
            self._stats.error = self.error
            # The stream may be paused because the socket could not take more (socket_full);
            # its close handshake must still be read. Nothing it delivers now reaches the socket.
            self._down_done = True
            socket.resume_reading()
            await _close_both(leg, stream, clean, close_timeout)
        return self._stats

    def _finish(self, error: str | None = None) -> None:
        if self.done.done():
            return
        if error is not None:
            self.error = error
            self.done.set_result(None)
        elif self._up_done and self._down_done:
            self.done.set_result(None)

    # -- StreamSink: what the stream delivers ---------------------------------------------------

    def on_data(self, data: bytes | bytearray) -> None:
        transport = self._leg.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            self._stats.bytes_down += len(data)

    def on_close(self, code: int, reason: str) -> None:
        if self._down_done:
            return
        self._down_done = True
        if code == 1000:
            try:  # shutdown(SHUT_WR) fails on a socket the peer has reset meanwhile
                self._leg.write_eof()
            except OSError as exc:
                self._finish(f"{type(exc).__name__}: {exc}")
                return
            self._finish()
        elif code == 1006:
            self._finish("RelayConnectionError: the connection was lost without a close frame")
        else:
            self._finish(f"the other side closed with code {code}")

    def on_pause(self) -> None:
        if self._leg.transport is not None:
            self._leg.transport.pause_reading()

    def on_resume(self) -> None:
        if self._leg.transport is not None and not self._up_done:
            self._leg.transport.resume_reading()

    # -- what the socket delivers ----------------------------------------------------------------

    def from_socket(self, data: bytes) -> None:
        if self._socket is not None and not self._up_done:
            self._socket.write_nowait(data)
            self._stats.bytes_up += len(data)

    def socket_eof(self) -> None:
        if self._up_done or self._socket is None:
            return
        self._up_done = True
        self._socket.close_nowait(1000)
        self._finish()

    def socket_lost(self, exc: BaseException | None) -> None:
        # Also after the socket's EOF: a socket lost while the other direction still flows
        # (a write to it hit a reset) can take nothing more, so the connection is over.
        if not (self._up_done and self._down_done):
            self._up_done = True
            self._finish(f"ConnectionResetError: the socket was lost: {exc or 'closed'}")

    def socket_full(self) -> None:
        if self._socket is not None:
            self._socket.pause_reading()

    def socket_drained(self) -> None:
        if self._socket is not None and not self._down_done:
            self._socket.resume_reading()


class ConnectionGroup:
    """Owns the tasks of one forward's connections, and drains them at shutdown.

    A task that raises is logged, not propagated: one broken connection never takes the
    forward down.
    """

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._group = asyncio.TaskGroup()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ConnectionGroup:
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The tasks are guarded, so the only error is the body's own: raise it as it was.
            if exc is not None and list(group.exceptions) == [exc]:
                raise exc from exc.__cause__
            raise

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def full(self) -> bool:
        return len(self._tasks) >= self.limit

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = self._group.create_task(self._guard(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Awaitable[None], name: str) -> None:
        try:
            await coro
        except Exception:
            logger.exception("%s: connection task %s failed", self.name, name)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the tasks, then cancel the rest; returns how many
        had to be cancelled."""
        if not self._tasks:
            return 0
        pending = set(self._tasks)
        if grace > 0:
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning(
                "%s: %d connection(s) still open after %.1f s; closing them",
                self.name,
                len(pending),
                grace,
            )
        return len(pending)
