"""The gate in front of the relay's listening sockets: how many connections, and the first
request's head.

Before a client has sent a whole request it has proven nothing (no token has been checked),
yet each of its connections costs a file descriptor and whatever its unfinished headers
hold. A relay on the public internet gave a flood of idle connections every descriptor
(RLIMIT_NOFILE), and 60 connections trickling 128 headers of 32 KiB each grew it by 316 MiB.
So every accepted connection passes this gate first:

* **caps**: ``max_connections`` in all and ``max_connections_per_source`` from one address;
  a connection over the per-source cap is closed at once, before a byte of it is read. At the
  cap in all, the oldest connection still sending its first head makes room (it has proven
  nothing yet, and a flood of idle connections from many addresses must not lock out the
  clients that do send a request); only when there is none is the new one refused;
* **the first request head** is read here, not by aiohttp: it must be complete (the blank
  line after the headers) within ``header_timeout`` seconds and ``max_header_bytes`` bytes, or
  the connection gets ``408`` / ``431`` and is closed. Only then is the connection handed to
  the real protocol (the relay's HTTP front, ``sender_http.py``, which hands aiohttp what it
  does not serve), with the bytes read so far, and the gate steps out of the
  data path (``transport.set_protocol``): it costs nothing per byte afterwards.

A connection is counted from its accept until its transport closes, whoever owns it then
(aiohttp, or a splice that took the connection over): the gate keeps the transports, and
forgets closed ones when it needs the room (:meth:`ConnectionGate._prune`), so no protocol
has to tell it.

Later requests on a kept-alive connection are bounded by aiohttp's per-field limits (the
front hands aiohttp every head that could reach them) and the relay's idle timeout; the
first one is where a client without a token gets its say. The relay's own ``ingress:``
ports carry raw TCP, not HTTP: there the gate counts and caps only (``read_head=False``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

__all__ = ["ConnectionGate", "GateLimits", "GatedServer", "default_max_connections"]

logger = logging.getLogger("hybridrelay.server")

#: How often, at most, the gate walks its transports to forget the closed ones.
_PRUNE_INTERVAL = 0.25
#: File descriptors kept back from the connection cap: the store, logs, the management
#: listener, outgoing sockets of the relay's own ingress.
_FD_RESERVE = 64


def default_max_connections() -> int:
    """The connection cap that leaves room below the soft RLIMIT_NOFILE (the ``serve``
    command raises it to the hard limit first)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 10_000
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(16, int(soft) - _FD_RESERVE)


@dataclass(frozen=True, slots=True)
class GateLimits:
    """The gate's bounds (read at each accept: the relay's configuration can change)."""

    max_connections: int
    max_connections_per_source: int
    header_timeout: float
    max_header_bytes: int


class ConnectionGate:
    """Counts the relay's connections and checks each one's first request head."""

    def __init__(
        self, limits: Callable[[], GateLimits], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = limits
        self._clock = clock
        #: Every admitted transport that was open when last looked at, with its source.
        self._open: dict[asyncio.BaseTransport, str] = {}
        #: The same transports by source: a source at its cap has its own (at most cap)
        #: transports looked at, at once; only the walk over all of them is rate-limited.
        self._by_source: dict[str, set[asyncio.BaseTransport]] = {}
        self._pruned_at = -_PRUNE_INTERVAL
        #: Connections still sending their first request head: nobody else knows them yet,
        #: so the relay's shutdown closes them through the gate (:meth:`close_waiting`).
        #: In arrival order (a dict as an ordered set): the oldest is the first evicted.
        self._waiting: dict[_FirstRequest, None] = {}
        #: Connections closed to make room for a new one, since the start.
        self.evicted = 0
        #: Connections refused since the last warning, by cause (logged once a minute at most).
        self.refused: dict[str, int] = {}
        self._warned_at = -60.0

    @property
    def open_connections(self) -> int:
        """Admitted connections not known to be closed (closed ones are forgotten lazily)."""
        return len(self._open)

    def wrap(
        self, factory: Callable[[], asyncio.BaseProtocol], *, read_head: bool = True
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that puts the gate before ``factory``
        (``read_head=False``: the caps only, for connections that do not speak HTTP)."""
        return lambda: _FirstRequest(self, factory, read_head=read_head)

    def close_waiting(self) -> None:
        """Close the connections that have not finished their first request head."""
        for waiting in list(self._waiting):
            waiting.close()

    # -- counting ----------------------------------------------------------------------------

    def admit(self, transport: asyncio.BaseTransport, source: str) -> str | None:
        """Count ``transport`` in; or why it is refused (it is then not counted)."""
        limits = self._limits()
        if len(self._open) >= limits.max_connections:
            self._prune()
        same = self._by_source.get(source)
        if same is not None and len(same) >= limits.max_connections_per_source:
            for closed in [t for t in same if t.is_closing()]:
                self.release(closed)
            if len(same) >= limits.max_connections_per_source:
                return self._refuse("max_connections_per_source")
        if len(self._open) >= limits.max_connections:
            if not self._waiting:
                return self._refuse("max_connections")
            oldest = next(iter(self._waiting))
            oldest.close()  # releases its place
            self.evicted += 1
        self._open[transport] = source
        self._by_source.setdefault(source, set()).add(transport)
        return None

    def release(self, transport: asyncio.BaseTransport) -> None:
        """``transport`` is closed (the gate learns this itself otherwise, later)."""
        source = self._open.pop(transport, None)
        if source is not None:
            same = self._by_source.get(source)
            if same is not None:
                same.discard(transport)
                if not same:
                    del self._by_source[source]

    def _prune(self) -> None:
        now = self._clock()
        if now - self._pruned_at < _PRUNE_INTERVAL:
            return
        self._pruned_at = now
        for transport in [t for t in self._open if t.is_closing()]:
            self.release(transport)

    def _refuse(self, cause: str) -> str:
        self.refused[cause] = self.refused.get(cause, 0) + 1
        now = self._clock()
        if now - self._warned_at >= 60.0:
            self._warned_at = now
            counts = ", ".join(f"{n} over {c}" for c, n in sorted(self.refused.items()))
            logger.warning("connections refused at the gate: %s (see limits.%s)", counts, cause)
            self.refused.clear()
        return cause


_RESPONSE = (
    "HTTP/1.1 {status}\r\nServer: hybridrelay\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Length: {length}\r\nConnection: close\r\n\r\n{text}"
)


def _answer(status: str, text: str) -> bytes:
    body = text + "\n"
    return _RESPONSE.format(status=status, length=len(body), text=body).encode("ascii")


class _FirstRequest(asyncio.Protocol):
    """A connection until its first request head is complete; then its real protocol's."""

    def __init__(
        self,
        gate: ConnectionGate,
        factory: Callable[[], asyncio.BaseProtocol],
        *,
        read_head: bool = True,
    ) -> None:
        self._gate = gate
        self._factory = factory
        self._read_head = read_head
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._limit = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance check.
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if self._gate.admit(transport, source) is not None:
            transport.abort()
            return
        self._transport = transport
        if not self._read_head:
            self._hand_over()
            return
        limits = self._gate._limits()
        self._gate._waiting[self] = None
        self._limit = limits.max_header_bytes
        self._timer = asyncio.get_running_loop().call_later(limits.header_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        # Where the head could end: look from just before the new bytes (a CRLFCRLF split
        # across reads).
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n", start)
        if end >= 0 and end + 4 <= self._limit:
            self._hand_over()
        elif len(self._buffer) > self._limit:
            self._refuse(
                "431 Request Header Fields Too Large", "The request's headers are too large."
            )

    def eof_received(self) -> bool | None:
        # A client that half-closed before its head was complete has nothing more to say.
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def _too_slow(self) -> None:
        self._timer = None
        if self._buffer:
            self._refuse("408 Request Timeout", "The request's headers did not arrive in time.")
        else:  # never said a word: nothing to answer
            self.close()

    def _refuse(self, status: str, text: str) -> None:
        transport = self._transport
        if transport is not None:
            transport.write(_answer(status, text))
        self.close()

    def close(self) -> None:
        self._gate._waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None:
            self._gate.release(transport)
            transport.close()
        self._buffer = bytearray()

    def _hand_over(self) -> None:
        transport = self._transport
        assert transport is not None
        self._gate._waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None  # still counted by the gate, until it closes
        data, self._buffer = bytes(self._buffer), bytearray()
        protocol = self._factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data and not transport.is_closing():
            cast(asyncio.Protocol, protocol).data_received(data)


class GatedServer(web.Server):
    """aiohttp's low-level server with ``gate`` (and ``front``) in front of each connection it
    is given."""

    def __init__(
        self,
        *args: Any,
        gate: ConnectionGate,
        front: Callable[[Callable[[], Any]], Callable[[], asyncio.BaseProtocol]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._gate = gate
        # ``front``: made from aiohttp's protocol factory, the protocol a connection gets
        # after the gate (the relay's own HTTP front, which hands aiohttp what it does not
        # serve itself).
        handler = super().__call__
        self._make_handler = front(handler) if front is not None else handler

    def __call__(self) -> Any:  # what loop.create_server calls per accepted connection
        return _FirstRequest(self._gate, self._make_handler)
