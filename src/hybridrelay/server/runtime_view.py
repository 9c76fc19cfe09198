"""The relay's live state as the management listener's ``/runtime`` routes show it: the
broker's control channels and the tracked relayed connections (``management/runtime_api.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from hybridrelay.management.runtime_api import ConnectionInfo, ListenerInfo
from hybridrelay.server.broker import Broker
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.legs import RelayedLegs
from hybridrelay.store.records import entity_key
from hybridrelay.transport.base import CloseCode

__all__ = ["OPERATOR_CLOSE", "RelayRuntimeView", "close_channels"]

#: The close reason a listener or a connection gets when the operator closes it.
OPERATOR_CLOSE = "closed by the relay's operator"


def _matches(entity: str, name: str | None) -> bool:
    return name is None or entity_key(entity) == entity_key(name)


async def close_channels(
    broker: Broker, channels: Sequence[ControlChannel], code: int, reason: str
) -> None:
    """Offer ``channels`` nothing more (what waits on them learns at once) and close them."""
    for channel in channels:
        broker.unregister(channel)
    await asyncio.gather(
        *(channel.socket.aclose(code, reason) for channel in channels), return_exceptions=True
    )


class RelayRuntimeView:
    """A :class:`~hybridrelay.management.runtime_api.RuntimeView` of one relay process."""

    def __init__(self, broker: Broker, legs: RelayedLegs) -> None:
        self._broker = broker
        self._legs = legs

    def listeners(self, hybrid_connection: str | None = None) -> list[ListenerInfo]:
        return [
            ListenerInfo(c.listener_id, c.entity, c.remote, c.connected_at, c.token_expiry)
            for c in self._broker.channels()
            if _matches(c.entity, hybrid_connection)
        ]

    def connections(self, hybrid_connection: str | None = None) -> list[ConnectionInfo]:
        return [
            ConnectionInfo(
                c.tracking_id,
                c.entity,
                c.kind,
                c.sender_address,
                c.listener_address,
                c.since,
                c.bytes_to_listener,
                c.bytes_to_sender,
            )
            for c in self._legs.connections()
            if _matches(c.entity, hybrid_connection)
        ]

    async def close_listeners(
        self, *, listener_id: str | None = None, hybrid_connection: str | None = None
    ) -> int:
        chosen = [
            c
            for c in self._broker.channels()
            if _matches(c.entity, hybrid_connection)
            and (listener_id is None or c.listener_id == listener_id)
        ]
        # 1008: the listener's token may be why (a rotated key); it reconnects with a new one.
        await close_channels(self._broker, chosen, CloseCode.POLICY_VIOLATION, OPERATOR_CLOSE)
        return len(chosen)

    def close_connections(
        self, *, tracking_id: str | None = None, hybrid_connection: str | None = None
    ) -> int:
        chosen = [
            c
            for c in self._legs.connections()
            if _matches(c.entity, hybrid_connection)
            and (tracking_id is None or c.tracking_id == tracking_id)
        ]
        for connection in chosen:
            connection.close(CloseCode.POLICY_VIOLATION, OPERATOR_CLOSE)
        return len(chosen)
