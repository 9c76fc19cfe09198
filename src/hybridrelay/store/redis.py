"""The cluster's management store: entities, SAS rules and keys in Redis, shared by every node.

Layout (every key below ``hybridrelay:{namespace}:``, the braces written out: they are a hash
tag, which keeps the keys in one hash slot of a Redis Cluster, as the transactions need):

* ``store``: a hash; field ``ns`` is the namespace record (tags and namespace rules) as JSON,
  field ``hc:{entity key}`` one hybrid connection with its rules;
* ``version``: a counter raised by every change;
* the pub/sub channel ``store-changes``: one message per change, ``{"field", "version",
  "origin"}``.

Each node keeps the whole :class:`NamespaceState` in memory, like the SQLite store, and the data
path reads only that (no Redis round trip per request). A change is written in one optimistic
transaction (``WATCH`` on the hash: two nodes changing the same rule never lose one of the two
writes), applied to the writing node's state before the call returns, and announced on the
channel; the other nodes read the one field it names. A message can be lost (the subscription
broke, Redis restarted), so every :data:`RECONCILE_INTERVAL` seconds each node compares the
counter with the last one it saw and reloads the whole hash when they differ.

Bounds: a regenerated key is refused, and a deleted entity's connections are closed, on every
node once its message arrives (milliseconds on a LAN), and at the latest
:data:`RECONCILE_INTERVAL` seconds after Redis is reachable again when the message was lost.

Keys are stored as the SQLite store stores them: protect Redis (a password, TLS with
``rediss://``, a private network). Nothing here logs a key or the Redis URL's password.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from redis.exceptions import WatchError

from hybridrelay.auth.sas import Rights
from hybridrelay.protocol.arm import new_key
from hybridrelay.store.base import EntityChange, NamespaceChange, Store, StoreUnavailableError
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
)
from hybridrelay.store.redis_address import (
    REDIS_FAILURES,
    REDIS_TIMEOUT,
    RedisLink,
    SubscriptionMoved,
    connect,
    describe,
    redacted_url,
)

__all__ = [
    "RECONCILE_INTERVAL",
    "REDIS_FAILURES",
    "REDIS_TIMEOUT",
    "OutageLog",
    "RedisStore",
    "open_redis",
    "raise_if_cancelled",
    "redacted_url",
]

logger = logging.getLogger("hybridrelay.store")

#: How often a node compares its state's version with Redis' (and reloads when they differ).
RECONCILE_INTERVAL = 5.0
#: Optimistic transactions retried this often when another node wrote the same hash.
_WRITE_ATTEMPTS = 20
_NS_FIELD = "ns"

T = TypeVar("T")


def open_redis(url: str) -> RedisLink:
    """A client for ``url`` (one server, Sentinel or Redis Cluster: store/redis_address.py),
    every call bounded by :data:`REDIS_TIMEOUT`."""
    try:
        return connect(url)
    except ValueError as exc:
        raise StoreUnavailableError(f"cluster: bad Redis address {exc}") from None


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that redis-py turned into a connection error (it catches the
    CancelledError of a command cut short): a background loop must end when it is cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


async def follow_channel(
    redis: RedisLink,
    channel: str,
    outage: OutageLog,
    *,
    on_subscribed: Callable[[], Awaitable[None]],
    on_message: Callable[[object], Awaitable[None]],
) -> None:
    """Hand the data of each message published on ``channel`` to ``on_message``, until
    cancelled. ``on_subscribed`` runs after each (re)subscription, within the same time bound;
    a broken subscription is reported to ``outage`` and made again after a backoff (0.1 s,
    doubling to 2 s), since a node must hear its peers again without a restart."""
    delay = 0.1
    while True:
        raise_if_cancelled()
        pubsub = redis.subscription()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                await pubsub.subscribe(channel)
                await on_subscribed()
            delay = 0.1
            while True:
                raise_if_cancelled()
                message = await pubsub.get_message(1.0)
                if message is not None:
                    await on_message(message.get("data"))
        except SubscriptionMoved as exc:  # Redis answers: not an outage
            logger.info("cluster: subscribing again (%s)", exc)
        except REDIS_FAILURES as exc:
            raise_if_cancelled()
            outage.report(exc)
        finally:
            await pubsub.aclose()
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


class OutageLog:
    """One WARNING line when Redis stops answering and one INFO line when it is back, however
    many calls fail in between. A relay's store and broker share one (one line per node).

    A partial outage fails some calls and not others (one Redis Cluster shard down until the
    cluster marks itself failed, a Sentinel failover's seconds): the recovery is logged only
    once :data:`QUIET` seconds have passed since the last failure, so that it does not flap."""

    #: Seconds without a failed call before Redis counts as back.
    QUIET = 2.0

    def __init__(self, url: str, what: str) -> None:
        self._url = redacted_url(url)
        self._what = what
        self._failed_at = float("-inf")
        self.reachable = True

    def report(self, exc: BaseException | None) -> None:
        """A call to Redis failed with ``exc``, or (None) succeeded."""
        now = time.monotonic()
        if exc is not None:
            self._failed_at = now
            if self.reachable:
                self.reachable = False
                logger.warning(
                    "%s: Redis at %s unreachable (%s); serving this node's listeners and what "
                    "is in memory until it is back",
                    self._what,
                    self._url,
                    type(exc).__name__,
                )
        elif not self.reachable and now - self._failed_at >= self.QUIET:
            self.reachable = True
            logger.info("%s: Redis at %s reachable again", self._what, self._url)


def _rule_json(rule: RuleRecord) -> dict[str, Any]:
    return {
        "name": rule.name,
        "primary": rule.primary_key,
        "secondary": rule.secondary_key,
        "rights": list(rule.rights.names()),
        "created": rule.created_at,
        "updated": rule.updated_at,
        "entity": rule.entity,
    }


def _rule(data: Mapping[str, Any]) -> RuleRecord:
    return RuleRecord(
        str(data["name"]),
        str(data["primary"]),
        str(data["secondary"]),
        Rights.parse(data["rights"]),
        float(data["created"]),
        float(data["updated"]),
        str(data.get("entity", "")),
    )


def _entity_text(record: HybridConnectionRecord) -> bytes:
    return json.dumps(
        {
            "name": record.name,
            "auth": record.requires_client_authorization,
            "created": record.created_at,
            "updated": record.updated_at,
            "metadata": record.user_metadata,
            "timeout": record.http_response_timeout,
            "rules": [_rule_json(rule) for rule in record.rules],
        }
    ).encode()


def _entity(text: bytes) -> HybridConnectionRecord:
    data = json.loads(text)
    return HybridConnectionRecord(
        name=str(data["name"]),
        requires_client_authorization=bool(data["auth"]),
        created_at=float(data["created"]),
        updated_at=float(data["updated"]),
        user_metadata=data.get("metadata"),
        http_response_timeout=data.get("timeout"),
        rules=tuple(_rule(rule) for rule in data.get("rules", ())),
    )


def _namespace_text(record: NamespaceRecord) -> bytes:
    return json.dumps(
        {
            "name": record.name,
            "created": record.created_at,
            "updated": record.updated_at,
            "tags": dict(record.tags),
            "rules": [_rule_json(rule) for rule in record.rules],
        }
    ).encode()


def _namespace(text: bytes) -> NamespaceRecord:
    data = json.loads(text)
    return NamespaceRecord(
        str(data["name"]),
        float(data["created"]),
        float(data["updated"]),
        MappingProxyType({str(k): str(v) for k, v in data.get("tags", {}).items()}),
        tuple(_rule(rule) for rule in data.get("rules", ())),
    )


def _field(key: str) -> str:
    return f"hc:{key}"


class RedisStore(Store):
    """The management store in Redis. Open it with :meth:`open`; see the module docstring."""

    def __init__(
        self,
        url: str,
        link: RedisLink,
        namespace: str,
        state: NamespaceState,
        version: int,
        *,
        clock: Callable[[], float],
        max_hybrid_connections: int,
        reconcile_interval: float,
    ) -> None:
        super().__init__(state, clock=clock, max_hybrid_connections=max_hybrid_connections)
        self._url = redacted_url(url)
        self._link = link
        self._redis = link.client
        self._prefix = _prefix(namespace)
        self._hash = self._prefix + "store"
        self._version_key = self._prefix + "version"
        self._channel = self._prefix + "store-changes"
        #: The Redis counter this node's state reflects (compared by the reconciliation).
        self._seen_version = version
        self._reconcile_interval = reconcile_interval
        self._origin = uuid.uuid4().hex
        self._tasks: list[asyncio.Task[None]] = []
        #: One log line per outage (the relay's cluster broker shares it).
        self.outage = OutageLog(url, "cluster")

    def __repr__(self) -> str:
        return f"<RedisStore {self._url!r} version={self._state.version}>"

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        namespace: str,
        initial_rules: Sequence[tuple[str, Rights]] = (),
        clock: Callable[[], float] = time.time,
        max_hybrid_connections: int = 10_000,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> RedisStore:
        """Connect to ``url`` and load the namespace (created with ``initial_rules`` and fresh
        keys if Redis does not hold it yet)."""
        link = open_redis(url)
        client, prefix = link.client, _prefix(namespace)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                now = clock()
                fresh = NamespaceRecord(
                    namespace,
                    now,
                    now,
                    rules=tuple(
                        RuleRecord(name, new_key(), new_key(), rights, now, now)
                        for name, rights in initial_rules
                    ),
                )
                await link.check_supported()
                await client.hsetnx(prefix + "store", _NS_FIELD, _namespace_text(fresh))
                version, raw = await _load_raw(client, prefix)
        except REDIS_FAILURES as exc:
            await link.aclose()
            raise StoreUnavailableError(
                f"cluster: cannot reach Redis at {redacted_url(url)}: {describe(exc)}"
            ) from exc
        except ValueError as exc:
            await link.aclose()
            raise StoreUnavailableError(f"cluster: {exc}") from None
        store = cls(
            url,
            link,
            namespace,
            _state_of(raw, namespace, 0),
            version,
            clock=clock,
            max_hybrid_connections=max_hybrid_connections,
            reconcile_interval=reconcile_interval,
        )
        store._start()
        return store

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._follow_changes()),
            loop.create_task(self._reconcile_loop()),
        ]

    # -- reading --------------------------------------------------------------------------------

    async def check(self) -> None:
        # A read of the store's own key, not a PING: on a Redis Cluster, PING is answered by
        # any shard, while the store's is the one that matters (and a failed cluster refuses
        # key commands).
        await self._call(self._redis.get(self._version_key))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._link.aclose()

    # -- the two steps of a change: one optimistic transaction each ----------------------------

    async def _change_namespace(self, change: NamespaceChange) -> NamespaceRecord:
        def text(raw: bytes | None) -> bytes | None:
            old = _namespace(raw) if raw is not None else self._state.namespace
            return _namespace_text(change(old))

        raw = await self._transaction(_NS_FIELD, text)
        assert raw is not None
        record = _namespace(raw)
        self._apply(_NS_FIELD, raw)
        return record

    async def _change_entity(self, key: str, change: EntityChange) -> HybridConnectionRecord | None:
        def text(raw: bytes | None) -> bytes | None:
            record = change(_entity(raw) if raw is not None else None)
            return None if record is None else _entity_text(record)

        field = _field(key)
        raw = await self._transaction(field, text)
        self._apply(field, raw)
        return None if raw is None else _entity(raw)

    async def _transaction(
        self, field: str, new_text: Callable[[bytes | None], bytes | None]
    ) -> bytes | None:
        """Replace ``field`` with ``new_text(current)`` (None deletes it) in one optimistic
        transaction that also raises the version and announces the change; the text written.
        ``new_text`` may raise a :class:`StoreError` (nothing is written)."""

        async def attempt() -> bytes | None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(_WRITE_ATTEMPTS):
                    try:
                        await pipe.watch(self._hash)
                        current = _bytes(await pipe.hget(self._hash, field))
                        text = new_text(current)
                        pipe.multi()
                        if text is None:
                            pipe.hdel(self._hash, field)
                        else:
                            pipe.hset(self._hash, field, text)
                        pipe.incr(self._version_key)
                        results = await pipe.execute()
                    except WatchError:
                        continue
                    version = int(results[1])
                    self._seen_version = max(self._seen_version, version)
                    message = {"field": field, "version": version, "origin": self._origin}
                    await self._link.publish(self._channel, json.dumps(message))
                    return text
            raise StoreUnavailableError("cluster: the store is too busy (write conflicts)")

        return await self._call(attempt())

    async def _call(self, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(REDIS_TIMEOUT * 2):
                return await work
        except REDIS_FAILURES as exc:
            raise StoreUnavailableError(
                f"cluster: Redis at {self._url} failed: {describe(exc)}"
            ) from exc

    # -- following the other nodes ----------------------------------------------------------------

    def _apply(self, field: str, raw: bytes | None) -> None:
        """Put ``field``'s current text (None: deleted) into the state and tell subscribers."""
        old = self._state
        if field == _NS_FIELD:
            if raw is None:
                return
            namespace = _namespace(raw)
            if namespace == old.namespace:
                return
            self._publish(NamespaceState(namespace, old.hybrid_connections, old.version + 1))
            return
        key = field.removeprefix("hc:")
        entities = dict(old.hybrid_connections)
        if raw is None:
            if entities.pop(key, None) is None:
                return
        else:
            record = _entity(raw)
            if entities.get(key) == record:
                return
            entities[key] = record
        self._publish(NamespaceState(old.namespace, MappingProxyType(entities), old.version + 1))

    async def _reload(self) -> None:
        """Read the whole hash and replace the state if it differs."""
        async with asyncio.timeout(REDIS_TIMEOUT * 2):
            version, raw = await _load_raw(self._redis, self._prefix)
        fresh = _state_of(raw, self._state.namespace.name, self._state.version + 1)
        self._seen_version = version
        if (
            fresh.namespace != self._state.namespace
            or fresh.hybrid_connections != self._state.hybrid_connections
        ):
            self._publish(fresh)

    async def _reconcile_loop(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(self._reconcile_interval)
            try:
                async with asyncio.timeout(REDIS_TIMEOUT * 2):
                    raw = await self._redis.get(self._version_key)
                if int(raw or 0) != self._seen_version:
                    await self._reload()
                self.outage.report(None)
            except REDIS_FAILURES as exc:
                raise_if_cancelled()
                self.outage.report(exc)

    async def _follow_changes(self) -> None:
        """Apply the other nodes' changes as their messages come; on a broken subscription,
        subscribe again (with backoff) and reload, since messages were lost meanwhile."""

        async def subscribed() -> None:
            await self._reload()
            self.outage.report(None)

        await follow_channel(
            self._link,
            self._channel,
            self.outage,
            on_subscribed=subscribed,
            on_message=self._on_message,
        )

    async def _on_message(self, data: object) -> None:
        try:
            message = json.loads(data) if isinstance(data, bytes | str) else None
            field = str(message["field"]) if isinstance(message, dict) else None
        except (ValueError, KeyError):
            field = None
        if field is None or not (field == _NS_FIELD or field.startswith("hc:")):
            logger.warning("cluster store: ignored a malformed change message")
            return
        assert isinstance(message, dict)
        if message.get("origin") == self._origin:
            return  # applied when it was written
        async with asyncio.timeout(REDIS_TIMEOUT * 2):
            raw = _bytes(await self._redis.hget(self._hash, field))
        self._seen_version = max(self._seen_version, int(message.get("version", 0)))
        self._apply(field, raw)


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _prefix(namespace: str) -> str:
    """The store's keys' prefix: the hash tag ``{namespace}`` keeps them in one hash slot of a
    Redis Cluster, as its transactions need (a plain Redis ignores the braces)."""
    return f"hybridrelay:{{{namespace}}}:"


async def _load_raw(client: Any, prefix: str) -> tuple[int, dict[bytes, bytes]]:
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(prefix + "version")
        pipe.hgetall(prefix + "store")
        version, raw = await pipe.execute()
    return int(version or 0), dict(raw)


def _state_of(raw: Mapping[bytes, bytes], namespace: str, version: int) -> NamespaceState:
    text = raw.get(_NS_FIELD.encode())
    now = time.time()
    record = _namespace(text) if text is not None else NamespaceRecord(namespace, now, now)
    entities = {
        name.decode().removeprefix("hc:"): _entity(value)
        for name, value in raw.items()
        if name.startswith(b"hc:")
    }
    return NamespaceState(record, MappingProxyType(entities), version)
