"""Connections opened ahead of the WebSocket handshakes that will need them.

Each relayed connection costs each bridge one new connection to the relay (the sender's
connect at the ingress, the rendezvous at the edge), so a TCP connect, and with ``wss://`` a
TLS handshake, would be on the path of every new tunnel: twice, in series. A
:class:`WarmPool` keeps up to ``size`` connections open per address (scheme, host, port) that
is in use: once an address has been connected to twice within ``ttl``, every handshake to it
takes a warm connection if one is there and a new one is opened behind it. A warm connection
nobody took is closed after ``ttl``, and an address not used for that long is not warmed
again until its next two connects: an address used once (a rendezvous on another front-end
node) costs nothing extra. A warm connection the server has closed meanwhile is skipped.

Only connections that are fully set up and have not sent a byte wait here; the handshake's
request is what commits one to a use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["WARM_SIZE", "WARM_TTL", "WarmConnection", "WarmPool"]

logger = logging.getLogger("hybridrelay.client")

#: Connections kept open ahead per address.
WARM_SIZE = 2
#: How long a warm connection waits to be used, and how recently an address must have been
#: used to be warmed. Below the idle timeouts of the relays we know of: ours keeps an idle
#: connection until its first request; Azure's front ends are not documented, and a closed one
#: is only skipped.
WARM_TTL = 15.0
#: Addresses remembered for "used recently" (a listener is offered rendezvous on many hosts).
_RECENT_LIMIT = 256


class WarmConnection(Protocol):
    """What the pool needs of a connection."""

    def warm_usable(self) -> bool:
        """Still open, and nothing has been sent or received on it."""
        ...

    def abort(self) -> None: ...


C = TypeVar("C", bound=WarmConnection)


class WarmPool(Generic[C]):
    """Warm connections by address; owned by one connector (see the module)."""

    def __init__(self, *, size: int = WARM_SIZE, ttl: float = WARM_TTL) -> None:
        self._size = size
        self._ttl = ttl
        self._idle: dict[Hashable, collections.deque[tuple[C, asyncio.TimerHandle]]] = {}
        self._opening: dict[Hashable, int] = {}
        self._last_used: dict[Hashable, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        """Warm connections waiting now."""
        return sum(len(q) for q in self._idle.values())

    @property
    def opening(self) -> int:
        """Warm connections being opened now."""
        return sum(self._opening.values())

    def take(self, address: Hashable, opener: Callable[[], Awaitable[C]]) -> C | None:
        """A warm connection to ``address`` if one is there (now the caller's), else None;
        and, if ``address`` is in use, open new ones with ``opener`` up to the pool's size.
        ``opener`` must be bounded in time (a connect timeout)."""
        if self._closed:
            return None
        warm = self._pop_usable(address)
        now = asyncio.get_running_loop().time()
        previous = self._last_used.pop(address, None)
        self._last_used[address] = now  # re-inserted: the dict is in order of last use
        if len(self._last_used) > _RECENT_LIMIT:
            del self._last_used[next(iter(self._last_used))]
        if warm is not None or (previous is not None and now - previous < self._ttl):
            self._fill(address, opener)
        return warm

    async def aclose(self) -> None:
        """Close every warm connection and stop opening new ones. Idempotent."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for queue in self._idle.values():
            for connection, timer in queue:
                timer.cancel()
                connection.abort()
        self._idle.clear()

    def _pop_usable(self, address: Hashable) -> C | None:
        queue = self._idle.get(address)
        while queue:
            connection, timer = queue.popleft()
            timer.cancel()
            if connection.warm_usable():
                return connection
            connection.abort()  # closed by the server meanwhile, or it spoke first
        return None

    def _fill(self, address: Hashable, opener: Callable[[], Awaitable[C]]) -> None:
        waiting = len(self._idle.get(address, ())) + self._opening.get(address, 0)
        for _ in range(self._size - waiting):
            self._opening[address] = self._opening.get(address, 0) + 1
            task = asyncio.get_running_loop().create_task(self._open(address, opener))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, address: Hashable, opener: Callable[[], Awaitable[C]]) -> None:
        try:
            connection = await opener()
        except Exception as exc:  # (OSError, TimeoutError, RelayError, or an event loop's own)
            # The handshake that needs one connects by itself and reports what fails; nobody
            # awaits this task, so nothing may escape it.
            logger.debug("opening a warm connection failed: %s", type(exc).__name__)
            return
        finally:
            self._opening[address] -= 1
            if not self._opening[address]:
                del self._opening[address]
        if self._closed:
            connection.abort()
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._ttl, self._expire, address, connection)
        self._idle.setdefault(address, collections.deque()).append((connection, timer))

    def _expire(self, address: Hashable, connection: C) -> None:
        queue = self._idle.get(address)
        if queue is None:
            return
        for entry in queue:
            if entry[0] is connection:
                queue.remove(entry)
                break
        if not queue:
            del self._idle[address]
        connection.abort()
