"""The cluster broker: senders on this node reach listeners connected to any node, through Redis.

A :class:`LocalBroker` for the listeners of this process, plus:

* **Registrations.** For each entity with listeners here, the hash ``routes:{entity}`` holds
  ``{node id: local listener count}`` and the set ``node:{id}:entities`` names the entities, so
  a dead node's entries can be removed. Both are written when the count changes (coalesced), not
  per idle period: an idle listener costs no Redis operation after its registration. A
  draining node's count is 0 ("its listeners are moving") until it leaves.
* **The lease, per node.** Every ``lease / 3`` seconds a node puts itself in the sorted set
  ``nodes`` with score "now + lease" and reads which nodes are alive (score in the future):
  two commands per node per renewal, whatever its number of listeners. A node whose entry was
  missing (Redis lost its data, or the node was taken for dead) registers all its entities again.
  A node that dies stops being routed to when its lease runs out and the others' next renewal
  sees it: at most ``lease + lease / 3`` seconds (4 s by default), and at once in practice,
  since a dead node's pub/sub connection is gone and an offer published to it reaches nobody
  (``PUBLISH`` answers 0) and is skipped. The first live node to see an expired entry removes its
  routes. A node that joined since the last renewal is routed to at once (its routes are
  there as soon as it has listeners: a restarted worker is reachable without a wait).
* **Offers to another node.** A sender lands on node B; the listener's control channel is on A.
  B keeps the pending rendezvous in its own table, renders the ``accept`` (or the address-only
  HTTP ``request``) with a rendezvous address naming B (``server.public_base_url``, else B's
  own base URL) and publishes it on A's channel ``node:{A}``. A sends it on one of its control
  channels and answers ``told`` (or ``none``: B tries the next node or its own listeners) on
  B's channel. The listener dials B; the bytes flow through B only. If the control channel on
  A goes away before the rendezvous is over, A says ``gone`` and B offers the sender elsewhere
  (a connect) or answers 502 (an HTTP request), as for a local listener.
* **HTTP across nodes** is always address-only (PROTOCOL.md 6.3 case 1): the listener opens the
  request rendezvous on B and answers there, so no response ever comes back on A's control
  channel. A request is sent inline only when it is given to a listener of this node
  (:meth:`ClusterBroker.answers_inline` draws that choice first, weighted by listener counts).
* **Spreading.** Each offer draws local or remote weighted by listener counts (the remote ones
  from ``routes:{entity}``, cached :data:`ROUTE_CACHE_TTL` seconds: at most one Redis read per
  entity per second on a node, whatever the number of senders). A listener whose control channel
  holds ``max_queued_per_listener`` messages is passed over on its own node (A answers
  ``none``).
* **Listeners on the move** (a drain's 1012, a node's death): a routes read that found none,
  or whose nodes all answered ``none``, is read again after :data:`ROUTE_RECHECK`; a sender
  whose entity had a listener within :data:`RECENT_LISTENER` waits up to
  :data:`LISTENER_RETURN_WAIT` for one to be registered again (docs/CLUSTER.md).
* **Redis outage.** Listeners and senders on this node keep being paired; remote listeners are
  not reachable; the registrations are written again when Redis is back. One log line for the
  outage and one for the recovery (the store's, when the relay has a Redis store: one per node).

The braces in these names are written out: hash tags, so that on a Redis Cluster the routes
of different entities and the channels of different nodes spread over the shards (a node
channel is sharded pub/sub there: store/redis_address.py).

Messages on the node channels are JSON objects, at most :data:`MAX_MESSAGE_BYTES` each.
Nothing here logs a rendezvous address (its secret is the rendezvous' only credential).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from typing import Any, cast

from hybridrelay.server.broker import (
    Connection,
    LocalBroker,
    Outcome,
    Pending,
    PendingRendezvous,
)
from hybridrelay.server.channel import ChannelSocket, ControlChannel
from hybridrelay.server.config import LimitsConfig
from hybridrelay.store.records import entity_key
from hybridrelay.store.redis import (
    REDIS_FAILURES,
    REDIS_TIMEOUT,
    OutageLog,
    follow_channel,
    open_redis,
    raise_if_cancelled,
)

__all__ = ["DEFAULT_LEASE", "ROUTE_CACHE_TTL", "ClusterBroker", "RemoteChannel", "routes_key"]

logger = logging.getLogger("hybridrelay.cluster")

#: A node that has not renewed for this long is dead (seconds).
DEFAULT_LEASE = 3.0
#: How long a node reuses what it read of an entity's listeners on other nodes.
ROUTE_CACHE_TTL = 1.0
#: ... when that read found none, or found listeners that turned out not to take offers: a
#: listener that moved (a drain's 1012, a node's death) is found again this soon.
ROUTE_RECHECK = 0.05
#: A sender whose entity had a listener this recently, and has none now, waits up to
#: :data:`LISTENER_RETURN_WAIT` for one to come back (a listener moving to another node is
#: away for its reconnect) instead of being refused 404 at once.
RECENT_LISTENER = 5.0
LISTENER_RETURN_WAIT = 2.0
#: How long B waits for A's ``told``/``none`` before trying elsewhere.
OFFER_ANSWER_TIMEOUT = 2.0
#: A node channel message longer than this is dropped (headers are bounded far below it).
MAX_MESSAGE_BYTES = 256 * 1024
#: How long the node that told a listener watches its control channel for the sender's node
#: (the offer's ``ttl``) when the sender's node knows no shorter bound (an HTTP request's
#: listener dials at once). A connect's is its ``rendezvous_timeout`` plus
#: :data:`OFFER_ANSWER_TIMEOUT` (:func:`_watch_seconds`): a ``gone`` later than that finds
#: nothing waiting.
_WATCH_SECONDS = 120.0
#: Offers from other nodes being sent on this node's control channels at once; more: ``none``.
MAX_SERVING_OFFERS = 10_000


def _watch_seconds(pending: Pending) -> float:
    """How long the node that tells a listener of ``pending`` is asked to watch it (see
    :data:`_WATCH_SECONDS`): ``pending`` waits for the listener at most ``waits_for`` after
    our ``told`` came back, which came back at most :data:`OFFER_ANSWER_TIMEOUT` after that node
    started watching. Watched longer, a listener that goes away costs a ``PUBLISH`` of
    ``gone`` per offer told in that time that nothing here waits on any more."""
    if pending.waits_for is None:
        return _WATCH_SECONDS
    return min(_WATCH_SECONDS, pending.waits_for + OFFER_ANSWER_TIMEOUT)


class RemoteChannel(ControlChannel):
    """A listener on another node, as the sender's node sees it once that node took an offer.

    It is never sent on (offers go through Redis); ``closed`` resolves when the other node says
    the control channel it used went away, and ``base_url`` is this node's own rendezvous base.
    """

    def __init__(self, node: str, ref: str, entity: str, base_url: str) -> None:
        # No socket: a RemoteChannel is only a broker's bookkeeping (never in ``channels()``).
        super().__init__(entity, f"node:{node}", cast(ChannelSocket, None), 0.0, node, base_url)
        self.node = node
        self.ref = ref


class _RemoteOffer(Pending):
    """An offer from another node, told to a control channel here: the other node learns if
    that channel goes away before the rendezvous is over."""

    def __init__(self, ref: str, entity: str, on_gone: Callable[[], None]) -> None:
        super().__init__(id=ref, entity=entity)
        self._on_gone = on_gone

    def listener_gone(self) -> None:
        self._on_gone()


def routes_key(namespace: str, entity: str) -> str:
    """The Redis hash of ``entity``'s listener counts per node (``entity`` as :func:`entity_key`
    gives it). The entity is the hash tag: on a Redis Cluster, entities spread over the
    shards."""
    return f"hybridrelay:{namespace}:routes:{{{entity}}}"


class ClusterBroker(LocalBroker):
    """The broker of a cluster node; see the module docstring. :meth:`start` joins, once the
    relay knows its own address; :meth:`aclose` leaves (its routes removed at once)."""

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        public_base: Callable[[], str],
        shuffle: Callable[[list[ControlChannel]], None] = random.shuffle,
        local_first: bool = False,
    ) -> None:
        super().__init__(shuffle=shuffle)
        #: ``store.spread: local-first``: a sender goes to this node's listeners whenever one
        #: can take it; other nodes' only when none can (see :meth:`announce`).
        self._local_first = local_first
        self._url = url
        self._public_base = public_base
        self.node_id = secrets.token_hex(6)
        self._namespace_name = namespace
        self._prefix = f"hybridrelay:{namespace}:"
        self._nodes_key = self._prefix + "nodes"
        self._link = open_redis(url)
        self._redis = self._link.client
        self.outage = OutageLog(url, "cluster")
        #: Nodes not routed to: their lease ran out (at the last renewal), or an offer
        #: published to them reached nobody (node -> its lease then: until it renews). A node
        #: seen in neither is new, and routed to.
        self._expired: set[str] = set()
        self._unheard: dict[str, float] = {}
        #: The other nodes in the lease set at the last renewal -> their lease's end.
        self._leases: dict[str, float] = {}
        #: entity key -> when a listener of it was last seen (here, or in its routes).
        self._seen: dict[str, float] = {}
        #: entity key -> the routes read under way (concurrent senders share one read).
        self._reading: dict[str, asyncio.Future[list[tuple[str, int]]]] = {}
        self._renewed = asyncio.Event()
        #: entity key -> (read at, [(node, listener count)]).
        self._routes: dict[str, tuple[float, list[tuple[str, int]]]] = {}
        self._dirty: set[str] = set()
        #: Entities whose routes are being read behind an HTTP request (one read each).
        self._refreshing: set[str] = set()
        self._flush_wanted = asyncio.Event()
        #: Offers this node published, waiting for ``told``/``none``.
        self._answers: dict[str, asyncio.Future[str]] = {}
        #: Remote channels that took an offer of ours, by reference (for ``gone``).
        self._remote: dict[str, RemoteChannel] = {}
        self._serving = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        #: Left the cluster (:meth:`aclose`): Redis is not used any more.
        self._left = False
        #: False from a drain on: this node's listeners are no longer offered to other nodes.
        self._advertising = True

    def _channel_of(self, node: str) -> str:
        return f"{self._prefix}node:{{{node}}}"

    def _routes_key(self, key: str) -> str:
        return routes_key(self._namespace_name, key)

    def _entities_key(self, node: str) -> str:
        return f"{self._prefix}node:{{{node}}}:entities"

    # -- joining and leaving ----------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, take the lease and start renewing it; returns after the first renewal
        (or after a few seconds if Redis does not answer: the node then serves its own
        listeners and joins when Redis is back)."""
        loop = asyncio.get_running_loop()
        subscribed = asyncio.Event()
        self._loops = [
            loop.create_task(self._follow_messages(subscribed)),
            loop.create_task(self._renew_loop()),
            loop.create_task(self._flush_loop()),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                await subscribed.wait()
                await self._renewed.wait()

    async def aclose(self) -> None:
        self._left = True
        for task in (*self._loops, *self._tasks):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        # Leave at once rather than when the lease runs out.
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._remove_node(self.node_id)
        await self._link.aclose()

    # -- registrations ------------------------------------------------------------------------

    def register(self, channel: ControlChannel, limit: int) -> bool:
        if not super().register(channel, limit):
            return False
        self._changed(channel.entity)
        return True

    def unregister(self, channel: ControlChannel) -> None:
        super().unregister(channel)
        if not isinstance(channel, RemoteChannel):
            self._saw_listener(entity_key(channel.entity))
            self._changed(channel.entity)

    def _saw_listener(self, key: str) -> None:
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[key] = time.monotonic()

    def stop_advertising(self) -> None:
        """The relay drains: mark this node's routes 0 now ("its listeners are moving"): other
        nodes stop offering senders here at once, not when the listeners are gone, and hold
        their senders a moment for the listeners to come back elsewhere. The entries go when
        this node leaves (:meth:`aclose`)."""
        self._advertising = False
        self._dirty |= set(self._by_entity)
        self._flush_wanted.set()

    def _changed(self, entity: str) -> None:
        if self._left:
            return
        self._dirty.add(entity.lower())
        self._flush_wanted.set()

    async def _flush_loop(self) -> None:
        """Write the listener counts that changed (coalesced; again after an outage)."""
        while True:
            raise_if_cancelled()
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            dirty, self._dirty = self._dirty, set()
            if not dirty:
                continue  # an empty pipeline reaches no server: it says nothing of Redis
            listed: dict[str, str] = {}  # entity key -> the count its route says
            unlisted: list[str] = []
            for key in dirty:
                count = self.listener_count(key)
                if not self._advertising:
                    # 0: "its listeners are moving" (a drain), until this node leaves; other
                    # nodes hold their senders a moment for them.
                    listed[key] = "0"
                elif count:
                    listed[key] = str(count)
                else:
                    unlisted.append(key)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT * 2):
                    # In three steps, so that a route of this node is always in its entities
                    # set, whatever part of a flush was done when the node stopped (cancelled
                    # by aclose, killed, or cut off; on a Redis Cluster one pipeline's commands
                    # run per shard, some without the others): the set is what _remove_node
                    # cleans up after it. Added to the set before the route, taken out after.
                    if listed:
                        await self._redis.sadd(self._entities_key(self.node_id), *listed)
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key, count_text in listed.items():
                            pipe.hset(self._routes_key(key), self.node_id, count_text)
                        for key in unlisted:
                            pipe.hdel(self._routes_key(key), self.node_id)
                        await pipe.execute()
                    if unlisted:
                        await self._redis.srem(self._entities_key(self.node_id), *unlisted)
                self.outage.report(None)
            except REDIS_FAILURES as exc:
                raise_if_cancelled()
                self.outage.report(exc)
                self._dirty |= dirty
                await asyncio.sleep(DEFAULT_LEASE / 3)
                self._flush_wanted.set()

    async def _renew_loop(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                await self._renew()
                self.outage.report(None)
            except REDIS_FAILURES as exc:
                raise_if_cancelled()
                self.outage.report(exc)
            await asyncio.sleep(DEFAULT_LEASE / 3)

    async def _renew(self) -> None:
        now = time.time()
        async with asyncio.timeout(REDIS_TIMEOUT * 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._nodes_key, {self.node_id: now + DEFAULT_LEASE})
                pipe.zrange(self._nodes_key, 0, -1, withscores=True)
                added, members = await pipe.execute()
        if added:  # we were not there: Redis lost its data, or took us for dead
            self._dirty |= set(self._by_entity)
            self._flush_wanted.set()
        dead: list[str] = []
        leases: dict[str, float] = {}
        for member, score in members:
            node = member.decode() if isinstance(member, bytes) else str(member)
            if node == self.node_id:
                continue
            leases[node] = float(score)
            if float(score) <= now:
                dead.append(node)
        self._expired = set(dead)
        self._leases = leases
        # Unheard stays so until the node renews its lease (or leaves the set).
        self._unheard = {
            node: lease
            for node, lease in self._unheard.items()
            if node in leases and leases[node] <= lease
        }
        self._renewed.set()
        for node in dead[:10]:  # a few per renewal: a mass failure is cleaned up over seconds
            logger.info("cluster: node %s missed its lease; its listeners are not routed to", node)
            await self._remove_node(node)

    async def _remove_node(self, node: str) -> None:
        # Its routes first, its entry in the nodes' set last: a removal cut short (a timeout,
        # this node stopping; on a Redis Cluster a pipeline runs per shard) leaves the node in
        # the set, where a live node finds it dead and removes it again.
        entities = await self._redis.smembers(self._entities_key(node))
        if entities:
            async with self._redis.pipeline(transaction=False) as pipe:
                for raw in entities:
                    key = raw.decode() if isinstance(raw, bytes) else str(raw)
                    pipe.hdel(self._routes_key(key), node)
                await pipe.execute()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._entities_key(node))
            pipe.zrem(self._nodes_key, node)
            await pipe.execute()

    async def _remote_routes(self, entity: str, *, recheck: bool = False) -> list[tuple[str, int]]:
        """The other nodes with listeners of ``entity`` and how many (cached
        :data:`ROUTE_CACHE_TTL`; :data:`ROUTE_RECHECK` when that found none, or with
        ``recheck``: the listeners read turned out not to take offers)."""
        if self._left:
            return []
        key = entity_key(entity)
        cached = self._routes.get(key)
        if cached is not None:
            age = time.monotonic() - cached[0]
            routes = self._routable(cached[1])
            short = recheck or not routes
            if age <= (ROUTE_RECHECK if short else ROUTE_CACHE_TTL):
                return routes
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.get_running_loop().create_future()
            self._reading[key] = reading
            try:
                read = await self._read_routes(key)
                reading.set_result(read)
            finally:
                del self._reading[key]
                if not reading.done():  # cancelled: the others find no routes this time
                    reading.set_result([])
        read = await asyncio.shield(reading)
        routes = self._routable(read)
        if routes or any(n == 0 or self._is_dead(node) for node, n in read):
            self._saw_listener(key)  # listeners now, or a moment ago (a drain's 0, a death)
        return routes

    async def _read_routes(self, key: str) -> list[tuple[str, int]]:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                raw = await self._redis.hgetall(self._routes_key(key))
        except REDIS_FAILURES as exc:
            raise_if_cancelled()
            self.outage.report(exc)
            raw = {}
        return self._keep_routes(key, raw)

    def _keep_routes(self, key: str, raw: dict[Any, Any]) -> list[tuple[str, int]]:
        """Parse a ``routes:{entity}`` hash as read and cache it."""
        routes = []
        for node, count in raw.items():
            name = node.decode() if isinstance(node, bytes) else str(node)
            with contextlib.suppress(ValueError):
                routes.append((name, int(count)))
        if len(self._routes) > 10_000:
            self._routes.clear()
        self._routes[key] = (time.monotonic(), routes)
        return routes

    async def listener_totals(self, entities: Sequence[str]) -> dict[str, int]:
        """This node's listeners plus the other live nodes' (their routes, cached
        :data:`ROUTE_CACHE_TTL`; those not cached are read in one pipelined round trip)."""
        now = time.monotonic()
        stale = sorted(
            {
                key
                for key in map(entity_key, entities)
                if (cached := self._routes.get(key)) is None or now - cached[0] > ROUTE_CACHE_TTL
            }
        )
        if stale and not self._left:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key in stale:
                            pipe.hgetall(self._routes_key(key))
                        hashes = await pipe.execute()
                for key, raw in zip(stale, hashes, strict=True):
                    self._keep_routes(key, raw)
            except REDIS_FAILURES as exc:
                raise_if_cancelled()
                self.outage.report(exc)  # what is cached (or this node's count) is answered
        return {
            name: self.listener_count(name) + self._cached_remote_count(name) for name in entities
        }

    def _is_dead(self, node: str) -> bool:
        return node in self._expired or node in self._unheard

    def _routable(self, routes: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The other nodes (never this one: its listeners are offered locally) that are not
        known dead, with listeners."""
        return [
            (node, n)
            for node, n in routes
            if n > 0 and node != self.node_id and not self._is_dead(node)
        ]

    def _refresh_soon(self, entity: str) -> None:
        """Read ``entity``'s routes behind the request when the cache has none or stale ones.
        An HTTP request draws inline (local) or not from the cache without waiting for Redis;
        without this, a node whose cache was never filled by a connect would keep every
        request on its own listeners."""
        key = entity_key(entity)
        cached = self._routes.get(key)
        if cached is not None and time.monotonic() - cached[0] <= ROUTE_CACHE_TTL:
            return
        if key in self._refreshing or self._left:
            return
        self._refreshing.add(key)

        async def refresh() -> None:
            try:
                await self._remote_routes(entity)
            finally:
                self._refreshing.discard(key)

        self._spawn(refresh())

    def _cached_remote_count(self, entity: str) -> int:
        cached = self._routes.get(entity_key(entity))
        if cached is None:
            return 0
        return sum(n for _, n in self._routable(cached[1]))

    def _had_listener(self, entity: str) -> bool:
        """Whether ``entity`` had a listener within :data:`RECENT_LISTENER`. (A draining node's
        own listeners do not count: it answers its senders 503, to be retried elsewhere.)"""
        seen = self._seen.get(entity_key(entity))
        recent = seen is not None and time.monotonic() - seen <= RECENT_LISTENER
        return recent and self._advertising

    async def _listener_back(self, entity: str, gone: asyncio.Future[None] | None) -> None:
        """If ``entity`` has no listener now but had one within :data:`RECENT_LISTENER`, wait
        up to :data:`LISTENER_RETURN_WAIT` (or until the sender goes) for one to be
        registered again, here or on another node (routes re-read every
        :data:`ROUTE_RECHECK`, one read per entity however many senders wait)."""
        loop = asyncio.get_running_loop()
        if not self._had_listener(entity):
            return
        deadline = loop.time() + LISTENER_RETURN_WAIT
        while not LocalBroker._has_listener(self, entity):
            if await self._remote_routes(entity) or loop.time() >= deadline:
                return
            if gone is not None and gone.done():
                return
            await asyncio.sleep(ROUTE_RECHECK)

    # -- the broker ---------------------------------------------------------------------------

    def _has_listener(self, entity: str) -> bool:
        return super()._has_listener(entity) or self._cached_remote_count(entity) > 0

    def _all_busy(self, pending: Pending) -> bool:
        # Listeners on other nodes may have room (their node answers "none" if not).
        remote = not pending.inline and self._cached_remote_count(pending.entity) > 0
        return not remote and super()._all_busy(pending)

    def answers_inline(self, entity: str) -> bool:
        local = sum(1 for c in self._by_entity.get(entity.lower(), ()) if c.usable)
        if not local:
            return False
        if self._local_first:
            return True
        self._refresh_soon(entity)
        remote = self._cached_remote_count(entity)
        return random.random() * (local + remote) < local

    @contextlib.asynccontextmanager
    async def offer(
        self, entity: str, connection: Connection, limits: LimitsConfig
    ) -> AsyncIterator[tuple[PendingRendezvous | None, Outcome]]:
        await self._remote_routes(entity)  # fresh enough for _has_listener and announce
        if not self._has_listener(entity):
            await self._listener_back(entity, connection.gone)
        async with super().offer(entity, connection, limits) as result:
            yield result

    def forget(self, pending: Pending) -> None:
        channel = pending.channel
        super().forget(pending)
        self._drop_remote(channel)

    def _drop_remote(self, channel: ControlChannel | None) -> None:
        if isinstance(channel, RemoteChannel):
            self._told.pop(channel, None)
            self._remote.pop(channel.ref, None)

    async def announce(
        self,
        pending: Pending,
        text_for: Callable[[str], str],
        body: bytes | None = None,
        exclude: Collection[ControlChannel] = (),
    ) -> ControlChannel | None:
        """Local or remote, weighted by listener counts. When nobody took it: the routes are
        read again (a listener read there may have moved) and the nodes not tried yet are
        offered it; and if the entity had a listener recently (:meth:`_listener_back`), this
        goes on for up to :data:`LISTENER_RETURN_WAIT`. An inline request or one with its body
        (answered on a control channel of this node) is offered to local listeners only."""
        local_only = pending.inline or body is not None
        tried = {c.node for c in exclude if isinstance(c, RemoteChannel)}
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        recheck = False
        while True:
            channel = await self._announce_once(pending, text_for, body, exclude, tried, recheck)
            if channel is not None or local_only:
                return channel
            if deadline is None:
                recent = self._had_listener(pending.entity)
                deadline = loop.time() + (LISTENER_RETURN_WAIT if recent else 0.0)
            elif loop.time() >= deadline:
                return None
            else:
                await asyncio.sleep(ROUTE_RECHECK)  # a moving listener: no event to wait on
            recheck = True

    async def _announce_once(
        self,
        pending: Pending,
        text_for: Callable[[str], str],
        body: bytes | None,
        exclude: Collection[ControlChannel],
        tried: set[str],
        recheck: bool,
    ) -> ControlChannel | None:
        """One round of :meth:`announce` over the nodes not in ``tried`` (added to it)."""
        key = pending.entity.lower()
        local = sum(
            1
            for c in self._by_entity.get(key, ())
            if c.usable and c not in exclude and c.queued < pending.max_queued
        )
        remote: list[tuple[str, int]] = []
        if not pending.inline and body is None:
            routes = await self._remote_routes(pending.entity, recheck=recheck)
            remote = [r for r in routes if r[0] not in tried]
        # Weighted by listener counts: local first with probability local / all.
        order: list[str | None] = []
        weights = [local, *(n for _, n in remote)]
        candidates: list[str | None] = [None, *(node for node, _ in remote)]
        local_last = False
        if local and (self._local_first or pending.remote_first):
            candidates.pop(0)
            weights.pop(0)
            if self._local_first:
                order.append(None)  # this node's listeners first, the rest weighted
            else:
                local_last = True  # answers_inline drew another node: they come first
        while candidates and sum(weights) > 0:
            (index,) = random.choices(range(len(candidates)), weights=weights)
            order.append(candidates.pop(index))
            weights.pop(index)
        if local_last:
            order.append(None)
        for node in order:
            if node is None:
                channel = await super().announce(pending, text_for, body, exclude)
            else:
                tried.add(node)
                channel = await self._tell(node, pending, text_for)
            if channel is not None:
                return channel
        return None

    async def _tell(
        self, node: str, pending: Pending, text_for: Callable[[str], str]
    ) -> RemoteChannel | None:
        """Offer ``pending`` to a listener on ``node``; the remote channel if it took it."""
        ref = secrets.token_hex(8)
        channel = RemoteChannel(node, ref, pending.entity, self._public_base().rstrip("/"))
        message = {
            "op": "offer",
            "ref": ref,
            "from": self.node_id,
            "entity": pending.entity,
            "text": text_for(channel.base_url),
            "max_queued": pending.max_queued,
            "ttl": _watch_seconds(pending),
        }
        answer = asyncio.get_running_loop().create_future()
        self._answers[ref] = answer
        previous = pending.channel
        self._untell(pending)
        self._drop_remote(previous)
        # Before the message goes out: the listener may dial us before A's answer arrives.
        pending.channel = channel
        self._told[channel] = {pending}
        self._remote[ref] = channel
        try:
            async with asyncio.timeout(OFFER_ANSWER_TIMEOUT):
                receivers = await self._link.publish(self._channel_of(node), json.dumps(message))
                if not receivers:  # nobody subscribed: the node is gone
                    self._unheard[node] = self._leases.get(node, 0.0)
                    raise LookupError(node)
                told = await answer == "told"
        except (TimeoutError, LookupError):  # no answer in time, or nobody there
            told = False
        except REDIS_FAILURES as exc:
            self.outage.report(exc)
            told = False
        finally:
            self._answers.pop(ref, None)
        if not told:
            self._untell(pending)
            self._drop_remote(channel)
            return None
        return channel

    # -- messages from other nodes ------------------------------------------------------------

    async def _follow_messages(self, subscribed: asyncio.Event) -> None:
        async def on_subscribed() -> None:
            subscribed.set()

        async def on_message(data: object) -> None:
            self._on_message(data)

        await follow_channel(
            self._link,
            self._channel_of(self.node_id),
            self.outage,
            on_subscribed=on_subscribed,
            on_message=on_message,
        )

    def _on_message(self, data: object) -> None:
        message: Any = None
        if isinstance(data, bytes | str) and len(data) <= MAX_MESSAGE_BYTES:
            with contextlib.suppress(ValueError):
                message = json.loads(data)
        if not isinstance(message, dict) or not isinstance(message.get("ref"), str):
            logger.warning("cluster: ignored a malformed message on the node channel")
            return
        op, ref = message.get("op"), message["ref"]
        if op in ("told", "none"):
            answer = self._answers.get(ref)
            if answer is not None and not answer.done():
                answer.set_result(op)
        elif op == "gone":
            channel = self._remote.pop(ref, None)
            if channel is not None:
                self.unregister(channel)  # what waits on it moves on, as for a local listener
        elif op == "offer":
            if self._serving >= MAX_SERVING_OFFERS:
                self._spawn(self._reply(message, "none"))
                return
            self._spawn(self._serve_offer(message))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._left:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, offer: dict[str, Any], op: str) -> None:
        node = offer.get("from")
        if not isinstance(node, str):
            return
        with contextlib.suppress(*REDIS_FAILURES):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._link.publish(
                    self._channel_of(node), json.dumps({"op": op, "ref": offer["ref"]})
                )

    async def _serve_offer(self, offer: dict[str, Any]) -> None:
        """Send another node's offer on one of our control channels; answer told/none."""
        text, entity = offer.get("text"), offer.get("entity")
        if not isinstance(text, str) or not isinstance(entity, str):
            await self._reply(offer, "none")
            return
        loop = asyncio.get_running_loop()

        def gone() -> None:
            # A drain closes control channels (1012) after what they were told went out: the
            # listener still dials the other node, which must not give its sender up.
            if self._advertising:
                self._spawn(self._reply(offer, "gone"))

        pending = _RemoteOffer(offer["ref"], entity, gone)
        max_queued = offer.get("max_queued")
        if isinstance(max_queued, int) and max_queued > 0:
            pending.max_queued = max_queued
        self._serving += 1
        try:
            channel = await LocalBroker.announce(self, pending, lambda base: text)
        finally:
            self._serving -= 1
        if channel is None:
            await self._reply(offer, "none")
            return
        ttl = offer.get("ttl")
        seconds = float(ttl) if isinstance(ttl, int | float) and 0 < ttl <= 3600 else 60.0
        # Watch the channel for the other node only while its sender may still wait.
        loop.call_later(seconds, self._untell, pending)
        await self._reply(offer, "told")

    # -- for tests and the runtime view -------------------------------------------------------

    @property
    def live_nodes(self) -> Sequence[str]:
        """The other nodes seen alive at the last renewal (and heard since)."""
        return sorted(node for node in self._leases if not self._is_dead(node))
