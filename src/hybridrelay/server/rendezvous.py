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

__all__ = ["Accepted", "PendingRendezvous", "Rejection", "RendezvousTable", "SpliceStats", "splice"]

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
    first it is cancelled, and a late listener finds it done. ``finished`` is set when the
    sender's handler is over, so that the listener's handler can return.
    """

    id: str
    entity: str
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    outcome: asyncio.Future[Accepted | Rejection] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    finished: asyncio.Event = field(default_factory=asyncio.Event)


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


async def splice(sender: MessageSocket, listener: MessageSocket) -> SpliceStats:
    """Forward both ways until both sides have closed; returns the byte counts."""
    stats = SpliceStats()
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_pump(sender, listener, stats, to_listener=True))
            group.create_task(_pump(listener, sender, stats, to_listener=False))
    finally:
        sender.abort()
        listener.abort()
    return stats
