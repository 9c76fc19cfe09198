"""The namespace the relay serves: the configuration file's entities and rules laid over the
management store's.

The file wins where both name the same thing: a hybrid connection the file names is the
file's, whole (with the file's rules on it), and so is a namespace rule the file names. Those
are read-only through the management API (change the file and reload); everything else is the
store's. Pure: the caller hands in both layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceState,
    RuleRecord,
    entity_key,
)

__all__ = ["FileLayer", "layered"]


@dataclass(frozen=True)
class FileLayer:
    """What the configuration file defines, as store records."""

    rules: tuple[RuleRecord, ...] = ()
    hybrid_connections: Mapping[str, HybridConnectionRecord] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def of(
        cls, rules: Sequence[RuleRecord], hybrid_connections: Sequence[HybridConnectionRecord]
    ) -> FileLayer:
        return cls(
            tuple(rules),
            MappingProxyType({entity_key(record.name): record for record in hybrid_connections}),
        )

    def names_entity(self, name: str) -> bool:
        return entity_key(name) in self.hybrid_connections

    def names_rule(self, name: str, entity: str = "") -> bool:
        """Whether the file owns rule ``name`` (of ``entity``, or of the namespace)."""
        if entity_key(entity):
            return self.names_entity(entity)
        return any(rule.name.lower() == name.lower() for rule in self.rules)


def layered(file: FileLayer, state: NamespaceState) -> NamespaceState:
    """``state`` with ``file`` laid over it (same version: it changes when either does)."""
    if not file.rules and not file.hybrid_connections:
        return state
    file_rule_names = {rule.name.lower() for rule in file.rules}
    rules = (
        *file.rules,
        *(rule for rule in state.namespace.rules if rule.name.lower() not in file_rule_names),
    )
    entities = {**state.hybrid_connections, **file.hybrid_connections}
    return NamespaceState(
        namespace=replace(state.namespace, rules=rules),
        hybrid_connections=MappingProxyType(entities),
        version=state.version,
    )
