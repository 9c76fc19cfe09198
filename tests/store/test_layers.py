"""The file laid over the store (store/layers.py): the file wins where both name a thing."""

from __future__ import annotations

from types import MappingProxyType

from hybridrelay.auth.sas import Rights
from hybridrelay.store.layers import FileLayer, layered
from hybridrelay.store.records import (
    HybridConnectionRecord,
    NamespaceRecord,
    NamespaceState,
    RuleRecord,
)


def rule(name: str, key: str, entity: str = "") -> RuleRecord:
    return RuleRecord(name, key, key + "-2", Rights.SEND, 1.0, 1.0, entity)


def test_the_file_wins_and_the_rest_is_the_stores() -> None:
    stored_edge = rule("edge", "store-key", "shared")
    state = NamespaceState(
        NamespaceRecord("ns", 1.0, 1.0, rules=(rule("Root", "store-root"), rule("ops", "o"))),
        MappingProxyType(
            {
                "shared": HybridConnectionRecord("Shared", True, 1.0, 1.0, rules=(stored_edge,)),
                "mine": HybridConnectionRecord("mine", True, 1.0, 1.0),
            }
        ),
        version=7,
    )
    file = FileLayer.of(
        [rule("root", "file-root")], [HybridConnectionRecord("shared", False, 2.0, 2.0)]
    )
    merged = layered(file, state)
    assert merged.version == 7
    assert [(r.name, r.primary_key) for r in merged.namespace.rules] == [
        ("root", "file-root"),
        ("ops", "o"),
    ]
    shared = merged.get("SHARED")
    assert shared is not None and shared.requires_client_authorization is False
    assert shared.rules == ()  # the file's entity is the file's, whole
    assert merged.get("mine") is state.get("mine")
    assert file.names_entity("Shared") and not file.names_entity("mine")
    assert file.names_rule("ROOT") and not file.names_rule("ops")
    assert file.names_rule("anything", entity="shared")
    assert layered(FileLayer(), state) is state
