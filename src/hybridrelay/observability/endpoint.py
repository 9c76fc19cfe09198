"""``/metrics``, ``/healthz`` and ``/readyz``: the routes a relay's management listener and a
bridge's metrics port serve (docs/METRICS.md).

``/metrics`` is ``prometheus_client``'s text exposition of one registry. ``/healthz`` answers as
long as the event loop does (the process is alive); ``/readyz`` asks the process whether it can
do its work (the relay: the store answers and it is not draining; a bridge: its listeners are
online) and answers 503 with the reason when it cannot. None of them needs a token: they hold
no secret, and they are on loopback unless the operator says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.allowlist import is_loopback

__all__ = ["MetricsServer", "Readiness", "health_routes"]

logger = logging.getLogger("hybridrelay.observability")

#: Why the process is not ready, or None when it is.
Readiness = Callable[[], Awaitable[str | None]]
#: How long ``/readyz`` waits for the readiness check.
READINESS_TIMEOUT = 5.0


def health_routes(registry: CollectorRegistry, readiness: Readiness) -> list[web.RouteDef]:
    """The three routes over ``registry`` and ``readiness``."""

    async def metrics(request: web.Request) -> web.Response:
        # CONTENT_TYPE_LATEST carries a charset, which aiohttp wants in its own argument.
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT):
                reason = await readiness()
        except TimeoutError:
            reason = f"the readiness check did not answer in {READINESS_TIMEOUT:g} s"
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    return [
        web.get("/metrics", metrics),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
    ]


class MetricsServer:
    """:func:`health_routes` on ``host:port`` (a bridge's ``--metrics-port``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extra: Sequence[web.RouteDef] = (),
    ) -> None:
        self._routes = [*health_routes(registry, readiness), *extra]
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            ConfigurationError: the address cannot be bound (naming it and the fix).
        """
        app = web.Application()
        app.add_routes(self._routes)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigurationError(
                f"metrics: cannot listen on {self._host}:{self._requested_port}: "
                f"{exc.strerror or exc} (choose another --metrics-port)"
            ) from exc
        self._runner = runner
        server = site._server
        assert server is not None
        self.port = int(list(getattr(server, "sockets", ()))[0].getsockname()[1])
        if not is_loopback(self._host):
            logger.warning("metrics and health are served beyond loopback on %s", self.url)

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
