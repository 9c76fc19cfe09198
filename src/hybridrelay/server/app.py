"""The relay server: HTTP(S) and WebSocket endpoints of Hybrid Connections on one port.

Endpoints (PROTOCOL.md section 2):

* ``GET /$hc/{path}?sb-hc-action=listen``  — listener control channel (E1), ``control_channel.py``
* ``GET /$hc/{path}[/suffix]?...sb-hc-action=connect`` — sender WebSocket (E2)
* ``GET {accept address}``                 — listener's rendezvous (E3) or reject (E4)
* ``{METHOD} /{path}[/suffix]``            — HTTP request relaying (E6), ``http_relay.py``
* ``GET /{path}[/suffix]``, ``Upgrade: websocket`` — sender WebSocket (6.9), ``http_upgrade.py``
* ``GET /{path}?api-version=...``          — runtime information (E7), ``runtime_info.py``

:class:`RelayServer` owns the process's life (start, the ordered shutdown, the configuration
of the moment) and routes each request to its endpoint; pairing senders with listeners is the
broker's (``broker.py``), which every endpoint and the relay's own ingress ports use.

Nothing here logs a token, a key or a rendezvous address; aiohttp's access log is off because
request targets carry ``sb-hc-token``.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import datetime
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aiohttp import web

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.management.app import management_application
from hybridrelay.management.arm_api import ArmApi
from hybridrelay.management.dashboard import Dashboard
from hybridrelay.management.runtime_api import RuntimeApi
from hybridrelay.protocol.addressing import (
    HC_PREFIX,
    STATUS_CODE_PARAM,
    protocol_params,
    resolve_entity,
)
from hybridrelay.server.access import Access
from hybridrelay.server.broker import ENTITY_DELETED, Broker, LocalBroker
from hybridrelay.server.certificate import ServedCertificate
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import RelayConfig, TlsConfig
from hybridrelay.server.connection_gate import (
    ConnectionGate,
    GatedServer,
    GateLimits,
    default_max_connections,
)
from hybridrelay.server.context import RelayContext
from hybridrelay.server.control_channel import ListenEndpoint
from hybridrelay.server.http_relay import HttpRelay
from hybridrelay.server.http_upgrade import HttpUpgrade, is_websocket_upgrade
from hybridrelay.server.ingress import RelayIngress
from hybridrelay.server.legs import RelayedLegs
from hybridrelay.server.malformed import http_server_logger
from hybridrelay.server.observer import RelayObserver
from hybridrelay.server.reload import describe_changes, restart_only, without_restart_only
from hybridrelay.server.request import RelayRequest
from hybridrelay.server.responses import error_response, name_the_server
from hybridrelay.server.runtime_info import is_runtime_info_request, runtime_info
from hybridrelay.server.runtime_view import RelayRuntimeView, close_channels
from hybridrelay.server.sender_http import SenderFront
from hybridrelay.server.store import NamespaceView, file_layer
from hybridrelay.server.websocket_relay import WebSocketRelay
from hybridrelay.server.worker import WorkerRole, with_port
from hybridrelay.socket_errors import bind_failure
from hybridrelay.store.base import Store, StoreError
from hybridrelay.store.sqlite import MEMORY, SqliteStore
from hybridrelay.transport.base import CloseCode

if TYPE_CHECKING:
    from hybridrelay.server.cluster_broker import ClusterBroker

__all__ = ["RelayServer"]

logger = logging.getLogger("hybridrelay.server")

#: How long a shutdown waits for spliced connections to finish their close handshakes.
_SHUTDOWN_GRACE = 5.0
#: The control channels' close in a drain: "Service Restart" (IANA's close code registry), so
#: that a listener reconnects, to another relay behind the same name in a rolling restart.
#: Our SDK and hyco-ws redial after any close they did not ask for (docs/OPERATIONS.md);
#: 1001 (going away) stays the code of :meth:`RelayServer.aclose`, an immediate stop.
DRAIN_CLOSE_CODE = CloseCode.SERVICE_RESTART
DRAIN_CLOSE_REASON = "relay restarting"


class RelayServer:
    """A Hybrid Connections relay.

    Usage::

        async with RelayServer(RelayConfig.load("relay.yaml")) as server:
            print(server.base_url)
            await server.wait_closed()

    ``store`` holds the entities and namespace rules (default: those of ``config``);
    ``broker`` pairs senders with listeners (default: a :class:`LocalBroker` for the
    listeners connected to this process). ``worker``: this process is one of ``serve
    --workers N`` (``server/worker.py``): the ports are shared (SO_REUSEPORT) and rendezvous
    addresses name the worker's own port.
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
        observer: RelayObserver | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        #: The configuration of the moment: every limit is read from here when it is used, so
        #: :meth:`replace_config` takes effect for what comes next.
        self.config = config
        self.worker = worker
        #: The worker's own port (rendezvous addresses name it), once bound; 0 otherwise.
        self._worker_port = 0
        #: Reported as CreatedAt/UpdatedAt of configured entities: the file has no dates.
        self._loaded_at = datetime.datetime.now(datetime.UTC)
        #: The management store given, else opened at start (``store.path``, else memory).
        self._given_store = store
        self._own_store: Store | None = None
        #: The entities and rules served: the file's laid over the store's.
        self.store = NamespaceView(
            config.namespace_name,
            file_layer(config, self._loaded_at.timestamp()),
            on_removed=self._entities_removed,
        )
        #: The cluster broker with ``store.cluster`` (redis is imported only then).
        self._cluster: ClusterBroker | None = None
        if broker is None and config.store.cluster:
            try:
                from hybridrelay.server.cluster_broker import ClusterBroker
            except ImportError as exc:
                raise ConfigurationError(
                    "store.cluster needs redis-py: pip install 'hybridrelay[cluster]'"
                ) from exc

            try:
                broker = self._cluster = ClusterBroker(
                    config.store.cluster,
                    config.namespace_name,
                    public_base=self._rendezvous_base,
                    local_first=_local_first(config),
                )
            except StoreError as exc:  # an address that cannot be used
                raise ConfigurationError(f"store.cluster: {exc}") from exc
        self.broker: Broker = broker or LocalBroker()
        self.observer = observer or RelayObserver()
        #: The authorization check every endpoint uses.
        self.access = Access(self.store, self._settings)
        #: Legs of relayed connections, for the runtime API and the ordered shutdown.
        self._legs = RelayedLegs(on_finished=self.observer.connection_finished)
        self._runner: web.ServerRunner | None = None
        self._management_runner: web.AppRunner | None = None
        self._port = 0
        self._management_port = 0
        self._management_secure = False
        #: New listeners, senders and HTTP requests are refused (503) from here on: a drain
        #: or a close began. Rendezvous of what was offered before still go through.
        self._draining = False
        #: Everything is refused: the close began.
        self._closing = False
        #: A drain's wait ends early (a second SIGTERM/SIGINT).
        self._stop_draining = asyncio.Event()
        self._closed = asyncio.Event()
        #: Tasks closing the listeners of deleted entities.
        self._tasks: set[asyncio.Task[None]] = set()
        #: The certificates served (replaced by :meth:`replace_config`, e.g. on SIGHUP).
        self._certificate = (
            ServedCertificate(config.server.tls, self._tls_context) if config.server.tls else None
        )
        self._management_certificate = (
            ServedCertificate(config.management.tls, self._tls_context)
            if config.management.tls and config.management.enabled
            else None
        )
        self._ssl = self._certificate.context if self._certificate else None
        #: What the endpoints use of the relay.
        self._context = RelayContext(
            self._settings,
            self.store,
            self.access,
            self.broker,
            self._legs,
            self.observer,
            draining=lambda: self._draining,
        )
        self.http = HttpRelay(self._context)
        #: The HTTP front of the relay's port (made with the server, in start()).
        self._front: SenderFront | None = None
        self.websocket = WebSocketRelay(self._context)
        self.upgrades = HttpUpgrade(self._context, self.websocket)
        self._listen = ListenEndpoint(self._context, http=self.http, public_base=self.public_base)
        #: Caps on connections and the first request head, before aiohttp (and the ingress
        #: ports, caps only): what a client without a token can cost the relay is bounded.
        self.gate = ConnectionGate(self._gate_limits)
        #: ``limits.max_connections`` when 0: derived from the open-file limit at start.
        self._fd_cap = default_max_connections()
        #: The relay's own TCP ports (``ingress:``).
        self.ingress = [
            RelayIngress(entry, self._context, gate=self.gate, reuse_port=worker is not None)
            for entry in config.ingress
        ]
        self.runtime = RelayRuntimeView(self.broker, self._legs)
        self.arm: ArmApi | None = None
        self.dashboard: Dashboard | None = None
        self.observer.metrics.rendezvous_pending.set_function(lambda: self.broker.pending_count)

    def _settings(self) -> RelayConfig:
        return self.config

    # -- configuration -------------------------------------------------------------------------

    def replace_config(self, new: RelayConfig) -> list[str]:
        """Run with ``new`` from now on; what changed, one phrase each (for a log line; never
        a secret).

        Takes effect for what comes next: limits are read when used (a new sender's rendezvous
        timeout and the pending bound, a new HTTP request's deadline, a new listener's limit and
        keep-alive, a channel's next renewal grace), ``namespace_host`` and
        ``auto_create_hybrid_connections``; the file's hybrid connections and namespace rules
        are laid over the store's at once (an entity that leaves the namespace has its
        listeners and pending senders closed, as a deletion through the management API).
        Connections already relayed stay. The certificates (``server.tls``, and
        ``management.tls`` where it has its own) are read again from their files: new TLS
        handshakes present them if they changed, established connections keep theirs.

        Needs a restart, and is refused here (:class:`ConfigurationError`, nothing changed):
        the ``server`` section but for its certificate, ``public_base_url`` and
        ``shutdown_grace_period``, the ``management`` and ``store`` sections and ``ingress:``
        (ports are bound and the store opened at start); a certificate that does not load.
        ``limits.idle_timeout`` applies to connections made after a restart only (aiohttp
        takes it when the server starts).
        """
        changes = self._replace_config(new)
        logger.info("configuration replaced: %s", "; ".join(changes) or "nothing changed")
        return changes

    def _replace_config(self, new: RelayConfig) -> list[str]:
        old = self.config
        restart = restart_only(old, new)
        if restart:
            sections = sorted({key.split(".")[0] for key in restart})
            raise ConfigurationError(
                f"these change on restart only: {', '.join(restart)} (the "
                f"{', '.join(sections)} section{'s' if len(sections) > 1 else ''})"
            )
        commits = []
        for served, tls in (
            (self._certificate, new.server.tls),
            (self._management_certificate, new.management.tls),
        ):
            if served is not None and tls is not None:
                commit = served.prepare(tls)  # raises before anything changed
                if commit is not None:
                    commits.append(commit)
        changes = describe_changes(old, new)
        self.config = new
        layer = file_layer(new, self._loaded_at.timestamp())
        if self.arm is not None:
            self.arm.file_layer = layer
        self.store.replace_file(layer)
        return [commit() for commit in commits] + changes

    def reload(self, new: RelayConfig) -> list[str]:
        """Take over from ``new`` what can change while running (SIGHUP): as
        :meth:`replace_config`, but what needs a restart is kept as running and named. The
        caller logs the result (``serve``: one ``reloaded: ...`` line).

        Raises:
            ConfigurationError: ``new`` cannot be applied (a certificate does not load, the
                mix does not hold together); the running configuration is kept.
        """
        restart = restart_only(self.config, new)
        changes = self._replace_config(without_restart_only(self.config, new))
        if restart:
            changes.append(f"needs a restart (kept as running): {', '.join(restart)}")
        return changes

    def _entities_removed(self, names: Sequence[str]) -> None:
        """Deleted entities: refuse their pending senders, close their listeners (1001)."""
        for name in names:
            channels = self.broker.entity_gone(name)
            relayed = [c for c in self._legs.connections() if c.entity.lower() == name.lower()]
            for connection in relayed:
                connection.close(CloseCode.GOING_AWAY, ENTITY_DELETED)
            logger.info(
                "hybrid connection %r deleted: closing %d listener(s) and %d connection(s)",
                name,
                len(channels),
                len(relayed),
            )
            if channels:
                task = asyncio.get_running_loop().create_task(
                    close_channels(self.broker, channels, CloseCode.GOING_AWAY, ENTITY_DELETED)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # -- lifecycle -----------------------------------------------------------------------

    @staticmethod
    def _tls_context(tls: TlsConfig) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for what, path in (("certificate", tls.cert), ("private key", tls.key)):
            # load_cert_chain's OSError names neither file: say which one is missing.
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the TLS {what} {path}: {exc.strerror or exc} (check tls.cert "
                    "and tls.key; relative paths are relative to the config file)"
                ) from exc
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load the TLS certificate {tls.cert} with the key {tls.key}: {exc}"
            ) from exc
        return context

    def _gate_limits(self) -> GateLimits:
        limits = self.config.limits
        total = limits.max_connections or self._fd_cap
        return GateLimits(
            max_connections=total,
            max_connections_per_source=limits.max_connections_per_source or max(1, total // 4),
            # aiohttp's keep-alive timeout bounded the wait for a first request; the gate
            # holds a connection until then, so it bounds that wait too.
            header_timeout=min(limits.header_timeout, limits.idle_timeout),
            max_header_bytes=limits.max_header_bytes,
        )

    async def start(self) -> None:
        """Open the store, bind and start serving; returns once the sockets are listening."""
        self._fd_cap = default_max_connections()  # after the serve command raised the limit
        store = self._given_store
        if store is None:
            try:
                if self.config.store.cluster:
                    from hybridrelay.store.redis import RedisStore

                    store = self._own_store = await RedisStore.open(
                        self.config.store.cluster, namespace=self.config.namespace_name
                    )
                else:
                    store = self._own_store = await SqliteStore.open(
                        self.config.store.path or MEMORY, namespace=self.config.namespace_name
                    )
            except StoreError as exc:
                raise ConfigurationError(
                    f"store.{'cluster' if self.config.store.cluster else 'path'}: {exc}"
                ) from exc
        self.store.attach(store)
        # aiohttp's low-level server: routing is ours (one catch-all), so the Application,
        # router and middleware layers would only cost memory per connection (~2 KiB per
        # relayed connection, measured) and CPU per request.
        # keepalive_timeout also bounds the wait for a connection's first request (aiohttp
        # starts it at connection_made): one that never sends one does not stay for ever.
        name_the_server()
        loop = asyncio.get_running_loop()

        def front(aiohttp_handler: Callable[[], Any]) -> SenderFront:
            self._front = SenderFront(self._context, self.http, aiohttp_handler)
            return self._front

        server = GatedServer(
            self._dispatch,
            gate=self.gate,
            front=front,
            request_factory=lambda *parts: RelayRequest(*parts, loop),
            # a malformed request: one short line, never its headers
            logger=http_server_logger(self.observer.refusals),
            access_log=None,
            max_field_size=32768,
            keepalive_timeout=self.config.limits.idle_timeout,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        shared = self.worker is not None
        self._port = await _listen(
            self._runner, self.config.server.host, self.config.server.port, self._ssl, shared
        )
        logger.info("relay listening on %s", self.base_url)
        try:
            if self.worker is not None:
                try:
                    self._worker_port = await _listen(
                        self._runner, self.config.server.host, self.worker.own_port, self._ssl
                    )
                except OSError as exc:
                    raise ConfigurationError(
                        f"worker {self.worker.index}: "
                        + bind_failure(
                            f"{self.config.server.host}:{self.worker.own_port}",
                            exc,
                            port_option="--worker-port",
                        )
                    ) from exc
                logger.info(
                    "worker %d: rendezvous addresses name %s",
                    self.worker.index,
                    self.worker_base_url,
                )
            if self._cluster is not None:  # its rendezvous base is known once bound
                outage = getattr(store, "outage", None)
                if outage is not None:
                    self._cluster.outage = outage  # one log line per outage for the node
                await self._cluster.start()
            if self.config.management.enabled:
                await self._start_management(store)
            for ingress in self.ingress:
                try:
                    await ingress.start()
                except OSError as exc:
                    entry = ingress.config
                    host = f"[{entry.host}]" if ":" in entry.host else entry.host
                    raise ConfigurationError(
                        f"ingress to {entry.hybrid_connection}: "
                        + bind_failure(f"{host}:{entry.port}", exc, port_option="its listen:")
                    ) from exc
        except BaseException:
            await self.aclose()
            raise

    async def _start_management(self, store: Store) -> None:
        from hybridrelay.observability.endpoint import health_routes

        settings = self.config.management
        self.arm = ArmApi(
            store,
            self.store.file,
            self.broker.listener_totals,
            public_endpoint=self.public_endpoint,
        )
        runtime = RuntimeApi(self.runtime, self.arm.authorize_request)
        own = self._management_certificate
        secure = own.context if own is not None else self._ssl
        self.dashboard = Dashboard(
            state=lambda: self.store.state,
            runtime=self.runtime,
            store=store,
            token_refusal=self.arm.manage_token_refusal,
            totals=self.observer.totals,
            recent_errors=lambda: self.observer.recent_errors,
            secure=secure is not None,
            listener_totals=self.broker.listener_totals,
        )
        app = management_application(
            self.arm,
            runtime,
            [
                *health_routes(self.observer.metrics.registry, self._readiness),
                *self.dashboard.routes(),
            ],
        )
        self._management_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._management_runner.setup()
        try:
            port = self.worker.management_port if self.worker else settings.port or 0
            self._management_port = await _listen(
                self._management_runner, settings.host, port, secure
            )
        except OSError as exc:
            raise ConfigurationError(
                "management: "
                + bind_failure(
                    f"{settings.host}:{settings.port}", exc, port_option="--management-port"
                )
            ) from exc
        self._management_secure = secure is not None
        self.dashboard.start()
        logger.info("management listening on %s", self.management_url)

    async def _readiness(self) -> str | None:
        """Why the relay is not ready (``/readyz``), or None."""
        if self._draining:
            return "draining: the relay is shutting down"
        store = self.store.store
        if store is None:
            return "the store is not open"
        try:
            async with asyncio.timeout(5.0):
                await store.check()
        except (StoreError, TimeoutError) as exc:
            return f"the store is unreachable: {exc or 'no answer in 5 s'}"
        return None

    async def drain(self, grace: float | None = None) -> None:
        """Shut down gracefully, then :meth:`aclose`.

        New listeners, senders and HTTP requests are refused (503) and the ingress ports stop
        accepting at once; every listener is offered nothing more and its control channel is
        closed with 1012 (:data:`DRAIN_CLOSE_CODE`) as soon as no HTTP request waits for an
        answer on it. Relayed connections (WebSocket pairs, ingress tunnels) and HTTP requests
        in flight get ``grace`` seconds (default ``server.shutdown_grace_period``) to finish;
        :meth:`stop_draining` ends the wait early. What remains is then closed by
        :meth:`aclose` (1001 on both legs, at most its close-handshake time).
        """
        if self._draining:
            await self.aclose()
            return
        self._draining = True
        if grace is None:
            grace = self.config.server.shutdown_grace_period
        loop = asyncio.get_running_loop()
        started = loop.time()
        for ingress in self.ingress:
            ingress.stop_accepting()
        connections = self._legs.connections()
        requests = self.http.live_exchanges()
        channels = list(self.broker.channels())
        logger.info(
            "draining: %d relayed connection(s) and %d HTTP request(s) in flight get up to %gs "
            "to finish; %d listener(s) told to reconnect (%d); new connections refused (a "
            "second SIGTERM/SIGINT stops at once)",
            len(connections),
            len(requests),
            grace,
            len(channels),
            DRAIN_CLOSE_CODE,
        )
        for channel in channels:
            channel.usable = False  # offered no new sender; what it was told still completes
        if self._cluster is not None:
            self._cluster.stop_advertising()  # other nodes stop offering senders here
        closing = [loop.create_task(self._close_when_idle(channel)) for channel in channels]
        drained = loop.create_task(self._drained(closing))
        interrupted = loop.create_task(self._stop_draining.wait())
        try:
            await asyncio.wait({drained, interrupted}, timeout=grace, return_when="FIRST_COMPLETED")
        finally:
            for task in (drained, interrupted, *closing):
                task.cancel()
            await asyncio.gather(drained, interrupted, *closing, return_exceptions=True)
        live = {id(c) for c in self._legs.connections()}
        cut_connections = sum(1 for c in connections if id(c) in live)
        cut_requests = len(set(requests) & set(self.http.live_exchanges()))
        later = len(live) - cut_connections  # joined during the drain (offered before it)
        logger.info(
            "drain over after %.1fs%s: %d of %d connection(s) and %d of %d HTTP request(s) "
            "finished, %d cut%s",
            loop.time() - started,
            " (stopped by a second signal)" if self._stop_draining.is_set() else "",
            len(connections) - cut_connections,
            len(connections),
            len(requests) - cut_requests,
            len(requests),
            cut_connections + cut_requests,
            f" (and {later} joined during the drain)" if later else "",
        )
        await self.aclose(close_wait=0.0 if self._stop_draining.is_set() else None)

    def stop_draining(self) -> None:
        """End a drain's wait now (a second SIGTERM/SIGINT): what is left is closed."""
        self._stop_draining.set()

    async def _close_when_idle(self, channel: ControlChannel) -> None:
        """Close ``channel`` (1012) once no HTTP request waits for its answer on it."""
        await self.http.wait_exchanges(channel)
        await close_channels(self.broker, [channel], DRAIN_CLOSE_CODE, DRAIN_CLOSE_REASON)

    async def _drained(self, closing: Sequence[asyncio.Task[None]]) -> None:
        """Return once the control channels are closed and nothing relayed is left."""
        await asyncio.gather(*closing)
        await self.http.wait_exchanges()
        await self._legs.wait_gone()

    async def aclose(self, *, close_wait: float | None = None) -> None:
        """Stop accepting, close control channels (1001), end spliced connections, stop.

        Spliced connections get ``close_wait`` seconds (default 5) to answer their close
        frames before they are dropped.
        """
        if self._closing:
            await self._closed.wait()
            return
        # 1. New requests are answered 503 from here on (see _dispatch); the ingress ports
        #    stop accepting and reset the connections that have no listener yet.
        self._draining = self._closing = True
        await asyncio.gather(*(ingress.aclose() for ingress in self.ingress))
        # 2. Listeners learn at once (1001) and stop being offered senders.
        channels = list(self.broker.channels())
        for channel in channels:
            self.broker.unregister(channel)
        await asyncio.gather(
            *(c.socket.aclose(CloseCode.GOING_AWAY, "relay shutting down") for c in channels),
            return_exceptions=True,
        )
        if self._cluster is not None:
            await self._cluster.aclose()  # leaves the cluster: no more offers from other nodes
        # 3. Spliced connections get a close frame (1001) on both legs; their peers answer and
        #    the splices end by themselves, within a bounded time.
        await self._legs.close(_SHUTDOWN_GRACE if close_wait is None else close_wait)
        # 4. Stop the HTTP servers (closes what is left) and the store.
        if self._runner is not None:
            await _stop_accepting(self._runner)
            self.gate.close_waiting()
            if self._front is not None:
                self._front.close_all()
            await self._runner.cleanup()
        if self.dashboard is not None:
            await self.dashboard.aclose()  # its event streams end, then the listener
        if self._management_runner is not None:
            await _stop_accepting(self._management_runner)
            await self._management_runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        self.observer.refusals.report_suppressed()  # the count of a flood that stopped
        self.store.close()
        if self._own_store is not None:
            await self._own_store.aclose()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        """``ws(s)://host:port`` of the first listening socket."""
        host = self.config.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'wss' if self._ssl else 'ws'}://{host}:{self.port}"

    @property
    def public_endpoint(self) -> str:
        """The ``Endpoint`` of this relay's connection strings: ``sb://host:port/`` with TLS
        (the SDKs dial wss), the ``ws://`` base without (PROTOCOL.md 3.1)."""
        base = (self.config.server.public_base_url or self.base_url).rstrip("/")
        if base.startswith(("wss://", "https://")):
            base = "sb://" + base.split("://", 1)[1]
        return base + "/"

    def _rendezvous_base(self) -> str:
        """The base of rendezvous addresses naming this node (cluster offers to other nodes'
        listeners): ``server.public_base_url``, else this node's own base URL (a worker's:
        with the worker's own port)."""
        base = (self.config.server.public_base_url or self.base_url).rstrip("/")
        return with_port(base, self._worker_port) if self._worker_port else base

    @property
    def worker_base_url(self) -> str | None:
        """A worker's (``serve --workers``) own base URL, which its rendezvous addresses name;
        None when this process is not a worker."""
        return self._rendezvous_base() if self._worker_port else None

    @property
    def management_port(self) -> int:
        return self._management_port

    @property
    def management_url(self) -> str | None:
        """``http(s)://host:port`` of the management listener; None when it is not served."""
        if not self._management_port:
            return None
        host = self.config.management.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self._management_secure else "http"
        return f"{scheme}://{host}:{self._management_port}"

    def public_base(self, request: web.BaseRequest) -> str:
        """Base of rendezvous URLs for a *listener's* request: configured, else the scheme and
        Host the listener used. Never taken from a sender's request: a sender's Host header
        would otherwise send the listener's rendezvous to a host of the sender's choosing."""
        if self.config.server.public_base_url:
            base = self.config.server.public_base_url.rstrip("/")
        else:
            host = request.host or f"{self.config.server.host}:{self.port}"
            base = f"{'wss' if self._ssl else 'ws'}://{host}"
        # A worker's shared port reaches any worker: its own port reaches this one.
        return with_port(base, self._worker_port) if self._worker_port else base

    # -- routing ---------------------------------------------------------------------------

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        if not raw_path.startswith(HC_PREFIX):
            if is_runtime_info_request(request, raw_query):
                return await runtime_info(
                    request,
                    raw_path,
                    self._context,
                    secure=self._ssl is not None,
                    loaded_at=self._loaded_at,
                )
            if self._draining:
                return error_response(503, "The relay is shutting down.")
            if is_websocket_upgrade(request):
                return await self.upgrades.handle(request, raw_path, raw_query)
            return await self.http.handle_sender_request(request, raw_path, raw_query)
        params = protocol_params(raw_query)
        action = params.get("sb-hc-action")
        try:
            path = unquote(raw_path[len(HC_PREFIX) :], errors="strict")
        except UnicodeDecodeError:
            return error_response(404, "Malformed path.")
        if self._closing:
            return error_response(503, "The relay is shutting down.")
        is_upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if action in ("accept", "request") or STATUS_CODE_PARAM in params:
            if not is_upgrade:
                return error_response(400, "A WebSocket upgrade is required.")
            if action == "request":
                return await self.http.handle_request_rendezvous(request, params)
            return await self.websocket.handle_accept(request, params)
        if action not in ("listen", "connect"):
            return error_response(400, f"Unknown sb-hc-action {action!r}.")
        if self._draining:  # a rendezvous above may still complete what was offered before
            return error_response(503, "The relay is shutting down.")
        if not is_upgrade:
            return error_response(400, "A WebSocket upgrade is required.")
        if action == "listen":  # a listener names its entity exactly: no suffix
            return await self._listen.handle(request, path, params)
        resolved = resolve_entity(path, self.store.get)
        if resolved is None:
            return error_response(404, "The hybrid connection does not exist.")
        entity, suffix = resolved
        return await self.websocket.handle_connect(request, entity, suffix, raw_query, params)


async def _stop_accepting(runner: web.BaseRunner) -> None:
    """Stop taking connections on ``runner``'s sockets, and let those already taken reach the
    server, before the runner closes the sockets.

    On asyncio's selector loop (Python 3.11) a connection accepted in the same loop iteration
    as ``Server.close()`` is attached after it, fails an assertion inside asyncio and is
    leaked: its client waits for an answer that never comes (a listener redialling the moment
    a drain closed its channel waited out its own timeout). Removing the reader first and
    yielding twice lets those connections be made (and then closed by the runner); uvloop
    accepts differently and needs none of this.
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return
    for site in runner.sites:
        for sock in getattr(site._server, "sockets", None) or ():
            loop.remove_reader(sock.fileno())
    for _ in range(2):  # the accept task, then connection_made
        await asyncio.sleep(0)


async def _listen(
    runner: web.BaseRunner,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    shared: bool = False,
) -> int:
    """Start a site of ``runner``; the port it got (``port`` 0 picks one). ``shared``: with
    SO_REUSEPORT, the port of every worker of ``serve --workers``."""
    site = web.TCPSite(
        runner,
        host,
        port,
        ssl_context=ssl_context,
        backlog=1024,
        reuse_address=True,
        reuse_port=shared or None,
    )
    await site.start()
    listening = site._server
    assert listening is not None
    sockets = list(getattr(listening, "sockets", ()))
    return int(sockets[0].getsockname()[1])


def _local_first(config: RelayConfig) -> bool:
    """``store.spread`` as the cluster broker takes it: ``auto`` is local-first for the
    workers of one machine (the kernel already spreads their senders and listeners evenly, and
    a sender handed to another worker costs an offer through Redis: DECISIONS D22)."""
    spread = config.store.spread
    return spread == "local-first" or (spread == "auto" and config.server.workers > 1)
