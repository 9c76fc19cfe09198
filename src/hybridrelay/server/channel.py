"""A listener's control channel as the relay sees it: the socket, the token's expiry, whether
the broker may still offer it senders, and a future resolved when it is gone."""

from __future__ import annotations

import asyncio
import time

from hybridrelay.exceptions import RelayConnectionError
from hybridrelay.transport.base import MessageSocket

#: A control channel that cannot take a small message in this time is treated as dead, and
#: closed: a listener is either routable or disconnected (so that its SDK reconnects), never
#: connected but passed over for good.
_SEND_TIMEOUT = 10.0

__all__ = ["ControlChannel"]


class ControlChannel:
    """A connected listener's control channel, as the relay sees it."""

    __slots__ = (
        "_send_lock",
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
        socket: MessageSocket,
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
        self._send_lock = asyncio.Lock()
        #: Messages being sent or waiting for the channel (the broker passes over a channel
        #: with too many: a listener that stopped reading is not handed more senders).
        self.queued = 0

    async def send(self, text: str, body: bytes | None = None) -> None:
        """Send a control message (and its binary body right after it, nothing in between)."""
        if not self.usable:
            raise RelayConnectionError("control channel is closed")
        self.queued += 1
        try:
            async with asyncio.timeout(_SEND_TIMEOUT), self._send_lock:
                await self.socket.send(text)
                if body is not None:
                    await self.socket.send(body)
        except (RelayConnectionError, TimeoutError) as exc:
            self.usable = False
            # Dropping the connection ends the channel's loop (which unregisters it and moves
            # what waits on it elsewhere) and tells the listener to reconnect.
            self.socket.abort()
            raise RelayConnectionError("control channel send failed") from exc
        finally:
            self.queued -= 1

    def send_nowait(self, text: str, body: bytes | None = None) -> bool:
        """:meth:`send` without waiting, where the socket can write at once: False (nothing
        written) when it cannot (the channel is closing, another send is under way, or the
        socket writes only by awaiting)."""
        if not self.usable or self.queued or self._send_lock.locked():
            return False
        write = getattr(self.socket, "send_nowait", None)  # the frame path's sockets have it
        return bool(write is not None and write(text, body))

    def __repr__(self) -> str:
        return f"<ControlChannel {self.entity!r} listener={self.listener_id}>"
