"""The broker: offering a sender to a listener of a hybrid connection and pairing them.

Everything that reaches a listener goes through one :class:`Broker`: a sender's WebSocket
connect (E2), a relayed HTTP request (E6) and a connection accepted on the relay's own ingress
port. The broker holds

* the listeners' control channels (:meth:`Broker.register`), and picks the one to tell in the
  order its ``shuffle`` gives (PROTOCOL.md 1: "spread across the listeners at random"),
  skipping and dropping any whose send fails;
* the ONE table of pending rendezvous, keyed by the unguessable secret that goes into the
  address the listener is told (PROTOCOL.md 5.2: the URL is the rendezvous' only credential),
  bounded by the relay's ``max_pending_rendezvous`` in all and ``max_pending_per_connection``
  per hybrid connection (one entity's flood leaves the others their slots); each entry is
  claimed at most once, by the action it was made for (:meth:`Broker.claim`), and a sender
  that goes away while it waits frees its entry at once;
* how much each listener has queued: one whose control channel holds
  ``max_queued_per_listener`` unsent messages is passed over, and when every listener of the
  entity is full the sender is refused with 503 (load is shed, no listener is dropped for it);
* which listener was told about which pending rendezvous, so that when a control channel goes
  away the senders waiting on it learn at once (a connect is offered to another listener, an
  HTTP request fails with 502).

:class:`Broker` is the interface; :class:`LocalBroker` reaches the listeners connected to this
process. A cluster broker reaching listeners on other relay nodes implements the same methods.
Limits are passed by the caller at the moment of use (the configuration can be replaced while
the relay runs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import random
import secrets
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.protocol.addressing import filter_query, rendezvous_url
from hybridrelay.protocol.messages import Accept, RemoteEndpoint, encode_message
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import LimitsConfig
from hybridrelay.transport.entropy import EntropyPool
from hybridrelay.transport.splice import Splice

__all__ = [
    "ENTITY_DELETED",
    "WOULD_WAIT",
    "LISTENERS_BUSY",
    "NOT_IN_TIME",
    "NO_LISTENER",
    "SENDER_GONE",
    "SHUTTING_DOWN",
    "TOO_MANY_PENDING",
    "Accepted",
    "Broker",
    "Connection",
    "LocalBroker",
    "Outcome",
    "Pending",
    "PendingRendezvous",
    "Rejection",
    "Unanswered",
    "remote_endpoint",
]

P = TypeVar("P", bound="Pending")


@dataclass(frozen=True, slots=True)
class Rejection:
    """The listener rejected the sender (PROTOCOL.md 5.4) with this status and reason."""

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


Outcome = Accepted | Rejection | Unanswered

NO_LISTENER = Unanswered(404, "There are no listeners connected for the endpoint.")
TOO_MANY_PENDING = Unanswered(503, "Too many pending connections; try again later.")
NOT_IN_TIME = Unanswered(504, "The listener did not accept the connection in time.")
LISTENERS_BUSY = Unanswered(503, "Every listener is busy; try again later.")
#: What a draining relay answers a sender its listeners can no longer take (retryable).
SHUTTING_DOWN = Unanswered(503, "The relay is shutting down.")
#: The sender's connection closed while it waited (nobody reads this answer).
SENDER_GONE = Unanswered(499, "The sender went away.")
ENTITY_DELETED = "The hybrid connection was deleted."


_SECRET_BYTES = EntropyPool(24)


def _new_secret() -> str:
    """What ``secrets.token_urlsafe(24)`` gives (32 characters), from a pool of random bytes
    rather than a system call per rendezvous."""
    return base64.urlsafe_b64encode(_SECRET_BYTES.take()).decode("ascii")


@dataclass(eq=False)
class Pending:
    """A rendezvous address a listener is (or is about to be) told, waiting to be opened.

    ``channel`` is the listener that was told, set by :meth:`Broker.announce` before the
    message goes out (the listener's answer may be read before the send returns).
    """

    id: str
    entity: str
    secret: str = field(default_factory=_new_secret, repr=False)
    channel: ControlChannel | None = None
    claimed: bool = False
    #: A listener with this many messages queued is not told (set by :meth:`Broker.open`).
    max_queued: int = LimitsConfig.max_queued_per_listener
    #: Answered on the control channel it is told on (an HTTP request sent inline): only a
    #: listener whose control channel this process reads may be told.
    inline: bool = False
    #: Address-only because :meth:`Broker.answers_inline` drew another node's listener for
    #: it: offered to other nodes first (a cluster broker), this process's listeners last.
    remote_first: bool = False
    #: How long, at most, it waits for the listener once one was told (a sender's
    #: ``rendezvous_timeout``), after which the told listener's going away is nothing to it;
    #: None: no bound known here (an HTTP exchange lasts its response). A cluster node that
    #: tells another node's listener asks that node to watch the listener no longer.
    waits_for: float | None = None

    def listener_gone(self) -> None:
        """The control channel of the listener that was told went away."""

    def entity_gone(self) -> None:
        """The hybrid connection was deleted (by default: as if the listener went away)."""
        self.listener_gone()


@dataclass(eq=False)
class PendingRendezvous(Pending):
    """A sender's connection waiting for its listener (E2 or the relay's ingress).

    ``outcome`` resolves once, to :class:`Accepted` or :class:`Rejection`; if the sender gives up
    first it is cancelled. On :class:`Accepted` the sender's leg is joined to the listener's in
    ``splice``.
    """

    outcome: asyncio.Future[Accepted | Rejection] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    splice: Splice = field(default_factory=Splice)
    #: The address the listener's rendezvous came from, once it did.
    listener_address: str | None = None

    def entity_gone(self) -> None:
        if not self.outcome.done():
            self.outcome.set_result(Rejection(404, ENTITY_DELETED))


def remote_endpoint(peer: Any) -> RemoteEndpoint | None:
    """A socket's ``peername`` as the ``remoteEndpoint`` a listener is told (None if unknown)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return RemoteEndpoint(str(peer[0]), int(peer[1]))
    return None


@dataclass(frozen=True, slots=True)
class Connection:
    """A sender to offer, as its ``accept`` describes it to the listener (PROTOCOL.md 5.2).

    ``suffix`` is the sender's path below the entity (decoded) and ``raw_query`` its query as
    sent; the relay's own ``sb-hc-*`` parameters are filtered out of the address. ``gone``,
    where known, resolves when the sender's connection closes: waiting for a listener ends then.
    """

    id: str
    headers: dict[str, str]
    remote: RemoteEndpoint | None = None
    suffix: str = ""
    raw_query: str = ""
    gone: asyncio.Future[None] | None = field(default=None, compare=False, repr=False)

    def accept_text(self, base_url: str, entity: str, secret: str) -> str:
        """The ``accept`` message for a listener whose rendezvous base is ``base_url``."""
        address = rendezvous_url(
            base_url,
            entity,
            action="accept",
            connection_id=self.id,
            secret=secret,
            suffix=quote(self.suffix, safe="/"),
            app_query=filter_query(self.raw_query),
        )
        return encode_message(
            Accept(
                address=address,
                id=self.id,
                connect_headers=self.headers,
                remote_endpoint=self.remote,
            )
        )


class WouldWait(enum.Enum):
    """:meth:`Broker.announce_nowait`'s answer when only waiting would deliver the message."""

    WOULD_WAIT = "would wait"


WOULD_WAIT = WouldWait.WOULD_WAIT


class Broker(Protocol):
    """Pairs senders with listeners; see the module docstring."""

    def register(self, channel: ControlChannel, limit: int) -> bool:
        """Make ``channel`` a listener to offer senders to; False if its entity already has
        ``limit`` listeners."""
        ...

    def unregister(self, channel: ControlChannel) -> None:
        """The channel is gone: offer it nothing more, and tell what waits on it."""
        ...

    def listener_count(self, entity: str) -> int:
        """Listeners of ``entity`` connected to this process."""
        ...

    async def listener_totals(self, entities: Sequence[str]) -> dict[str, int]:
        """Listeners of each of ``entities`` on every node of the namespace (this process's
        alone without a cluster), by the names given."""
        ...

    def answers_inline(self, entity: str) -> bool:
        """Whether an HTTP request to ``entity`` may be sent inline (its response then comes on
        a control channel of this process); False: send it address-only (PROTOCOL.md 6.3)."""
        ...

    def channels(self) -> Sequence[ControlChannel]:
        """Every registered control channel (for the relay's shutdown)."""
        ...

    def entity_gone(self, entity: str) -> Sequence[ControlChannel]:
        """``entity`` was deleted: its pending senders are refused (404) and its listeners
        unregistered; returns them, for the caller to close."""
        ...

    @property
    def pending_count(self) -> int:
        """Rendezvous addresses handed out and not yet forgotten."""
        ...

    def offer(
        self, entity: str, connection: Connection, limits: LimitsConfig
    ) -> AbstractAsyncContextManager[tuple[PendingRendezvous | None, Outcome]]:
        """Offer ``connection`` to a listener of ``entity`` and wait up to the
        ``rendezvous_timeout`` of ``limits`` for its answer.

        Yields the pending rendezvous and the outcome: :class:`Accepted` (join the sender's leg
        to ``pending.splice.listener`` before leaving the block), the listener's
        :class:`Rejection`, or :class:`Unanswered` (no listener, ``max_pending_rendezvous``
        reached, or no
        answer in time; then the pending rendezvous is None unless a listener was told). If the
        listener that was told goes away before answering, the connection is offered to another
        one. On leaving, the rendezvous is forgotten and a listener leg not joined is closed.
        """
        ...

    def open(self, pending: Pending, limits: LimitsConfig) -> Unanswered | None:
        """Enter ``pending`` in the table; or why not: :data:`TOO_MANY_PENDING` when the
        relay or the entity has as many pending as ``limits`` allow, :data:`LISTENERS_BUSY`
        when every listener of the entity has ``max_queued_per_listener`` queued."""
        ...

    async def announce(
        self,
        pending: Pending,
        text_for: Callable[[str], str],
        body: bytes | None = None,
        exclude: Collection[ControlChannel] = (),
    ) -> ControlChannel | None:
        """Send ``text_for(channel.base_url)`` (and ``body`` right after it) to one listener of
        ``pending.entity``; the channel that took it, or None if none did."""
        ...

    def announce_nowait(
        self, pending: Pending, text_for: Callable[[str], str], body: bytes | None = None
    ) -> ControlChannel | WouldWait | None:
        """:meth:`announce` to a listener of this process whose control channel takes the
        message without waiting: the channel; :data:`WOULD_WAIT` if listeners are there but
        none can take it now (then :meth:`announce`); None if there is no listener."""
        ...

    def forget(self, pending: Pending) -> None:
        """Remove ``pending`` from the table; its address is refused from now on."""
        ...

    def claim(self, secret: str, connection_id: str, kind: type[P]) -> P | None:
        """The pending rendezvous of a listener's accept, reject or request rendezvous; None if
        the secret is unknown, the id does not match, it was made for another action, or it
        was claimed already (single use)."""
        ...


class LocalBroker:
    """The broker for the listeners connected to this relay process.

    ``shuffle`` orders the usable listeners in place before each offer (default
    :func:`random.shuffle`; tests pass their own to make the choice deterministic).
    """

    def __init__(self, *, shuffle: Callable[[list[ControlChannel]], None] = random.shuffle) -> None:
        self._shuffle = shuffle
        #: Registered control channels by lower-cased entity path, in registration order.
        self._by_entity: dict[str, list[ControlChannel]] = {}
        self._pending: dict[str, Pending] = {}
        #: How many of ``_pending`` belong to each (lower-cased) entity.
        self._pending_per_entity: dict[str, int] = {}
        #: Per control channel: the pending rendezvous its listener was told about.
        self._told: dict[ControlChannel, set[Pending]] = {}

    # -- listeners -----------------------------------------------------------------------------

    def register(self, channel: ControlChannel, limit: int) -> bool:
        channels = self._by_entity.setdefault(channel.entity.lower(), [])
        if len(channels) >= limit:
            return False
        channels.append(channel)
        return True

    def unregister(self, channel: ControlChannel) -> None:
        self._drop(channel)
        for pending in self._told.pop(channel, ()):
            pending.listener_gone()

    def _drop(self, channel: ControlChannel) -> None:
        """Offer ``channel`` nothing more; resolving ``channel.closed`` moves the connects
        waiting on its answer to another listener."""
        channel.usable = False
        if not channel.closed.done():
            channel.closed.set_result(None)
        key = channel.entity.lower()
        channels = self._by_entity.get(key)
        if channels and channel in channels:
            channels.remove(channel)
            if not channels:
                del self._by_entity[key]

    def listener_count(self, entity: str) -> int:
        return len(self._by_entity.get(entity.lower(), ()))

    async def listener_totals(self, entities: Sequence[str]) -> dict[str, int]:
        return {name: self.listener_count(name) for name in entities}

    def answers_inline(self, entity: str) -> bool:
        return True

    def _all_busy(self, pending: Pending) -> bool:
        """Whether every listener ``pending`` could be told has ``max_queued`` messages queued
        (False when there is none: that is answered later, as no listener)."""
        busy = False
        for channel in self._by_entity.get(pending.entity.lower(), ()):
            if channel.usable:
                if channel.queued < pending.max_queued:
                    return False
                busy = True
        return busy

    def _has_listener(self, entity: str) -> bool:
        """Whether a sender to ``entity`` has a listener to be offered to."""
        return any(c.usable for c in self._by_entity.get(entity.lower(), ()))

    def channels(self) -> Sequence[ControlChannel]:
        return [c for channels in self._by_entity.values() for c in channels]

    def entity_gone(self, entity: str) -> Sequence[ControlChannel]:
        key = entity.lower()
        for pending in [p for p in self._pending.values() if p.entity.lower() == key]:
            pending.entity_gone()
        channels = list(self._by_entity.get(key, ()))
        for channel in channels:
            self.unregister(channel)
        return channels

    # -- the table -----------------------------------------------------------------------------

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def open(self, pending: Pending, limits: LimitsConfig) -> Unanswered | None:
        key = pending.entity.lower()
        count = self._pending_per_entity.get(key, 0)
        if (
            len(self._pending) >= limits.max_pending_rendezvous
            or count >= limits.max_pending_per_connection
        ):
            return TOO_MANY_PENDING
        pending.max_queued = limits.max_queued_per_listener
        if self._all_busy(pending):
            return LISTENERS_BUSY
        self._pending[pending.secret] = pending
        self._pending_per_entity[key] = count + 1
        return None

    def forget(self, pending: Pending) -> None:
        if self._pending.pop(pending.secret, None) is not None:
            key = pending.entity.lower()
            count = self._pending_per_entity.pop(key, 1) - 1
            if count > 0:
                self._pending_per_entity[key] = count
        self._untell(pending)

    def claim(self, secret: str, connection_id: str, kind: type[P]) -> P | None:
        pending = self._pending.get(secret)
        if pending is None or pending.claimed or not isinstance(pending, kind):
            return None
        # The id must match too; compared in constant time like the secret lookup's result.
        if not secrets.compare_digest(pending.id.encode(), connection_id.encode()):
            return None
        pending.claimed = True
        return pending

    # -- telling a listener --------------------------------------------------------------------

    async def announce(
        self,
        pending: Pending,
        text_for: Callable[[str], str],
        body: bytes | None = None,
        exclude: Collection[ControlChannel] = (),
    ) -> ControlChannel | None:
        candidates = [c for c in self._by_entity.get(pending.entity.lower(), ()) if c.usable]
        self._shuffle(candidates)
        # Rendered once per rendezvous base, and garbage once this returns (not held for the
        # connection's lifetime).
        texts: dict[str, str] = {}
        for channel in candidates:
            if channel in exclude or channel.queued >= pending.max_queued:
                continue
            text = self._told_of(pending, channel, text_for, texts)
            try:
                await channel.send(text, body)
            except RelayConnectionError:
                # Never hand a sender to a dead listener: drop it and try the next one. What
                # else waits on it learns when its control channel's loop ends (unregister).
                self._untell(pending)
                self._drop(channel)
                continue
            return channel
        return None

    def announce_nowait(
        self, pending: Pending, text_for: Callable[[str], str], body: bytes | None = None
    ) -> ControlChannel | WouldWait | None:
        channels = self._by_entity.get(pending.entity.lower(), ())
        candidates: Sequence[ControlChannel]
        if len(channels) == 1:  # one listener: no list to make, nothing to shuffle
            candidates = (channels[0],) if channels[0].usable else ()
        else:
            candidates = shuffled = [c for c in channels if c.usable]
            self._shuffle(shuffled)
        if not candidates:
            return None
        texts: dict[str, str] = {}
        for channel in candidates:
            if channel.queued >= pending.max_queued:
                continue
            if channel.send_nowait(self._told_of(pending, channel, text_for, texts), body):
                return channel
            self._untell(pending)
        return WOULD_WAIT

    def _told_of(
        self,
        pending: Pending,
        channel: ControlChannel,
        text_for: Callable[[str], str],
        texts: dict[str, str],
    ) -> str:
        """Make ``channel`` the listener told of ``pending`` (before the message goes out: its
        answer may be read before the send returns); the message for its base (``texts``:
        rendered once per base)."""
        text = texts.get(channel.base_url)
        if text is None:
            text = texts[channel.base_url] = text_for(channel.base_url)
        self._untell(pending)
        pending.channel = channel
        told = self._told.get(channel)
        if told is None:
            told = self._told[channel] = set()
        told.add(pending)
        return text

    def _untell(self, pending: Pending) -> None:
        channel = pending.channel
        if channel is None:
            return
        pending.channel = None
        # The channel's set stays (it is used again by the next sender) until unregister().
        told = self._told.get(channel)
        if told is not None:
            told.discard(pending)

    # -- a sender's connection -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def offer(
        self, entity: str, connection: Connection, limits: LimitsConfig
    ) -> AsyncIterator[tuple[PendingRendezvous | None, Outcome]]:
        if not self._has_listener(entity):
            yield None, NO_LISTENER
            return
        pending = PendingRendezvous(connection.id, entity, waits_for=limits.rendezvous_timeout)
        refused = self.open(pending, limits)
        if refused is not None:
            yield None, refused
            return
        try:
            yield (
                pending,
                await self._answer(entity, connection, pending, limits.rendezvous_timeout),
            )
        finally:
            self.forget(pending)
            if not pending.outcome.done():
                pending.outcome.cancel()
            pending.splice.abandon("sender went away")

    async def _answer(
        self,
        entity: str,
        connection: Connection,
        pending: PendingRendezvous,
        rendezvous_timeout: float,
    ) -> Outcome:
        """The listener's answer; a listener that goes away before answering is replaced at
        once by another one instead of waiting out the timeout (the rendezvous address is single
        use, so a late answer from the first one is refused)."""

        def accept_text(base_url: str) -> str:
            return connection.accept_text(base_url, entity, pending.secret)

        gone = connection.gone
        if gone is None:
            gone = asyncio.get_running_loop().create_future()  # never resolved
        channel = await self.announce(pending, accept_text)
        if channel is None:
            return SENDER_GONE if gone.done() else NO_LISTENER
        loop = asyncio.get_running_loop()
        deadline = loop.time() + rendezvous_timeout
        tried = {channel}
        while not pending.outcome.done():
            remaining = deadline - loop.time()
            if gone.done():
                return SENDER_GONE
            if remaining <= 0:
                return NOT_IN_TIME
            await asyncio.wait(
                (pending.outcome, channel.closed, gone),
                timeout=remaining,
                return_when="FIRST_COMPLETED",
            )
            if channel.closed.done() and not pending.outcome.done():
                next_channel = await self.announce(pending, accept_text, exclude=tried)
                if next_channel is None:
                    # Nobody else: the first listener may still answer; wait out the deadline.
                    await asyncio.wait(
                        (pending.outcome, gone),
                        timeout=max(0.0, deadline - loop.time()),
                        return_when="FIRST_COMPLETED",
                    )
                    if gone.done() and not pending.outcome.done():
                        return SENDER_GONE
                    break
                channel = next_channel
                tried.add(channel)
        if not pending.outcome.done() or pending.outcome.cancelled():
            return NOT_IN_TIME
        return pending.outcome.result()
