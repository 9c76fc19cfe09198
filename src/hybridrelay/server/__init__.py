"""The relay server."""

from __future__ import annotations

from hybridrelay.server.app import RelayServer
from hybridrelay.server.broker import Broker, LocalBroker
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig
from hybridrelay.server.store import EntityStore, FileEntityStore, InMemoryEntityStore

__all__ = [
    "Broker",
    "EntityStore",
    "FileEntityStore",
    "HybridConnectionConfig",
    "InMemoryEntityStore",
    "LocalBroker",
    "RelayConfig",
    "RelayServer",
]
