"""The access log of our HTTP listeners (``serve-app``, ``bridge -H``): one uvicorn-style INFO
line per relayed request, on ``hybridrelay.access``.

It wraps a request handler and reads only what the request context says of itself (this
module imports nothing of the SDK, so the bridge may use it): the sender's address, method,
target, status, body bytes written and the duration. No header is written, and the relay has
removed the ``sb-hc-*`` query parameters, so no token reaches the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from hybridrelay.observability.access_log import only_handler

__all__ = ["LoggedRequest", "access_logged"]


class LoggedRequest(Protocol):
    """What :func:`access_logged` reads of a request context
    (:class:`~hybridrelay.client.RelayedHttpContext`)."""

    @property
    def method(self) -> str: ...

    @property
    def target(self) -> str: ...

    @property
    def remote_endpoint(self) -> tuple[str, int] | None: ...

    @property
    def responded(self) -> bool: ...

    @property
    def status(self) -> int: ...

    @property
    def bytes_sent(self) -> int: ...

    async def finish(self) -> None: ...


C = TypeVar("C", bound=LoggedRequest)
Handler = Callable[[C], Awaitable[None]]


def access_logged(handler: Handler[C], log: logging.Logger) -> Handler[C]:
    """``handler`` with one INFO line per request on ``log`` once its response is finished,
    uvicorn-style: the sender's address, method, path, status, body bytes, duration::

        203.0.113.7:52114 - "GET /api/items?page=2" 200 1532B 12.4ms

    Neither the query's ``sb-hc-*`` parameters (the relay removed them) nor any header is
    written, so no token reaches the log.
    """

    async def logged(ctx: C) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | str = "-"
        try:
            await handler(ctx)
            await ctx.finish()
            status = ctx.status
        except Exception:
            status = 500 if not ctx.responded else "cut"  # as the SDK answers, or cut
            raise
        finally:
            if log.isEnabledFor(logging.INFO):
                peer = ctx.remote_endpoint
                client = f"{peer[0]}:{peer[1]}" if peer else "-"
                target = ctx.target
                if not target.isprintable():  # the common case skips the per-character pass
                    target = "".join(ch if ch.isprintable() else "?" for ch in target)
                took = (loop.time() - started) * 1000
                line = f'{client} - "{ctx.method} {target}" {status} {ctx.bytes_sent}B {took:.1f}ms'
                # Written to the process's batched handler directly where nothing else is on
                # the way (as the relay's access log, observability/access_log.py): the record
                # logging would make was half the line's cost, one line per request.
                sink = only_handler(log)
                if sink is None or not sink.emit_fields(logging.INFO, log.name, line, {}):
                    log.info("%s", line)

    return logged
