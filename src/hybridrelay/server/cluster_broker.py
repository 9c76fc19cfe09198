"""The cluster broker: senders on this node reach listeners connected to any node, through Redis.

A :class:`LocalBroker` for the listeners of this process, plus:

* **Registrations.** For each entity with listeners here, the hash ``routes:{entity}`` holds
  ``{node id: local listener count}`` and the set ``node:{id}:entities`` names the entities, so
  a dead node's entries can be removed. Both are written when the count changes (coalesced), not
  per idle period: an idle listener costs no Redis operation after its registration.
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
* **Redis outage.** Listeners and senders on this node keep being paired; remote listeners are
  not reachable; the registrations are written again when Redis is back. One log line for the
  outage and one for the recovery (the store's, when the relay has a Redis store: one per node).

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

from redis.exceptions import RedisError

from hybridrelay.server.broker import (
    Connection,
    LocalBroker,
    Outcome,
    Pending,
    PendingRendezvous,
)
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import LimitsConfig
from hybridrelay.store.records import entity_key
from hybridrelay.store.redis import (
    REDIS_TIMEOUT,
    OutageLog,
    follow_channel,
    open_redis,
    raise_if_cancelled,
)
from hybridrelay.transport.base import MessageSocket

__all__ = ["DEFAULT_LEASE", "ROUTE_CACHE_TTL", "ClusterBroker", "RemoteChannel"]

logger = logging.getLogger("hybridrelay.cluster")

#: A node that has not renewed for this long is dead (seconds).
DEFAULT_LEASE = 3.0
#: How long a node reuses what it read of an entity's listeners on other nodes.
ROUTE_CACHE_TTL = 1.0
#: How long B waits for A's ``told``/``none`` before trying elsewhere.
OFFER_ANSWER_TIMEOUT = 2.0
#: A node channel message longer than this is dropped (headers are bounded far below it).
MAX_MESSAGE_BYTES = 256 * 1024
#: How long the node that told a listener watches its control channel for the sender's node
#: (a sender waits for its rendezvous far less; an HTTP request's listener dials at once).
_WATCH_SECONDS = 120.0
#: Offers from other nodes being sent on this node's control channels at once; more: ``none``.
MAX_SERVING_OFFERS = 10_000


class RemoteChannel(ControlChannel):
    """A listener on another node, as the sender's node sees it once that node took an offer.

    It is never sent on (offers go through Redis); ``closed`` resolves when the other node says
    the control channel it used went away, and ``base_url`` is this node's own rendezvous base.
    """

    def __init__(self, node: str, ref: str, entity: str, base_url: str) -> None:
        # No socket: a RemoteChannel is only a broker's bookkeeping (never in ``channels()``).
        super().__init__(entity, f"node:{node}", cast(MessageSocket, None), 0.0, node, base_url)
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


class ClusterBroker(LocalBroker):
    """The broker of a cluster node; see the module docstring. :meth:`start` joins, once the
    relay knows its own address; :meth:`aclose` leaves (its routes removed at once)."""

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        public_base: Callable[[], str],
        lease: float = DEFAULT_LEASE,
        shuffle: Callable[[list[ControlChannel]], None] = random.shuffle,
        local_first: bool = False,
    ) -> None:
        super().__init__(shuffle=shuffle)
        #: ``store.spread: local-first``: a sender goes to this node's listeners whenever one
        #: can take it; other nodes' only when none can (see :meth:`announce`).
        self._local_first = local_first
        self._url = url
        self._public_base = public_base
        self._lease = lease
        self.node_id = secrets.token_hex(6)
        self._prefix = f"hybridrelay:{namespace}:"
        self._nodes_key = self._prefix + "nodes"
        self._redis = open_redis(url)
        self.outage = OutageLog(url, "cluster")
        #: Nodes whose lease had not run out at the last renewal (this one excluded).
        self._live: set[str] = set()
        #: Nodes not routed to: their lease had run out at the last renewal, or an offer
        #: published to them since reached nobody. A node that joined since the last renewal
        #: is in neither set and is routed to (a restarted worker is reachable at once).
        self._unroutable: set[str] = set()
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
        return f"{self._prefix}node:{node}"

    def _routes_key(self, key: str) -> str:
        return f"{self._prefix}routes:{key}"

    def _entities_key(self, node: str) -> str:
        return f"{self._prefix}node:{node}:entities"

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
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._remove_node(self.node_id)
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()

    # -- registrations ------------------------------------------------------------------------

    def register(self, channel: ControlChannel, limit: int) -> bool:
        if not super().register(channel, limit):
            return False
        self._changed(channel.entity)
        return True

    def unregister(self, channel: ControlChannel) -> None:
        super().unregister(channel)
        if not isinstance(channel, RemoteChannel):
            self._changed(channel.entity)

    def stop_advertising(self) -> None:
        """The relay drains: remove this node's listeners from the routes now (other nodes
        stop offering senders here at once, not when the listeners are gone)."""
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
            try:
                async with asyncio.timeout(REDIS_TIMEOUT * 2):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key in dirty:
                            count = self.listener_count(key) if self._advertising else 0
                            if count:
                                pipe.hset(self._routes_key(key), self.node_id, str(count))
                                pipe.sadd(self._entities_key(self.node_id), key)
                            else:
                                pipe.hdel(self._routes_key(key), self.node_id)
                                pipe.srem(self._entities_key(self.node_id), key)
                        await pipe.execute()
                self.outage.report(None)
            except (RedisError, OSError, TimeoutError) as exc:
                raise_if_cancelled()
                self.outage.report(exc)
                self._dirty |= dirty
                await asyncio.sleep(self._lease / 3)
                self._flush_wanted.set()

    async def _renew_loop(self) -> None:
        while True:
            raise_if_cancelled()
            try:
                await self._renew()
                self.outage.report(None)
            except (RedisError, OSError, TimeoutError) as exc:
                raise_if_cancelled()
                self.outage.report(exc)
            await asyncio.sleep(self._lease / 3)

    async def _renew(self) -> None:
        now = time.time()
        async with asyncio.timeout(REDIS_TIMEOUT * 2):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._nodes_key, {self.node_id: now + self._lease})
                pipe.zrange(self._nodes_key, 0, -1, withscores=True)
                added, members = await pipe.execute()
        if added:  # we were not there: Redis lost its data, or took us for dead
            self._dirty |= set(self._by_entity)
            self._flush_wanted.set()
        live: set[str] = set()
        dead: list[str] = []
        for member, score in members:
            node = member.decode() if isinstance(member, bytes) else str(member)
            if node == self.node_id:
                continue
            if float(score) > now:
                live.add(node)
            else:
                dead.append(node)
        self._live = live
        self._unroutable = set(dead)
        self._renewed.set()
        for node in dead[:10]:  # a few per renewal: a mass failure is cleaned up over seconds
            logger.info("cluster: node %s missed its lease; its listeners are not routed to", node)
            await self._remove_node(node)

    async def _remove_node(self, node: str) -> None:
        entities = await self._redis.smembers(self._entities_key(node))
        async with self._redis.pipeline(transaction=False) as pipe:
            for raw in entities:
                key = raw.decode() if isinstance(raw, bytes) else str(raw)
                pipe.hdel(self._routes_key(key), node)
            pipe.delete(self._entities_key(node))
            pipe.zrem(self._nodes_key, node)
            await pipe.execute()

    async def _remote_routes(self, entity: str) -> list[tuple[str, int]]:
        """The other live nodes with listeners of ``entity`` and how many (cached briefly)."""
        if self._left:
            return []
        key = entity_key(entity)
        now = time.monotonic()
        cached = self._routes.get(key)
        if cached is None or now - cached[0] > ROUTE_CACHE_TTL:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    raw = await self._redis.hgetall(self._routes_key(key))
            except (RedisError, OSError, TimeoutError) as exc:
                raise_if_cancelled()
                self.outage.report(exc)
                raw = {}
            routes = []
            for node, count in raw.items():
                name = node.decode() if isinstance(node, bytes) else str(node)
                with contextlib.suppress(ValueError):
                    routes.append((name, int(count)))
            if len(self._routes) > 10_000:
                self._routes.clear()
            cached = self._routes[key] = (now, routes)
        return [(node, n) for node, n in cached[1] if n > 0 and self._routable(node)]

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
        return sum(n for node, n in cached[1] if n > 0 and self._routable(node))

    def _routable(self, node: str) -> bool:
        return node != self.node_id and node not in self._unroutable

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
        key = pending.entity.lower()
        local = sum(
            1
            for c in self._by_entity.get(key, ())
            if c.usable and c not in exclude and c.queued < pending.max_queued
        )
        remote: list[tuple[str, int]] = []
        if not pending.inline and body is None:
            tried = {c.node for c in exclude if isinstance(c, RemoteChannel)}
            remote = [r for r in await self._remote_routes(pending.entity) if r[0] not in tried]
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
            "ttl": _WATCH_SECONDS,
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
                receivers = await self._redis.publish(self._channel_of(node), json.dumps(message))
                if not receivers:  # nobody subscribed: the node is gone
                    self._live.discard(node)
                    self._unroutable.add(node)
                    raise LookupError(node)
                told = await answer == "told"
        except (RedisError, OSError) as exc:
            self.outage.report(exc)
            told = False
        except (TimeoutError, LookupError):  # no answer in time, or nobody there
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
            self._redis,
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
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._redis.publish(
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
        """The other nodes seen alive at the last renewal."""
        return sorted(self._live)
