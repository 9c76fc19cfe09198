"""The bridge agent: runs every forward of a configuration in one task group.

Before any ``-L`` socket is bound, the credentials of every ``-L`` hybrid connection are checked
against the relay (:meth:`HybridConnectionClient.check_access`, the runtime information
request: no listener is reached): a refusal (401/403, an unknown hybrid connection, a
certificate not trusted) ends the bridge at once with one line naming the forward, the status
and the fix, instead of the first client's connection being reset; a relay that cannot be
reached yet is retried on the backoff schedule (logged once per cause), and the sockets are
bound once it answers. ``-R``/``-H`` forwards are checked by their listener's first connect
(:func:`~hybridrelay.bridge.listening.keep_listening`).

Shutdown (:meth:`BridgeAgent.shutdown`, wired to SIGINT/SIGTERM by the CLI) is ordered:
stop accepting (close the listening sockets and the relay listeners) -> let open connections
finish for ``shutdown_grace_period`` seconds -> cancel what is left (each connection closes its
socket and stream, bounded) -> close the SDK clients -> return.

With ``metrics_port`` set, :class:`~hybridrelay.observability.endpoint.MetricsServer` serves
the agent's :class:`~hybridrelay.observability.bridge_metrics.BridgeMetrics` on ``/metrics``,
``/healthz`` and ``/readyz`` (:meth:`BridgeAgent.readiness`: not ready while a listener is
offline or a local socket is not bound yet, nor once the shutdown began) from before the
forwards start until after the drain.

Only the public SDK is used: :class:`HybridConnectionClient` per hybrid connection the
ingress sends to, :class:`HybridConnectionListener` per hybrid connection the edge serves and
per HTTP forward (``-H``, with :class:`~hybridrelay.bridge.http_forward.HttpReverseProxy` as
its request handler).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from hybridrelay.bridge.config import BridgeConfig, ConnectionSettings
from hybridrelay.bridge.edge import Edge, EdgeListener, ListenerFactory
from hybridrelay.bridge.http_forward import HttpForwarder, HttpListenerFactory
from hybridrelay.bridge.ingress import Connect, StreamIngress
from hybridrelay.bridge.listening import RetryLog
from hybridrelay.bridge.specs import Protocol
from hybridrelay.bridge.udp import UdpIngress
from hybridrelay.client import (
    AcceptHandler,
    HybridConnectionClient,
    HybridConnectionListener,
    RequestHandler,
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
    TokenProvider,
)
from hybridrelay.client.backoff import (
    RECONNECT_DELAYS,
    RetryKind,
    classify_error,
    needs_a_fix,
)
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.observability.bridge_metrics import (
    BridgeMetrics,
    ForwardKind,
    ForwardMetrics,
    ListenerMetrics,
)
from hybridrelay.observability.endpoint import MetricsServer

__all__ = ["BridgeAgent", "token_provider_for"]

logger = logging.getLogger("hybridrelay.bridge")

#: How long closing the SDK clients may take at the end.
CLIENT_CLOSE_TIMEOUT = 10.0


def token_provider_for(connection: ConnectionSettings) -> TokenProvider | None:
    """The SDK token provider for the configured credentials (None: anonymous)."""
    if connection.token:
        return SharedAccessSignatureTokenProvider(connection.token)
    if connection.key_name and connection.key:
        return SharedAccessKeyTokenProvider(connection.key_name, connection.key)
    return None


class BridgeAgent:
    """Runs a :class:`BridgeConfig`.

    Use :meth:`run` (returns after :meth:`shutdown` and the drain), or ``async with agent:``,
    which starts it, waits until every forward listens (ingress sockets bound, edge and HTTP
    listeners online once), and shuts it down on exit.

    Args:
        config: a validated configuration with a relay endpoint.
        retry_schedule: delays between attempts to open an edge listener (tests shorten it).
        metrics: where to record (default: a registry of the agent's own, with the process
            collectors); served when ``config.metrics_port`` is set.

    Raises:
        ConfigurationError: there is no endpoint.
    """

    def __init__(
        self,
        config: BridgeConfig,
        *,
        retry_schedule: Sequence[float] = RECONNECT_DELAYS,
        metrics: BridgeMetrics | None = None,
    ) -> None:
        if not config.connection.endpoint:
            raise ConfigurationError(
                "no relay endpoint: give -x CONNECTION_STRING, -e ENDPOINT, or 'connection:' in "
                "the config file"
            )
        self.config = config
        self._retry_schedule = retry_schedule
        self._stop = asyncio.Event()
        self.started = asyncio.Event()
        self._pending_starts = 0
        self._task: asyncio.Task[None] | None = None
        #: Per local forward (same order as ``config.local_forwards``): the bound addresses.
        self.ingress: list[StreamIngress | UdpIngress] = []
        self.edges: list[Edge] = []
        self.http_forwarders: list[HttpForwarder] = []
        self.metrics = metrics if metrics is not None else BridgeMetrics()
        #: The -R and -H listeners by name (``-R hc``), for readiness.
        self._listeners: dict[str, ListenerMetrics] = {}
        self._metrics_server: MetricsServer | None = None
        #: run() has made the forwards (readiness asks them from then on).
        self._built = False

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port`` of ``/metrics`` and the health routes, once served."""
        server = self._metrics_server
        return server.url if server is not None and server.port else None

    async def readiness(self) -> str | None:
        """Why the bridge is not ready (``/readyz``), or None: every ``-L`` socket is bound
        and every ``-R``/``-H`` listener is online now, and the shutdown has not begun."""
        if self._stop.is_set():
            return "draining: the bridge is shutting down"
        if not self._built:
            return "starting"
        waiting = [
            f"-L {ingress.forward.spec} is not listening yet"
            for ingress in self.ingress
            if not ingress.addresses
        ]
        waiting += [
            f"{name} is offline" for name, state in self._listeners.items() if not state.online
        ]
        return "; ".join(waiting) or None

    def shutdown(self) -> None:
        """Begin the graceful shutdown (idempotent; safe from a signal handler)."""
        if not self._stop.is_set():
            logger.info("bridge: shutting down")
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ingress_address(self, index: int) -> Any:
        """The first bound address of local forward ``index`` (for port 0)."""
        return self.ingress[index].addresses[0]

    def _one_started(self) -> None:
        self._pending_starts -= 1
        if self._pending_starts == 0:
            logger.info("bridge: all forwards are up")
            self.started.set()

    async def run(self) -> None:
        """Run all forwards until :meth:`shutdown`; then drain and return.

        Raises:
            ConfigurationError: a local address cannot be bound, or the relay refused a
                listener for good.
        """
        config = self.config
        connection = config.connection
        assert connection.endpoint is not None
        provider = token_provider_for(connection)
        metrics = self.metrics
        clients: dict[str, HybridConnectionClient] = {}
        self.ingress = []
        self.edges = []
        self.http_forwarders = []
        self._listeners = {}
        for forward in config.local_forwards:
            hc = forward.spec.hybrid_connection
            if hc not in clients:
                clients[hc] = HybridConnectionClient(
                    [connection.endpoint, *connection.more_endpoints],  # tried in turn
                    hc,
                    provider,
                    ca_file=connection.ca_file,
                    proxy=connection.proxy,
                    connect_timeout=config.connect_timeout,
                    keep_alive_interval=config.keep_alive_interval,
                )
            connect: Connect = clients[hc].create_connection
            series = metrics.forward(ForwardKind.LOCAL, hc)
            if forward.spec.protocol is Protocol.UDP:
                self.ingress.append(UdpIngress(forward, config, connect, metrics=series))
            else:
                self.ingress.append(StreamIngress(forward, config, connect, metrics=series))
        for hc, routes in config.edge_routes().items():
            status = self._listeners[f"-R {hc}"] = metrics.listener(ForwardKind.REMOTE, hc)
            self.edges.append(
                Edge(
                    hc,
                    routes,
                    config,
                    _listener_factory(config, hc, provider, status),
                    metrics=metrics.forward(ForwardKind.REMOTE, hc),
                    retry_schedule=self._retry_schedule,
                )
            )
        for http_forward in config.http_forwards:
            hc = http_forward.hybrid_connection
            status = self._listeners[f"-H {hc}"] = metrics.listener(ForwardKind.HTTP, hc)
            series = metrics.forward(ForwardKind.HTTP, hc)
            self.http_forwarders.append(
                HttpForwarder(
                    http_forward,
                    config,
                    _http_listener_factory(config, hc, provider, status, series),
                    metrics=series,
                    retry_schedule=self._retry_schedule,
                )
            )
        self._built = True
        self._pending_starts = len(self.ingress) + len(self.edges) + len(self.http_forwarders)
        if self._pending_starts == 0:
            self.started.set()
        error: BaseException | None = None
        try:
            await self._serve_metrics()
            async with asyncio.TaskGroup() as group:
                if self.ingress:
                    group.create_task(self._serve_local_forwards(clients, group))
                for edge in self.edges:
                    group.create_task(edge.serve(self._one_started, self._stop))
                for http in self.http_forwarders:
                    group.create_task(http.serve(self._one_started, self._stop))
                if self._pending_starts == 0:
                    await self._stop.wait()
        except* (ConfigurationError, RelayError) as errors:
            error = _first_leaf(errors)
        finally:
            self._stop.set()
            for client in clients.values():
                try:
                    async with asyncio.timeout(CLIENT_CLOSE_TIMEOUT):
                        await client.aclose()
                except (TimeoutError, RelayError):
                    logger.debug("bridge: closing a relay client did not finish cleanly")
            # Last, so that a scrape during the drain sees it (and /readyz says draining).
            server, self._metrics_server = self._metrics_server, None
            if server is not None:
                await server.aclose()
        if error is not None:
            raise error
        logger.info("bridge: stopped")

    async def _serve_local_forwards(
        self, clients: dict[str, HybridConnectionClient], group: asyncio.TaskGroup
    ) -> None:
        """Check every ``-L`` hybrid connection's credentials (concurrently), then bind the
        ``-L`` sockets: none is bound when one of them is refused."""
        names: dict[str, str] = {}
        for forward in self.config.local_forwards:
            names.setdefault(forward.spec.hybrid_connection, f"-L {forward.spec}")
        async with asyncio.TaskGroup() as checks:
            for hc, client in clients.items():
                checks.create_task(self._check_access(names[hc], client))
        if self._stop.is_set():
            return
        for ingress in self.ingress:
            group.create_task(ingress.serve(self._one_started, self._stop))

    async def _check_access(self, name: str, client: HybridConnectionClient) -> None:
        """Until the relay answers: a refusal that needs a fix raises, the rest is retried.

        Raises:
            RelayError: the relay refused (the message names the forward, the cause, the fix).
        """
        retries = RetryLog(name, self._retry_schedule)
        while not self._stop.is_set():
            try:
                await client.check_access()
            except RelayError as exc:
                if needs_a_fix(exc) or classify_error(exc) is RetryKind.FATAL:
                    raise RelayError(f"{name}: {exc}") from exc
                if await retries.retry("cannot check the credentials", exc, self._stop):
                    return
                continue
            retries.succeeded()
            return

    async def _serve_metrics(self) -> None:
        """Start the metrics listener when ``metrics_port`` is set.

        Raises:
            ConfigurationError: its address cannot be bound.
        """
        config = self.config
        if config.metrics_port is None:
            return
        server = MetricsServer(
            self.metrics.registry,
            self.readiness,
            host=config.metrics_host,
            port=config.metrics_port,
        )
        await server.start()
        self._metrics_server = server
        # The bound port matters with --metrics-port 0: this line is how it is learnt.
        logger.info("bridge: metrics on %s/metrics (health: /healthz, /readyz)", server.url)

    async def __aenter__(self) -> BridgeAgent:
        task = asyncio.create_task(self.run(), name="hybridrelay-bridge")
        self._task = task
        started = asyncio.create_task(self.started.wait())
        try:
            await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self.shutdown()
            await asyncio.wait([task])
            raise
        finally:
            started.cancel()
            await asyncio.wait([started])
        if task.done():
            await task  # raises the startup error
            raise ConfigurationError("the bridge stopped while starting")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()
        if self._task is not None:
            await self._task


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _listener(
    config: BridgeConfig, hc: str, provider: TokenProvider | None, **kwargs: Any
) -> HybridConnectionListener:
    """A listener on ``hc`` with the bridge's connection settings (edges and HTTP forwards)."""
    connection = config.connection
    assert connection.endpoint is not None
    return HybridConnectionListener(
        [connection.endpoint, *connection.more_endpoints],  # a cluster's nodes, in turn
        hc,
        provider,
        ca_file=connection.ca_file,
        proxy=connection.proxy,
        keep_alive_interval=config.keep_alive_interval,
        **kwargs,
    )


def _listener_factory(
    config: BridgeConfig, hc: str, provider: TokenProvider | None, status: ListenerMetrics
) -> ListenerFactory:
    def make(admit: Callable[[Any], bool | None]) -> EdgeListener:
        # A burst of new connections is opened concurrently; the edge's own admission
        # (max_connections) is the limit that matters, not the SDK's queue default.
        listener = _listener(
            config, hc, provider, accept_handler=admit, max_pending=config.max_connections
        )
        listener.on_status(status.status)
        return listener

    return make


def _http_listener_factory(
    config: BridgeConfig,
    hc: str,
    provider: TokenProvider | None,
    status: ListenerMetrics,
    series: ForwardMetrics,
) -> HttpListenerFactory:
    def make(handler: RequestHandler, accept: AcceptHandler) -> EdgeListener:
        listener = _listener(config, hc, provider, accept_handler=accept, request_handler=handler)
        listener.on_status(status.status)
        return listener

    return make
