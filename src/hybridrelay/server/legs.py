"""The relayed connections and their legs, tracked for the runtime API and the ordered shutdown.

Once spliced, a connection lives on its transports alone (``transport/splice.py``): no task
owns it. The relay keeps its legs here so that a shutdown can send each a close frame (1001),
wait a bounded time for the peers' answers, and abort what is left; and it keeps each joined
pair as a :class:`RelayedConnection` (tracking id, entity, addresses, since when, bytes each
way) that the management listener lists and closes. When both legs of a connection are gone,
``on_finished`` is told once (metrics and the access log).

Bytes are the legs' own counters (``bytes_forwarded``, counted by the splice anyway), read when
asked: tracking a connection costs nothing per byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from hybridrelay.transport.base import CloseCode
from hybridrelay.transport.splice import RawLeg, SpliceLeg

__all__ = ["RelayedConnection", "RelayedLegs"]

logger = logging.getLogger("hybridrelay.server")

Leg = SpliceLeg | RawLeg


@dataclass(eq=False, slots=True)
class RelayedConnection:
    """A sender joined to a listener."""

    tracking_id: str
    entity: str
    #: ``websocket`` (a sender's connect) or ``ingress`` (the relay's own TCP port).
    kind: str
    sender: Leg
    listener: Leg
    sender_address: str | None
    listener_address: str | None
    #: Epoch seconds when it was joined, and the monotonic clock then (for its duration).
    since: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)

    @property
    def bytes_to_listener(self) -> int:
        return self.sender.bytes_forwarded

    @property
    def bytes_to_sender(self) -> int:
        return self.listener.bytes_forwarded

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def close(self, code: int, reason: str) -> None:
        """Close both legs: a close frame (or an EOF on a raw leg) and, if the peers do not
        answer, the drop timer of the close handshake (``protocol/closing.py``)."""
        for leg in (self.sender, self.listener):
            if not leg.lost:
                leg.send_close(code, reason)
                leg.expect_close_answer()


class RelayedLegs:
    """The relay's live legs (senders', listeners' rendezvous and ingress connections) and the
    connections they make up."""

    def __init__(
        self, *, on_finished: Callable[[RelayedConnection], None] = lambda connection: None
    ) -> None:
        self._legs: set[Leg] = set()
        self._gone = asyncio.Event()
        self._connections: dict[Leg, RelayedConnection] = {}
        self._on_finished = on_finished

    def __len__(self) -> int:
        return len(self._legs)

    def __iter__(self) -> Iterator[Leg]:
        return iter(list(self._legs))

    def track(self, leg: Leg) -> None:
        """Track ``leg`` until it is lost; :meth:`lost` must be the leg's ``on_lost``."""
        self._legs.add(leg)
        self._gone.clear()

    def joined(self, connection: RelayedConnection) -> None:
        """``connection``'s legs (both tracked) were joined."""
        self._connections[connection.sender] = connection
        self._connections[connection.listener] = connection

    def connections(self) -> list[RelayedConnection]:
        """The connections whose legs are both still open, oldest first."""
        unique = {id(c): c for c in self._connections.values()}
        return sorted(unique.values(), key=lambda c: c.started)

    def lost(self, leg: Leg) -> None:
        self._legs.discard(leg)
        if not self._legs:
            self._gone.set()
        connection = self._connections.pop(leg, None)
        if connection is not None:
            other = connection.listener if leg is connection.sender else connection.sender
            if other not in self._connections:  # both are gone now
                self._on_finished(connection)
        logger.debug("%s closed: %d bytes forwarded from it", leg.name, leg.bytes_forwarded)

    async def wait_gone(self) -> None:
        """Return once no leg is open (the relay's drain; the caller bounds the wait)."""
        while self._legs:
            await self._gone.wait()

    async def close(self, grace: float) -> None:
        """Send every leg a close frame (1001) and wait up to ``grace`` seconds for the peers'
        answers to end the splices; abort the legs still open then."""
        for leg in list(self._legs):
            leg.send_close(CloseCode.GOING_AWAY, "relay shutting down")
            leg.expect_close_answer()
        if self._legs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._gone.wait()
            for leg in list(self._legs):  # no answer within the grace period
                leg.abort()
