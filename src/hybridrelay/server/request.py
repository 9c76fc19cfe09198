"""The relay's HTTP request: aiohttp's, plus a future resolved when its connection is lost.

aiohttp (without ``handler_cancellation``, which would also cancel the handlers that go on
after a splice took the connection over) gives a handler no sign that its client went away.
A sender waiting for a listener holds a slot of the broker's pending table; one that closed
its connection must give the slot back at once, not when the wait times out (30 s), or a
flood of connect-then-reset senders fills the table.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

__all__ = ["RelayRequest", "connection_gone"]


class RelayRequest(web.BaseRequest):
    """A request that can tell when its connection is gone (:meth:`connection_gone`)."""

    ATTRS = web.BaseRequest.ATTRS | frozenset(["_gone"])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gone: asyncio.Future[None] | None = None

    def connection_gone(self) -> asyncio.Future[None]:
        """Resolved once the request's connection is lost (already, if it is)."""
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
            if self.transport is None or self.transport.is_closing():
                self._gone.set_result(None)
        return self._gone

    def _cancel(self, exc: BaseException) -> None:
        # aiohttp calls this from its protocol's connection_lost for the request in progress.
        super()._cancel(exc)
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)


def connection_gone(request: web.BaseRequest) -> asyncio.Future[None] | None:
    """The request's "connection lost" future, where the server made a :class:`RelayRequest`."""
    return request.connection_gone() if isinstance(request, RelayRequest) else None
