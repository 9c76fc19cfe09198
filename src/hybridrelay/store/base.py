"""The management store's interface: what the relay and its management API need of it.

The embedded implementation is SQLite (:mod:`hybridrelay.store.sqlite`); the cluster mode's is
Redis (:mod:`hybridrelay.store.redis`). Reads on the data path never touch the backing service:
the store keeps the current :class:`~hybridrelay.store.records.NamespaceState` in memory
(``state``) and tells its subscribers when it changes, so the relay swaps one immutable value
per change. Every change, and what it makes of the records (defaults, quotas, new keys), is
written here once for both (:class:`Store`, :func:`put_hybrid_connection_record` and the rule
helpers); each store only reads and keeps one record at a time, its own way.

The store holds what the management API created. What the configuration file names is not in
it: the relay lays the file's entities and rules over the store's, and the file wins where both
name the same thing (README, "Operating the relay").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Literal

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import RelayError
from hybridrelay.protocol.arm import new_key
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
    entity_key,
)

__all__ = [
    "KEEP",
    "MAX_RULES_PER_SCOPE",
    "EntityChange",
    "KeySlot",
    "NamespaceChange",
    "NotFoundError",
    "Store",
    "StoreError",
    "StoreQuotaError",
    "StoreUnavailableError",
    "Subscriber",
    "find_rule",
    "put_hybrid_connection_record",
    "put_rule_record",
    "regenerated_rule",
    "swap_rule",
]

logger = logging.getLogger("hybridrelay.store")

KeySlot = Literal["primary", "secondary"]
Subscriber = Callable[[NamespaceState], None]
#: What a change makes of the namespace's record, and of a hybrid connection's (None: none).
NamespaceChange = Callable[[NamespaceRecord], NamespaceRecord]
EntityChange = Callable[[HybridConnectionRecord | None], HybridConnectionRecord | None]
#: Keep the absent value of an optional field on update (``None`` is a value: "unset").
KEEP: object = object()
#: Azure's bound: 12 SAS rules on a namespace and 12 on each hybrid connection.
MAX_RULES_PER_SCOPE = 12


class StoreError(RelayError):
    """A management store operation failed."""


class NotFoundError(StoreError):
    """The hybrid connection or rule does not exist."""


class StoreQuotaError(StoreError):
    """A bound of the store was reached (rules per scope, hybrid connections)."""


class StoreUnavailableError(StoreError):
    """The store's backing service cannot be reached or its file cannot be written."""


class Store:
    """The management store: the current state in memory, the subscribers told of each new
    one, and every change, made by the two steps each backing store writes its own way
    (:meth:`_change_namespace`, :meth:`_change_entity`: read the record, change it, keep the
    result and publish the new state) and the record helpers below."""

    def __init__(
        self,
        state: NamespaceState,
        *,
        clock: Callable[[], float],
        max_hybrid_connections: int,
    ) -> None:
        self._state = state
        self._subscribers: list[Subscriber] = []
        self._clock = clock
        self._max_hybrid_connections = max_hybrid_connections

    @property
    def state(self) -> NamespaceState:
        """The current state, from memory."""
        return self._state

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(state)`` after every change; returns the way to unsubscribe."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    async def check(self) -> None:
        """Raise :class:`StoreUnavailableError` if the store cannot serve (``/readyz``)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def put_hybrid_connection(
        self,
        name: str,
        *,
        requires_client_authorization: bool | None = None,
        user_metadata: str | None | object = KEEP,
        http_response_timeout: float | None | object = KEEP,
    ) -> tuple[HybridConnectionRecord, bool]:
        """Create (with defaults for what is not given) or update (keeping what is not given);
        returns the record and whether it was created."""
        now = self._clock()
        created = False

        def change(old: HybridConnectionRecord | None) -> HybridConnectionRecord:
            nonlocal created
            created = old is None
            return put_hybrid_connection_record(
                old,
                name,
                now,
                count=len(self._state.hybrid_connections),
                limit=self._max_hybrid_connections,
                requires_client_authorization=requires_client_authorization,
                user_metadata=user_metadata,
                http_response_timeout=http_response_timeout,
            )

        record = await self._change_entity(entity_key(name), change)
        assert record is not None
        return record, created

    async def delete_hybrid_connection(self, name: str) -> bool:
        """Delete it and its rules; False when it did not exist."""
        existed = False

        def change(old: HybridConnectionRecord | None) -> None:
            nonlocal existed
            existed = old is not None

        await self._change_entity(entity_key(name), change)
        return existed

    async def put_rule(
        self, name: str, rights: Rights, *, entity: str = ""
    ) -> tuple[RuleRecord, bool]:
        """Create a rule with new random keys, or change an existing rule's rights (keys
        kept); ``entity`` empty for the namespace. :class:`NotFoundError` for a missing
        entity."""
        now = self._clock()
        scope = entity_key(entity)
        result: list[tuple[RuleRecord, bool]] = []

        def change(rules: tuple[RuleRecord, ...]) -> tuple[RuleRecord, ...]:
            result[:] = [put_rule_record(rules, name, rights, now, scope)]
            return swap_rule(rules, name, result[0][0])

        await self._change_rules(entity, change)
        return result[0]

    async def delete_rule(self, name: str, *, entity: str = "") -> bool:
        existed = False

        def change(rules: tuple[RuleRecord, ...]) -> tuple[RuleRecord, ...]:
            nonlocal existed
            existed = find_rule(rules, name) is not None
            return swap_rule(rules, name, None)

        await self._change_rules(entity, change)
        return existed

    async def regenerate_key(
        self, name: str, slot: KeySlot, *, entity: str = "", key: str | None = None
    ) -> RuleRecord:
        """Replace one key (random, or ``key``); the other is kept."""
        fresh = key or new_key()  # the same key if the change is tried again
        now = self._clock()
        result: list[RuleRecord] = []

        def change(rules: tuple[RuleRecord, ...]) -> tuple[RuleRecord, ...]:
            result[:] = [regenerated_rule(rules, name, slot, fresh, now)]
            return swap_rule(rules, name, result[0])

        await self._change_rules(entity, change)
        return result[0]

    async def update_namespace(self, *, tags: dict[str, str]) -> NamespaceRecord:
        now = self._clock()
        return await self._change_namespace(
            lambda old: replace(old, tags=MappingProxyType(dict(tags)), updated_at=now)
        )

    async def _change_rules(
        self, entity: str, change: Callable[[tuple[RuleRecord, ...]], tuple[RuleRecord, ...]]
    ) -> None:
        scope = entity_key(entity)
        if not scope:
            await self._change_namespace(lambda old: replace(old, rules=change(old.rules)))
            return

        def change_entity(old: HybridConnectionRecord | None) -> HybridConnectionRecord:
            if old is None:
                raise NotFoundError(f"no hybrid connection {entity.strip('/')!r}")
            return replace(old, rules=change(old.rules))

        await self._change_entity(scope, change_entity)

    # -- what each store does its own way ---------------------------------------------------

    async def _change_namespace(self, change: NamespaceChange) -> NamespaceRecord:
        """Keep ``change(current namespace record)``; returns it. ``change`` may raise a
        :class:`StoreError` (nothing is written)."""
        raise NotImplementedError

    async def _change_entity(self, key: str, change: EntityChange) -> HybridConnectionRecord | None:
        """Keep ``change(the record of key, or None)`` (None: there is none); returns it.
        ``change`` may raise a :class:`StoreError` (nothing is written)."""
        raise NotImplementedError

    def _publish(self, state: NamespaceState) -> None:
        """Keep ``state`` and call each subscriber with it (from a copy of the list: one may
        unsubscribe while being told)."""
        self._state = state
        for subscriber in list(self._subscribers):
            try:
                subscriber(state)
            except Exception:  # one broken subscriber must not stop the others
                logger.exception("a store subscriber failed")


# -- what both stores write: the records a change makes, before each store keeps them --------


def put_hybrid_connection_record(
    old: HybridConnectionRecord | None,
    name: str,
    now: float,
    *,
    count: int,
    limit: int,
    requires_client_authorization: bool | None,
    user_metadata: object,
    http_response_timeout: object,
) -> HybridConnectionRecord:
    """The record :meth:`Store.put_hybrid_connection` keeps: a new one (``count`` of at most
    ``limit`` hybrid connections exist) with defaults for what is not given, or ``old`` with
    what is given.

    Raises:
        StoreQuotaError: a new one past ``limit``.
    """
    if old is None:
        if count >= limit:
            raise StoreQuotaError(f"at most {limit} hybrid connections are allowed")
        return HybridConnectionRecord(
            name=name.strip("/"),
            requires_client_authorization=(
                True if requires_client_authorization is None else requires_client_authorization
            ),
            created_at=now,
            updated_at=now,
            user_metadata=None if user_metadata is KEEP else _optional_str(user_metadata),
            http_response_timeout=(
                None if http_response_timeout is KEEP else _optional_float(http_response_timeout)
            ),
        )
    changes: dict[str, Any] = {"updated_at": now}
    if requires_client_authorization is not None:
        changes["requires_client_authorization"] = requires_client_authorization
    if user_metadata is not KEEP:
        changes["user_metadata"] = _optional_str(user_metadata)
    if http_response_timeout is not KEEP:
        changes["http_response_timeout"] = _optional_float(http_response_timeout)
    return replace(old, **changes)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _optional_float(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float):
        raise TypeError("http_response_timeout must be a number or None")
    return float(value)


def find_rule(rules: Iterable[RuleRecord], name: str) -> RuleRecord | None:
    """The rule named ``name`` (rule names are case-insensitive), or None."""
    return next((rule for rule in rules if rule.name.lower() == name.lower()), None)


def put_rule_record(
    rules: Sequence[RuleRecord], name: str, rights: Rights, now: float, entity: str
) -> tuple[RuleRecord, bool]:
    """The record :meth:`Store.put_rule` keeps, and whether it is new: ``name``'s rule in
    ``rules`` (the scope ``entity``'s) with ``rights``, or a new one with new random keys.

    Raises:
        StoreQuotaError: a new one past :data:`MAX_RULES_PER_SCOPE`.
    """
    old = find_rule(rules, name)
    if old is not None:
        return replace(old, rights=rights, updated_at=now), False
    if len(rules) >= MAX_RULES_PER_SCOPE:
        raise StoreQuotaError(f"at most {MAX_RULES_PER_SCOPE} authorization rules are allowed here")
    return RuleRecord(name, new_key(), new_key(), rights, now, now, entity), True


def regenerated_rule(
    rules: Iterable[RuleRecord], name: str, slot: KeySlot, key: str | None, now: float
) -> RuleRecord:
    """The record :meth:`Store.regenerate_key` keeps: ``name``'s rule with its ``slot`` key
    replaced (by ``key``, or a new random one).

    Raises:
        NotFoundError: no rule ``name`` in ``rules``.
    """
    old = find_rule(rules, name)
    if old is None:
        raise NotFoundError(f"no authorization rule {name!r}")
    fresh = key or new_key()
    if slot == "primary":
        return replace(old, primary_key=fresh, updated_at=now)
    return replace(old, secondary_key=fresh, updated_at=now)


def swap_rule(
    rules: tuple[RuleRecord, ...], name: str, record: RuleRecord | None
) -> tuple[RuleRecord, ...]:
    """``rules`` without the rule ``name``, and with ``record`` (last) unless it is None."""
    kept = tuple(rule for rule in rules if rule.name.lower() != name.lower())
    return (*kept, record) if record is not None else kept
