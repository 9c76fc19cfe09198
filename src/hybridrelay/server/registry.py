"""The listener registry: which control channels are connected for which hybrid connection.

The broker (``broker.py``) keeps its listeners here and decides the order in which to try them;
the registry only knows which channels are connected and usable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.transport.base import MessageSocket

#: A control channel that cannot take a small message in this time is treated as dead.
_SEND_TIMEOUT = 10.0

__all__ = ["ControlChannel", "InMemoryListenerRegistry", "ListenerRegistry"]


class ControlChannel:
    """A connected listener's control channel, as the relay sees it."""

    __slots__ = (
        "_send_lock",
        "base_url",
        "closed",
        "connected_at",
        "entity",
        "listener_id",
        "remote",
        "socket",
        "token_expiry",
        "usable",
    )

    def __init__(
        self,
        entity: str,
        listener_id: str,
        socket: MessageSocket,
        token_expiry: float,
        remote: str,
        base_url: str,
    ) -> None:
        self.entity = entity
        #: Base of the rendezvous addresses given to this listener: the relay as the listener
        #: itself reached it (or the configured public base), never what a sender claims.
        self.base_url = base_url
        self.listener_id = listener_id
        self.socket = socket
        self.token_expiry = token_expiry
        self.remote = remote
        self.connected_at = time.time()
        #: False once the channel failed or is closing: never hand it a sender again.
        self.usable = True
        #: Resolved when the channel is gone: senders offered to it are offered elsewhere.
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._send_lock = asyncio.Lock()

    async def send(self, text: str, body: bytes | None = None) -> None:
        """Send a control message (and its binary body right after it, nothing in between)."""
        if not self.usable:
            raise RelayConnectionError("control channel is closed")
        try:
            async with asyncio.timeout(_SEND_TIMEOUT), self._send_lock:
                await self.socket.send(text)
                if body is not None:
                    await self.socket.send(body)
        except (RelayConnectionError, TimeoutError) as exc:
            self.usable = False
            raise RelayConnectionError("control channel send failed") from exc

    def __repr__(self) -> str:
        return f"<ControlChannel {self.entity!r} listener={self.listener_id}>"


class ListenerRegistry(Protocol):
    def add(self, channel: ControlChannel, limit: int) -> bool:
        """Register ``channel``; False if the entity already has ``limit`` listeners."""
        ...

    def remove(self, channel: ControlChannel) -> None: ...

    def candidates(self, entity: str) -> list[ControlChannel]:
        """Usable listeners of ``entity``, in the order they registered (a new list)."""
        ...

    def has_listeners(self, entity: str) -> bool:
        """Whether ``entity`` has a usable listener."""
        ...

    def count(self, entity: str) -> int: ...

    def all(self) -> Sequence[ControlChannel]: ...


class InMemoryListenerRegistry:
    def __init__(self) -> None:
        self._by_entity: dict[str, list[ControlChannel]] = {}

    def add(self, channel: ControlChannel, limit: int) -> bool:
        channels = self._by_entity.setdefault(channel.entity.lower(), [])
        if len(channels) >= limit:
            return False
        channels.append(channel)
        return True

    def remove(self, channel: ControlChannel) -> None:
        channel.usable = False
        if not channel.closed.done():
            channel.closed.set_result(None)
        key = channel.entity.lower()
        channels = self._by_entity.get(key)
        if channels and channel in channels:
            channels.remove(channel)
            if not channels:
                del self._by_entity[key]

    def candidates(self, entity: str) -> list[ControlChannel]:
        return [c for c in self._by_entity.get(entity.lower(), ()) if c.usable]

    def has_listeners(self, entity: str) -> bool:
        return any(c.usable for c in self._by_entity.get(entity.lower(), ()))

    def count(self, entity: str) -> int:
        return len(self._by_entity.get(entity.lower(), ()))

    def all(self) -> Sequence[ControlChannel]:
        return [c for channels in self._by_entity.values() for c in channels]
