"""The relay server."""

from __future__ import annotations

from hybridrelay.server.app import RelayServer
from hybridrelay.server.broker import Broker, LocalBroker
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig
from hybridrelay.server.store import EntityStore, NamespaceView

__all__ = [
    "Broker",
    "EntityStore",
    "HybridConnectionConfig",
    "LocalBroker",
    "NamespaceView",
    "RelayConfig",
    "RelayServer",
]
