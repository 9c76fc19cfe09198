"""How a cluster node reaches Redis: the address forms of ``store.cluster`` and a client for each.

* ``redis://``, ``rediss://`` (TLS), ``unix://``: one Redis server, read by redis-py's own URL
  parser.
* ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?options]``, and
  ``rediss+sentinel://`` (TLS to the sentinels and to the master): the master of ``service``
  as Redis Sentinel names it, through redis-py's :class:`~redis.asyncio.sentinel.Sentinel`.
  Each new connection asks the sentinels for the current master, so a failover is followed
  without a restart. The user and password are the master's; the sentinels' own, if they have
  one, are the options ``sentinel_username`` / ``sentinel_password``.
* ``redis+cluster://[[user]:password@]host:port[,host:port...][?options]``, and
  ``rediss+cluster://``: a Redis Cluster through redis-py's
  :class:`~redis.asyncio.cluster.RedisCluster` (the hosts are the startup nodes; the rest of
  the cluster is discovered). Pub/sub is sharded (``SSUBSCRIBE`` / ``SPUBLISH``, Redis 7+), so
  a node channel's messages go to one shard, not to every node of the Redis Cluster.

Every other option in the query string is redis-py's (``ssl_ca_certs``, ``socket_timeout``,
...), parsed by redis-py's ``parse_url``: there is one parser of those, redis-py's. The forms
follow what other clients read (the Sentinel form is the ``redis+sentinel`` URL of Python's
redis-sentinel-url and, with ``-``, Lettuce's ``redis-sentinel``), so that an operator can
paste the address they already have.

The callers use :class:`RedisLink`: ``client`` for commands (both client classes take the same
calls), :meth:`RedisLink.publish` and :meth:`RedisLink.subscription`, which pick sharded pub/sub
on a Redis Cluster. Keys that one transaction touches must share a hash slot there: the store's
keys carry the hash tag ``{namespace}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "MAX_CONNECTIONS",
    "REDIS_FAILURES",
    "REDIS_TIMEOUT",
    "RedisAddress",
    "RedisLink",
    "SubscriptionMoved",
    "connect",
    "describe",
    "parse_address",
    "redacted_url",
]

#: Every Redis call of the store and the broker is bounded by this (connect and each command).
REDIS_TIMEOUT = 3.0
#: Connections to Redis per client (the store's and the broker's, per node; per shard on a
#: Redis Cluster).
MAX_CONNECTIONS = 32

#: What a call to Redis raises when Redis is not there or not answering: redis-py's errors (its
#: cluster client raises some that are not RedisError, such as a slot no shard covers), socket
#: errors and timeouts.
REDIS_FAILURES: tuple[type[Exception], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    TimeoutError,
)

Kind = Literal["server", "sentinel", "cluster"]
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "unix": ("server", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
#: Options of the Sentinel form that are not redis-py connection options.
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_FORMS = (
    "redis://, rediss://, unix://, redis+sentinel://host:port[,host:port]/service[/db], "
    "redis+cluster://host:port[,host:port] (rediss+...: TLS)"
)


def describe(exc: BaseException) -> str:
    """A short account of a Redis failure for one error line (no password: redis-py's own
    texts redact theirs)."""
    # redis-py's MasterNotFoundError appends the repr of every sentinel's client after " : <".
    text = str(exc).partition(" : <")[0]
    if not text:
        return "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def redacted_url(url: str) -> str:
    """``url`` without its passwords (the user info's and any ``*password`` option's), for
    logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, mark, query = rest.partition("?")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.partition(":")[0]
        rest = f"{user + ':' if user else ''}***@{host}"
    if mark:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if "password" in k.lower() else v) for k, v in pairs], safe="/*"
        )
    return f"{scheme}://{rest}{mark}{query}"


@dataclass(frozen=True)
class RedisAddress:
    """A parsed ``store.cluster`` address; ``repr`` and ``redacted`` carry no password."""

    kind: Kind
    redacted: str
    #: Sentinels or startup nodes (empty for one server: ``options`` names it).
    hosts: tuple[tuple[str, int], ...] = ()
    #: The Sentinel service (the master's name).
    service: str = ""
    #: redis-py connection options (password, db, TLS ...), as its ``parse_url`` gives them.
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: Connection options for the sentinels themselves.
    sentinel_options: Mapping[str, Any] = field(default_factory=dict, repr=False)


def parse_address(url: str) -> RedisAddress:
    """Read ``url`` (see the module docstring); ValueError names what is wrong (not the
    password)."""
    redacted = redacted_url(url)
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise ValueError(f"{redacted}: the address must be one of {_FORMS}")
    kind, tls = _SCHEMES[scheme]
    if kind == "server":
        return RedisAddress(kind, redacted, options=_redis_options(url, redacted))
    parts = urlsplit(url)
    credentials, _, hostlist = parts.netloc.rpartition("@")
    hosts = tuple(_host_port(item, redacted, kind) for item in hostlist.split(",") if item)
    if not hosts:
        raise ValueError(f"{redacted}: name at least one host:port")
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in _SENTINEL_OPTIONS}
    if own and kind != "sentinel":
        raise ValueError(f"{redacted}: {', '.join(own)} is for redis+sentinel:// only")
    segments = [s for s in parts.path.split("/") if s]
    service, db = "", ""
    if kind == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError(f"{redacted}: the path must be /service or /service/db")
        service, db = segments[0], segments[1] if len(segments) > 1 else ""
    elif segments:
        raise ValueError(f"{redacted}: a Redis Cluster has one database (no /db in the path)")
    # redis-py reads the rest (credentials, db, options) from the equivalent one-server URL.
    rest = urlencode([(k, v) for k, v in query if k not in _SENTINEL_OPTIONS])
    userinfo = f"{credentials}@" if credentials else ""
    equivalent = f"{'rediss' if tls else 'redis'}://{userinfo}{hostlist.split(',')[0]}/{db}"
    options = _redis_options(f"{equivalent}?{rest}" if rest else equivalent, redacted)
    for key in ("host", "port"):
        options.pop(key, None)
    if kind == "cluster" and options.get("db"):
        raise ValueError(f"{redacted}: a Redis Cluster has only database 0")
    sentinel_options: dict[str, Any] = {
        key.removeprefix("sentinel_"): value for key, value in own.items() if value
    }
    if tls:  # the sentinels speak TLS too, with the same trust
        sentinel_options.update(
            {k: v for k, v in options.items() if k.startswith("ssl_")}, ssl=True
        )
    return RedisAddress(kind, redacted, hosts, service, options, sentinel_options)


def _redis_options(url: str, redacted: str) -> dict[str, Any]:
    try:
        options: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise ValueError(f"{redacted}: {exc}") from None
    return options


def _host_port(item: str, redacted: str, kind: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or item.endswith("]"):  # no port (an IPv6 address in brackets has colons)
        host, port = item, "26379" if kind == "sentinel" else "6379"
    host = host.strip("[]")  # [::1]:26379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{redacted}: {item!r} is not host:port")
    return host, int(port)


#: The redis-py the Redis Cluster form was tested with: it needs the asyncio cluster client's
#: WATCH transactions and sharded pub/sub, which older releases were not checked for.
_CLUSTER_REDIS_PY = (8, 1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


#: How often a sharded subscription checks that it still receives its channel (seconds).
PROBE_INTERVAL = 5.0
#: The start of a probe message's data (every subscriber drops them).
_PROBE = b"hybridrelay-probe:"


class SubscriptionMoved(RedisError):
    """A sharded subscription stopped receiving its channel: the channel's slot moved to
    another shard (a resharding), and redis-py's subscription stayed on the old one."""


class Subscription:
    """One pub/sub subscription: classic, or sharded on a Redis Cluster.

    A sharded one checks every :data:`PROBE_INTERVAL` seconds that it still hears its
    channel, by publishing a probe to it: when the channel's slot moves to another shard,
    redis-py's subscription stays on the old shard and hears nothing more, without an error
    (measured with redis-py 8.1 and Redis 7.0), until :class:`SubscriptionMoved` makes the
    caller subscribe again. Cost: one ``SPUBLISH`` per interval per subscription."""

    def __init__(self, client: Any, sharded: bool) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._sharded = sharded
        self._channel = ""
        self._probe = _PROBE + secrets.token_hex(8).encode()
        self._probe_due = 0.0
        self._probe_heard = True

    async def subscribe(self, channel: str) -> None:
        self._channel = channel
        if self._sharded:
            # The channel's shard is found in the slot map, which only a command loads.
            await self._client.initialize()
            await self._pubsub.ssubscribe(channel)
            self._probe_due = asyncio.get_running_loop().time() + PROBE_INTERVAL
        else:
            await self._pubsub.subscribe(channel)

    async def get_message(self, wait: float) -> dict[str, Any] | None:
        """The next published message, or None after ``wait`` seconds."""
        if not self._sharded:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            return message if isinstance(message, dict) else None
        await self._probe_if_due()
        message = await self._pubsub.get_sharded_message(
            ignore_subscribe_messages=True, timeout=wait
        )
        if not isinstance(message, dict):
            return None
        data = message.get("data")
        if isinstance(data, bytes) and data.startswith(_PROBE):
            self._probe_heard = self._probe_heard or data == self._probe
            return None
        return message

    async def _probe_if_due(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._probe_due:
            return
        if not self._probe_heard or not self._pubsub.node_pubsub_mapping:
            raise SubscriptionMoved(f"the subscription to {self._channel} hears nothing")
        self._probe_due, self._probe_heard = now + PROBE_INTERVAL, False
        await self._client.spublish(self._channel, self._probe)

    async def aclose(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES, RuntimeError):
            await self._pubsub.aclose()


class RedisLink:
    """A client of the Redis at one address, for one role (a node's store or its broker)."""

    def __init__(
        self, address: RedisAddress, client: Any, *, sharded: bool, closers: Sequence[Any] = ()
    ) -> None:
        self.address = address
        #: redis-py's client: ``redis.asyncio.Redis``, or ``RedisCluster`` (the same calls).
        self.client: Any = client
        self._sharded = sharded
        #: What else :meth:`aclose` closes (the Sentinel client's connections to sentinels).
        self._closers = tuple(closers)

    def __repr__(self) -> str:
        return f"<RedisLink {self.address.redacted!r}>"

    async def check_supported(self) -> None:
        """ValueError if this Redis cannot carry cluster mode: a Redis Cluster needs Redis 7.0
        or later on every shard (sharded pub/sub)."""
        if not self._sharded:
            return
        infos = await self.client.info("server", target_nodes=RedisCluster.PRIMARIES)
        for node, info in infos.items():
            version = str(info.get("redis_version", "0"))
            if _version(version) < (7, 0):
                raise ValueError(
                    f"{self.address.redacted}: shard {node} runs Redis {version}; a Redis "
                    "Cluster needs 7.0 or later (sharded pub/sub, SSUBSCRIBE)"
                )

    async def publish(self, channel: str, message: str) -> int:
        """Publish; how many subscribers received it (on its shard, on a Redis Cluster)."""
        if self._sharded:
            return int(await self.client.spublish(channel, message))
        return int(await self.client.publish(channel, message))

    def subscription(self) -> Subscription:
        return Subscription(self.client, self._sharded)

    async def aclose(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES):
            await self.client.aclose()
        for closer in self._closers:
            with contextlib.suppress(*REDIS_FAILURES):
                await closer.aclose()


class _BlockingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The master's connections, found through the sentinels, in a bounded pool that makes a
    burst wait for a free connection (as for one server)."""


class _GatedCluster(RedisCluster):
    """A RedisCluster whose commands wait for one of :data:`MAX_CONNECTIONS` turns: its
    per-shard pools raise at their bound instead of waiting, unlike the blocking pool used for
    one server, and a burst must wait (within the caller's time bound), not fail."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._turns = asyncio.Semaphore(MAX_CONNECTIONS)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._turns:
            return await super().execute_command(*args, **kwargs)


def _common_options() -> dict[str, Any]:
    return {
        "socket_timeout": REDIS_TIMEOUT,
        "socket_connect_timeout": REDIS_TIMEOUT,
        "decode_responses": False,
        # A pooled connection made before Redis restarted (or failed over) fails on first
        # use: one quick retry on a fresh connection, so that it is not reported twice.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": 15,
    }


def connect(url: str) -> RedisLink:
    """A client for ``url`` (any form of the module docstring), every call bounded by
    :data:`REDIS_TIMEOUT`; ValueError for an address that cannot be used. No connection is
    made yet."""
    address = parse_address(url)
    common = _common_options()
    if address.kind == "server":
        pool = aioredis.BlockingConnectionPool(
            **{**address.options, **common},
            max_connections=MAX_CONNECTIONS,
            timeout=REDIS_TIMEOUT,
        )
        return RedisLink(address, aioredis.Redis.from_pool(pool), sharded=False)
    options = dict(address.options)
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    if address.kind == "sentinel":
        sentinel_options = {
            "socket_timeout": REDIS_TIMEOUT,
            "socket_connect_timeout": REDIS_TIMEOUT,
            # The next sentinel is asked at once: redis-py's default retry waits seconds on
            # each unreachable one.
            "retry": Retry(NoBackoff(), 0),
            **address.sentinel_options,
        }
        # redis-py 8.2 typed Sentinel's constructor; the versions before it did not.
        sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            list(address.hosts), sentinel_kwargs=sentinel_options
        )
        client = sentinel.master_for(
            address.service,
            connection_pool_class=_BlockingSentinelPool,
            **{**options, **common},
            max_connections=MAX_CONNECTIONS,
            timeout=REDIS_TIMEOUT,
        )
        return RedisLink(address, client, sharded=False, closers=[sentinel])
    if _version(redis.__version__) < _CLUSTER_REDIS_PY:
        raise ValueError(
            f"{address.redacted}: the Redis Cluster form needs redis-py "
            f"{'.'.join(map(str, _CLUSTER_REDIS_PY))} or later (tested with it: its asyncio "
            f"cluster client's transactions and sharded pub/sub); installed: {redis.__version__}"
        )
    cluster = _GatedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.hosts],
        **{**options, **common},
        # The gate holds commands to MAX_CONNECTIONS; pipelines and the subscriptions take
        # a few more connections of a shard.
        max_connections=MAX_CONNECTIONS + 8,
    )
    return RedisLink(address, cluster, sharded=True)
