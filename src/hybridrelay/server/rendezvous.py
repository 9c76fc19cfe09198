"""Rendezvous: pairing a waiting sender with the listener's accept socket, and the splice.

A sender's connect creates a :class:`PendingRendezvous` keyed by an unguessable secret that goes
into the ``accept`` address (PROTOCOL.md 5.2: the URL is the rendezvous' only credential). The
listener's accept (or reject) resolves it exactly once; then its
:class:`~hybridrelay.transport.splice.Splice` joins the two WebSockets.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from dataclasses import dataclass, field

from hybridrelay.transport.splice import Splice

__all__ = ["Accepted", "PendingRendezvous", "Rejection", "RendezvousTable", "Unanswered"]


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    description: str


@dataclass(frozen=True, slots=True)
class Unanswered:
    """No listener took the connection: none online, too many pending, or none in time."""

    status: int
    description: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The listener upgraded its rendezvous socket (with the sub-protocol it chose); its leg is
    the splice's :attr:`~hybridrelay.transport.splice.Splice.listener`."""

    subprotocol: str | None


@dataclass(eq=False)
class PendingRendezvous:
    """A sender waiting for its listener.

    ``outcome`` resolves once, to :class:`Accepted` or :class:`Rejection`; if the sender gives up
    first it is cancelled, and a late listener finds it done. Then the sender's handler joins
    its WebSocket to the listener's in ``splice``.
    """

    id: str
    entity: str
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    outcome: asyncio.Future[Accepted | Rejection] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    splice: Splice = field(default_factory=Splice)


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
