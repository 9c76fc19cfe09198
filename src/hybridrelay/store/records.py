"""What the management store keeps: the namespace, its hybrid connections and SAS rules.

Immutable values. A :class:`NamespaceState` is one consistent picture of the store, handed to
the relay whole, so that a request never sees half of a change. Keys never appear in ``repr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hybridrelay.auth.sas import AuthorizationRule, Rights

__all__ = [
    "HybridConnectionRecord",
    "NamespaceRecord",
    "NamespaceState",
    "RuleRecord",
    "entity_key",
]


def entity_key(name: str) -> str:
    """The store's key of a hybrid connection: its path without outer slashes, lower-cased
    (entity paths are case-insensitive; the name keeps its casing)."""
    return name.strip("/").lower()


@dataclass(frozen=True)
class RuleRecord:
    """A SAS authorization rule; ``entity`` is empty for a namespace-level rule."""

    name: str
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)
    rights: Rights
    created_at: float
    updated_at: float
    entity: str = ""

    def to_rule(self) -> AuthorizationRule:
        return AuthorizationRule(self.name, self.primary_key, self.secondary_key, self.rights)


@dataclass(frozen=True)
class HybridConnectionRecord:
    name: str
    requires_client_authorization: bool
    created_at: float
    updated_at: float
    user_metadata: str | None = None
    #: Per-connection HTTP response deadline in seconds; None: the relay's default.
    http_response_timeout: float | None = None
    rules: tuple[RuleRecord, ...] = ()


@dataclass(frozen=True)
class NamespaceRecord:
    name: str
    created_at: float
    updated_at: float
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    rules: tuple[RuleRecord, ...] = ()


@dataclass(frozen=True)
class NamespaceState:
    """Everything the store holds, at one ``version`` (it grows with every change)."""

    namespace: NamespaceRecord
    hybrid_connections: Mapping[str, HybridConnectionRecord]
    version: int

    def get(self, name: str) -> HybridConnectionRecord | None:
        return self.hybrid_connections.get(entity_key(name))

    def sorted_hybrid_connections(self) -> list[HybridConnectionRecord]:
        return [self.hybrid_connections[key] for key in sorted(self.hybrid_connections)]
