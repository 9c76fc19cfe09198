"""The entities the relay serves: the configuration file's laid over the management store's.

The relay reads hybrid connections and namespace rules through :class:`EntityStore` only. The
implementation, :class:`NamespaceView`, keeps one immutable picture of the namespace (the file
laid over the store, ``store/layers.py``: the file wins where both name the same thing) and
replaces it whole when the store reports a change or the configuration is replaced, so a
request never sees half of a change and the data path never waits on the store. A change takes
effect for the next request: a created entity accepts listeners as soon as the store call
returns, a deleted one answers 404, and a token signed with a regenerated or deleted key is
refused (the signature cache is keyed by the rules, ``auth/cache.py``). What leaves the
namespace is reported to ``on_removed`` so the relay can close its listeners and pending
senders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Protocol

from hybridrelay.auth.sas import AuthorizationRule
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig
from hybridrelay.store.base import Store, StoreUnavailableError
from hybridrelay.store.layers import FileLayer, layered
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
    entity_key,
)

__all__ = ["EntityStore", "NamespaceView", "file_layer"]


class EntityStore(Protocol):
    @property
    def generation(self) -> int:
        """A number that grows with every change of the namespace served, so that what is
        derived from it (the relay's front keeps a request head's entity) can be kept while
        it is the same, without holding the namespace itself."""
        ...

    def namespace_rules(self) -> Sequence[AuthorizationRule]: ...

    def get(self, path: str) -> HybridConnectionConfig | None:
        """The hybrid connection at ``path`` (case-insensitive), or None."""
        ...

    async def create(self, entity: HybridConnectionConfig) -> HybridConnectionConfig:
        """Create ``entity`` (a listener's first listen); returns what is served now."""
        ...


def _rule_record(rule: AuthorizationRule, entity: str, at: float) -> RuleRecord:
    return RuleRecord(
        rule.name, rule.primary_key, rule.secondary_key or "", rule.rights, at, at, entity
    )


def file_layer(config: RelayConfig, loaded_at: float) -> FileLayer:
    """What ``config`` names, as store records (the file has no dates: ``loaded_at``)."""
    return FileLayer.of(
        [_rule_record(rule, "", loaded_at) for rule in config.authorization_rules],
        [
            HybridConnectionRecord(
                name=entity.name,
                requires_client_authorization=entity.requires_client_authorization,
                created_at=loaded_at,
                updated_at=loaded_at,
                user_metadata=entity.user_metadata or None,
                http_response_timeout=entity.http_response_timeout,
                rules=tuple(
                    _rule_record(rule, entity.name, loaded_at)
                    for rule in entity.authorization_rules
                ),
            )
            for entity in config.hybrid_connections
        ],
    )


def _entity(record: HybridConnectionRecord) -> HybridConnectionConfig:
    return HybridConnectionConfig(
        name=record.name,
        requires_client_authorization=record.requires_client_authorization,
        authorization_rules=tuple(rule.to_rule() for rule in record.rules),
        user_metadata=record.user_metadata or "",
        http_response_timeout=record.http_response_timeout,
    )


class NamespaceView:
    """The namespace as the relay serves it (see the module docstring)."""

    def __init__(
        self,
        namespace: str,
        file: FileLayer,
        *,
        on_removed: Callable[[Sequence[str]], None] = lambda names: None,
    ) -> None:
        #: The management store, once the relay has opened it (:meth:`attach`).
        self.store: Store | None = None
        self._file = file
        self._on_removed = on_removed
        self._store_state = NamespaceState(
            NamespaceRecord(namespace, 0.0, 0.0), MappingProxyType({}), 0
        )
        self._state = layered(file, self._store_state)
        self._generation = 0
        self._rules = self._namespace_rules(self._state)
        #: Entities converted on first use since the last change (a namespace may hold
        #: thousands; most are not used between two changes).
        self._entities: dict[str, HybridConnectionConfig] = {}
        self._unsubscribe: Callable[[], None] = lambda: None

    def attach(self, store: Store) -> None:
        """Serve ``store``'s entities and rules (under the file's) from now on."""
        self._unsubscribe()
        self.store = store
        self._unsubscribe = store.subscribe(lambda state: self._changed())
        self._changed()

    @property
    def state(self) -> NamespaceState:
        """The file laid over the store, now."""
        return self._state

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def file(self) -> FileLayer:
        return self._file

    def replace_file(self, file: FileLayer) -> None:
        """Serve a new configuration file's entities and rules from now on."""
        self._file = file
        self._changed()

    def close(self) -> None:
        self._unsubscribe()

    def namespace_rules(self) -> Sequence[AuthorizationRule]:
        return self._rules

    def get(self, path: str) -> HybridConnectionConfig | None:
        key = entity_key(path)
        entity = self._entities.get(key)
        if entity is None:
            record = self._state.hybrid_connections.get(key)
            if record is None:
                return None
            entity = self._entities[key] = _entity(record)
        return entity

    async def create(self, entity: HybridConnectionConfig) -> HybridConnectionConfig:
        if self.store is None:
            raise StoreUnavailableError("the relay has not opened its store yet")
        await self.store.put_hybrid_connection(
            entity.name, requires_client_authorization=entity.requires_client_authorization
        )
        # The store told us before its call returned (subscribers run on commit).
        return self.get(entity.name) or entity

    def _changed(self) -> None:
        before = self._state.hybrid_connections
        if self.store is not None:
            self._store_state = self.store.state
        self._state = layered(self._file, self._store_state)
        self._generation += 1
        self._rules = self._namespace_rules(self._state)
        self._entities = {}
        removed = [before[key].name for key in before if key not in self._state.hybrid_connections]
        if removed:
            self._on_removed(removed)

    @staticmethod
    def _namespace_rules(state: NamespaceState) -> tuple[AuthorizationRule, ...]:
        return tuple(rule.to_rule() for rule in state.namespace.rules)
