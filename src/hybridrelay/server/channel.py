"""A listener's control channel as the relay sees it: the socket, the token's expiry, whether
the broker may still offer it senders, and a future resolved when it is gone."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from hybridrelay.exceptions import RelayConnectionError

#: A control channel that cannot take a small message in this time is treated as dead, and
#: closed: a listener is either routable or disconnected (so that its SDK reconnects), never
#: connected but passed over for good.
_SEND_TIMEOUT = 10.0

__all__ = ["ChannelSocket", "ControlChannel"]


class ChannelSocket(Protocol):
    """What a control channel is sent on (the relay's
    :class:`~hybridrelay.transport.control_leg.ControlLeg`)."""

    @property
    def write_paused(self) -> bool:
        """The transport is above its high-water mark."""
        ...

    def write_message(self, text: str, body: bytes | None = None) -> None:
        """Write the text message and the binary one right after it, now; raises
        :class:`RelayConnectionError` when the connection is closing or gone."""
        ...

    async def drain(self) -> None:
        """Return once the transport is below its high-water mark."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "") -> None: ...

    def abort(self) -> None: ...


class ControlChannel:
    """A connected listener's control channel, as the relay sees it."""

    __slots__ = (
        "_send_lock",
        "_waiting",
        "base_url",
        "closed",
        "connected_at",
        "entity",
        "host",
        "listener_id",
        "queued",
        "remote",
        "socket",
        "token_expiry",
        "usable",
    )

    def __init__(
        self,
        entity: str,
        listener_id: str,
        socket: ChannelSocket,
        token_expiry: float,
        remote: str,
        base_url: str,
        host: str = "",
    ) -> None:
        self.entity = entity
        #: Base of the rendezvous addresses given to this listener: the relay as the listener
        #: itself reached it (or the configured public base), never what a sender claims.
        self.base_url = base_url
        #: The ``Host`` the listener connected by: its renewed tokens' audience is checked
        #: against it as its first token's was.
        self.host = host
        self.listener_id = listener_id
        self.socket = socket
        self.token_expiry = token_expiry
        self.remote = remote
        self.connected_at = time.time()
        #: False once the channel failed or is closing: never hand it a sender again.
        self.usable = True
        #: Resolved when the channel is gone: senders offered to it are offered elsewhere.
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Taken by a send that waits for the transport, so that the sends behind it keep
        #: their order.
        self._send_lock = asyncio.Lock()
        #: Sends waiting (for the lock or the transport): no send may overtake them.
        self._waiting = 0
        #: Messages being sent or waiting for the channel (the broker passes over a channel
        #: with too many: a listener that stopped reading is not handed more senders).
        self.queued = 0

    def send_nowait(self, text: str, body: bytes | None = None) -> bool:
        """Write a control message (and its binary body right after it) without waiting, if
        the channel can take it now (the socket writes what one turn of the event loop wrote
        at the turn's end, ``transport/control_leg.py``); False, with nothing written, when it
        cannot: it is not usable, a :meth:`send` waits, or its transport is above its
        high-water mark (then :meth:`send` waits for it). A connection found closing is
        dropped (as :meth:`send` does) and gives False."""
        if not self.usable or self._waiting or self.socket.write_paused:
            return False
        try:
            self.socket.write_message(text, body)
        except RelayConnectionError:
            self._failed()
            return False
        return True

    async def send(self, text: str, body: bytes | None = None) -> None:
        """Send a control message (and its binary body right after it, nothing in between),
        waiting while the transport is full; a channel that cannot take it within
        ``_SEND_TIMEOUT`` is dropped.

        Raises:
            RelayConnectionError: the channel is closed, or was dropped by this send.
        """
        if self.send_nowait(text, body):
            return
        if not self.usable:
            raise RelayConnectionError("control channel is closed")
        self.queued += 1
        self._waiting += 1
        try:
            async with asyncio.timeout(_SEND_TIMEOUT), self._send_lock:
                await self.socket.drain()
                self.socket.write_message(text, body)
        except (RelayConnectionError, TimeoutError) as exc:
            self._failed()
            raise RelayConnectionError("control channel send failed") from exc
        finally:
            self.queued -= 1
            self._waiting -= 1

    def _failed(self) -> None:
        self.usable = False
        # Dropping the connection ends the channel (its serving unregisters it and moves what
        # waits on it elsewhere) and tells the listener to reconnect.
        self.socket.abort()

    def __repr__(self) -> str:
        return f"<ControlChannel {self.entity!r} listener={self.listener_id}>"
