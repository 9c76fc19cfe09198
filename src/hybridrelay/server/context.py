"""What the relay's endpoints use of it, as one value passed to each of them.

The endpoint modules (``control_channel.py``, ``websocket_relay.py``, ``http_relay.py``,
``runtime_info.py``, ``ingress.py``) get a :class:`RelayContext` instead of the server itself, so
none of them imports :class:`~hybridrelay.server.app.RelayServer` and each says by its use of
the context what it depends on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hybridrelay.server.access import Access
from hybridrelay.server.broker import Broker
from hybridrelay.server.config import RelayConfig
from hybridrelay.server.legs import RelayedLegs
from hybridrelay.server.observer import RelayObserver
from hybridrelay.server.store import EntityStore

__all__ = ["RelayContext"]


@dataclass(frozen=True, slots=True)
class RelayContext:
    """The relay's configuration of the moment (``settings()``: read at each use, it can be
    replaced while the relay runs), its entities, its authorization check, its broker, the
    legs of its relayed connections, what it reports (metrics, logs) and whether it drains."""

    settings: Callable[[], RelayConfig]
    store: EntityStore
    access: Access
    broker: Broker
    legs: RelayedLegs
    observer: RelayObserver
    #: Whether the relay drains (its listeners take nothing new).
    draining: Callable[[], bool] = lambda: False

    @property
    def config(self) -> RelayConfig:
        return self.settings()
