"""``/metrics``, ``/healthz`` and ``/readyz``: the routes a relay's management listener and a
bridge's metrics port serve (docs/METRICS.md).

``/metrics`` is ``prometheus_client``'s text exposition of one registry. ``/healthz`` answers as
long as the event loop does (the process is alive); ``/readyz`` asks the process whether it can
do its work (the relay: the store answers and it is not draining; a bridge: its listeners are
online and it is not draining) and answers 503 with the reason when it cannot. None of them
needs a token: they hold no secret, and they are on loopback unless the operator says
otherwise.

The relay mounts :func:`health_routes` on its management application; a bridge runs them on
a listener of their own, :class:`MetricsServer`.
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
from hybridrelay.socket_errors import bind_cause

__all__ = [
    "CLOSE_TIMEOUT",
    "READINESS_TIMEOUT",
    "START_TIMEOUT",
    "MetricsServer",
    "Readiness",
    "health_routes",
]

logger = logging.getLogger("hybridrelay.observability")

#: Why the process is not ready, or None when it is.
Readiness = Callable[[], Awaitable[str | None]]
#: How long ``/readyz`` waits for the readiness check.
READINESS_TIMEOUT = 5.0
#: Binding the listener (a host name is resolved first).
START_TIMEOUT = 10.0
#: Closing the listener: a scrape in flight gets this long to finish.
CLOSE_TIMEOUT = 5.0


def health_routes(registry: CollectorRegistry, readiness: Readiness) -> list[web.RouteDef]:
    """``GET /metrics`` (the text exposition of ``registry``), ``GET /healthz`` (200 ``ok``)
    and ``GET /readyz`` (200 ``ready`` when ``readiness()`` returns None, else 503
    ``not ready: REASON``; a check that takes longer than :data:`READINESS_TIMEOUT` is a
    reason too). HEAD is answered as well (aiohttp adds it to every GET route)."""

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


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class MetricsServer:
    """:func:`health_routes` on a listener of their own (a bridge's ``--metrics-port``).

    Args:
        registry, readiness: as for :func:`health_routes`.
        host: the address to listen on; beyond loopback a warning is logged.
        port: the TCP port; 0 picks a free one (read :attr:`port` after :meth:`start`).
        extra: more routes on the same listener.
        hint: what the operator can change when the address cannot be bound (ends the
            error's one line).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Readiness,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extra: Sequence[web.RouteDef] = (),
        hint: str = "choose another --metrics-port (0 picks a free one) or --metrics-host",
    ) -> None:
        self._routes = [*health_routes(registry, readiness), *extra]
        self._host = host
        self._requested_port = port
        self._hint = hint
        self._runner: web.AppRunner | None = None
        #: The bound port (the requested one, or the one the system picked for 0).
        self.port = 0

    @property
    def url(self) -> str:
        """``http://host:port`` (the routes are under it)."""
        return f"http://{_url_host(self._host)}:{self.port}"

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            ConfigurationError: the address cannot be bound or resolved, or binding took
                longer than :data:`START_TIMEOUT` (one line naming the address and the fix).
            RuntimeError: already started.
        """
        if self._runner is not None:
            raise RuntimeError("the metrics server is already started")
        app = web.Application()
        app.add_routes(self._routes)
        # shutdown_timeout bounds how long cleanup() waits for a scrape in flight.
        runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=CLOSE_TIMEOUT
        )
        await runner.setup()
        address = f"{_url_host(self._host)}:{self._requested_port}"
        try:
            site = web.TCPSite(runner, self._host, self._requested_port, reuse_address=True)
            async with asyncio.timeout(START_TIMEOUT):
                await site.start()
            # Every socket of the site has the same port (several only for a name that
            # resolves to several addresses).
            ports = {int(sockname[1]) for sockname in runner.addresses}
            if len(ports) != 1:
                raise OSError(f"bound {sorted(ports)}, expected one port")
        except (OSError, TimeoutError) as exc:
            await self._cleanup(runner)
            if isinstance(exc, TimeoutError):
                why = f"binding took longer than {START_TIMEOUT:g} s"
            else:
                why = bind_cause(exc)
            raise ConfigurationError(
                f"metrics: cannot listen on {address}: {why} ({self._hint})"
            ) from exc
        except BaseException:
            await self._cleanup(runner)
            raise
        self._runner = runner
        self.port = ports.pop()
        if not is_loopback(self._host):
            logger.warning(
                "metrics and health are served beyond loopback on %s: anyone who reaches it "
                "sees the hybrid connections' names and traffic",
                self.url,
            )

    async def aclose(self) -> None:
        """Stop listening (bounded by :data:`CLOSE_TIMEOUT`). Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await self._cleanup(runner)

    @staticmethod
    async def _cleanup(runner: web.AppRunner) -> None:
        try:
            # aiohttp's own shutdown_timeout bounds the connections' end; this bounds the
            # whole of it (a second margin) so a stuck close cannot hold the process.
            async with asyncio.timeout(CLOSE_TIMEOUT + 1.0):
                await runner.cleanup()
        except TimeoutError:
            logger.warning("metrics: closing the listener took longer than %g s", CLOSE_TIMEOUT)

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
