"""Rendezvous: pairing a waiting sender with the listener's accept socket, and the splice.

A sender's connect creates a :class:`PendingRendezvous` keyed by an unguessable secret that goes
into the ``accept`` address (PROTOCOL.md 5.2: the URL is the rendezvous' only credential). The
listener's accept (or reject) resolves it exactly once. Then :func:`splice` forwards messages
both ways until both sides have closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass, field

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.transport.base import MessageKind, MessageSocket, sendable_close_code

__all__ = ["Accepted", "PendingRendezvous", "Rejection", "RendezvousTable", "Splice", "SpliceStats"]

logger = logging.getLogger("hybridrelay.server")


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    description: str


@dataclass(slots=True)
class SpliceStats:
    sender_to_listener: int = 0
    listener_to_sender: int = 0


@dataclass(frozen=True, slots=True)
class Accepted:
    """The listener upgraded its rendezvous socket (with the sub-protocol it chose)."""

    socket: MessageSocket


@dataclass(eq=False)
class PendingRendezvous:
    """A sender waiting for its listener.

    ``outcome`` resolves once, to :class:`Accepted` or :class:`Rejection`; if the sender gives up
    first it is cancelled, and a late listener finds it done. Then ``sender_socket`` hands the
    upgraded sender to the listener's handler, and ``splice`` carries the data both ways.
    """

    id: str
    entity: str
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    outcome: asyncio.Future[Accepted | Rejection] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    #: The sender's socket once it is upgraded (None if that failed): the listener's handler
    #: waits for it to start its half of the splice.
    sender_socket: asyncio.Future[MessageSocket | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    splice: Splice = field(default_factory=lambda: Splice())


class RendezvousTable:
    """Pending rendezvous by secret; each is single use and removed by its sender's handler."""

    def __init__(self, limit: int) -> None:
        self._pending: dict[str, PendingRendezvous] = {}
        self._limit = limit

    def __len__(self) -> int:
        return len(self._pending)

    def create(self, connection_id: str, entity: str) -> PendingRendezvous | None:
        if len(self._pending) >= self._limit:
            return None
        pending = PendingRendezvous(connection_id, entity)
        self._pending[pending.secret] = pending
        return pending

    def discard(self, pending: PendingRendezvous) -> None:
        self._pending.pop(pending.secret, None)

    def claim(self, secret: str, connection_id: str) -> PendingRendezvous | None:
        """Take the rendezvous for a listener's accept; None if unknown, used or expired."""
        pending = self._pending.pop(secret, None)
        if pending is None:
            return None
        # The id must match too; compared in constant time like the secret lookup's result.
        if not hmac.compare_digest(pending.id.encode(), connection_id.encode()):
            self._pending[secret] = pending
            return None
        if pending.outcome.done():
            return None
        return pending


async def _pump(
    source: MessageSocket, target: MessageSocket, stats: SpliceStats, *, to_listener: bool
) -> None:
    """Forward messages from ``source`` to ``target`` until ``source`` closes.

    The source's close frame is forwarded as a close frame (same code and reason when legal,
    PROTOCOL.md 5.5) while the other direction keeps flowing: a half-close crosses the relay.
    """
    while True:
        message = await source.receive()
        if message.kind is MessageKind.CLOSE:
            if not target.close_sent:
                await target.send_close(sendable_close_code(message.code), message.reason)
            return
        try:
            await target.send(message.data)
        except RelayConnectionError:
            # The target is gone; its own pump reports the close to ``source``.
            source.abort()
            return
        if to_listener:
            stats.sender_to_listener += len(message.data)
        else:
            stats.listener_to_sender += len(message.data)


class Splice:
    """The two directions of one relayed connection.

    Each direction is pumped by the aiohttp handler task that already owns its source socket
    (the sender's handler pumps sender -> listener, the listener's handler the other way), so a
    relayed connection costs no tasks beyond the two handlers: this matters at 10,000 idle
    connections. Whichever half finishes last drops both sockets; a half that fails aborts
    both, which ends the other half too.
    """

    __slots__ = ("_halves_done", "finished", "stats")

    def __init__(self) -> None:
        self.stats = SpliceStats()
        self.finished = asyncio.Event()
        self._halves_done = 0

    async def run_half(
        self, source: MessageSocket, target: MessageSocket, *, to_listener: bool
    ) -> None:
        """Pump ``source`` -> ``target``, then wait until the other half is done too."""
        try:
            await _pump(source, target, self.stats, to_listener=to_listener)
        except BaseException:
            source.abort()
            target.abort()
            raise
        finally:
            self._halves_done += 1
            if self._halves_done == 2:
                source.abort()
                target.abort()
                self.finished.set()
        await self.finished.wait()

    def abort(self, sender: MessageSocket, listener: MessageSocket) -> None:
        """End a splice whose other half never started."""
        sender.abort()
        listener.abort()
        self.finished.set()
