"""The relay server."""

from __future__ import annotations

from hybridrelay.server.app import RelayServer
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig
from hybridrelay.server.registry import InMemoryListenerRegistry, ListenerRegistry
from hybridrelay.server.store import EntityStore, FileEntityStore, InMemoryEntityStore

__all__ = [
    "EntityStore",
    "FileEntityStore",
    "HybridConnectionConfig",
    "InMemoryEntityStore",
    "InMemoryListenerRegistry",
    "ListenerRegistry",
    "RelayConfig",
    "RelayServer",
]
