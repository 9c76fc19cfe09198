"""The relay server: HTTP(S) and WebSocket endpoints of Hybrid Connections on one port.

Endpoints (PROTOCOL.md section 2):

* ``GET /$hc/{path}?sb-hc-action=listen``  — listener control channel (E1), ``control_channel.py``
* ``GET /$hc/{path}[/suffix]?...sb-hc-action=connect`` — sender WebSocket (E2)
* ``GET {accept address}``                 — listener's rendezvous (E3) or reject (E4)
* ``{METHOD} /{path}[/suffix]``            — HTTP request relaying (E6), ``http_relay.py``
* ``GET /{path}?api-version=...``          — runtime information (E7), ``runtime_info.py``

:class:`RelayServer` owns the process's life (start, the ordered shutdown, the configuration
of the moment) and routes each request to its endpoint; pairing senders with listeners is the
broker's (``broker.py``), which every endpoint and the relay's own ingress ports use.

Nothing here logs a token, a key or a rendezvous address; aiohttp's access log is off because
request targets carry ``sb-hc-token``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import Sequence
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
from hybridrelay.server.config import RelayConfig, TlsConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.control_channel import ListenEndpoint
from hybridrelay.server.http_relay import HttpRelay
from hybridrelay.server.ingress import RelayIngress
from hybridrelay.server.legs import RelayedLegs
from hybridrelay.server.malformed import HTTP_LOGGER
from hybridrelay.server.observer import RelayObserver
from hybridrelay.server.request import RelayRequest
from hybridrelay.server.responses import error_response, name_the_server
from hybridrelay.server.runtime_info import is_runtime_info_request, runtime_info
from hybridrelay.server.runtime_view import RelayRuntimeView, close_channels
from hybridrelay.server.store import NamespaceView, file_layer
from hybridrelay.server.websocket_relay import WebSocketRelay
from hybridrelay.store.base import Store, StoreError
from hybridrelay.store.sqlite import MEMORY, SqliteStore
from hybridrelay.transport.base import CloseCode
from hybridrelay.transport.bind import bind_failure

__all__ = ["RelayServer"]

logger = logging.getLogger("hybridrelay.server")

#: How long a shutdown waits for spliced connections to finish their close handshakes.
_SHUTDOWN_GRACE = 5.0


class RelayServer:
    """A Hybrid Connections relay.

    Usage::

        async with RelayServer(RelayConfig.load("relay.yaml")) as server:
            print(server.base_url)
            await server.wait_closed()

    ``store`` holds the entities and namespace rules (default: those of ``config``);
    ``broker`` pairs senders with listeners (default: a :class:`LocalBroker` for the
    listeners connected to this process).
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        store: Store | None = None,
        broker: Broker | None = None,
        observer: RelayObserver | None = None,
    ) -> None:
        #: The configuration of the moment: every limit is read from here when it is used, so
        #: :meth:`replace_config` takes effect for what comes next.
        self.config = config
        #: Reported as CreatedAt/UpdatedAt of configured entities: the file has no dates.
        self._loaded_at = datetime.datetime.now(datetime.UTC)
        #: The management store given, else opened at start (``store.path``, else memory).
        self._given_store = store
        self._own_store: SqliteStore | None = None
        #: The entities and rules served: the file's laid over the store's.
        self.store = NamespaceView(
            config.namespace_name,
            file_layer(config, self._loaded_at.timestamp()),
            on_removed=self._entities_removed,
        )
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
        self._closing = False
        self._closed = asyncio.Event()
        #: Tasks closing the listeners of deleted entities.
        self._tasks: set[asyncio.Task[None]] = set()
        self._ssl = self._ssl_context(config.server.tls)
        #: What the endpoints use of the relay.
        self._context = RelayContext(
            self._settings, self.store, self.access, self.broker, self._legs, self.observer
        )
        self.http = HttpRelay(self._context)
        self.websocket = WebSocketRelay(self._context)
        self._listen = ListenEndpoint(self._context, http=self.http, public_base=self.public_base)
        #: The relay's own TCP ports (``ingress:``).
        self.ingress = [RelayIngress(entry, self._context) for entry in config.ingress]
        self.runtime = RelayRuntimeView(self.broker, self._legs)
        self.arm: ArmApi | None = None
        self.dashboard: Dashboard | None = None
        self.observer.metrics.rendezvous_pending.set_function(lambda: self.broker.pending_count)

    def _settings(self) -> RelayConfig:
        return self.config

    # -- configuration -------------------------------------------------------------------------

    def replace_config(self, new: RelayConfig) -> None:
        """Run with ``new`` from now on.

        Takes effect for what comes next: limits are read when used (a new sender's rendezvous
        timeout and the pending bound, a new HTTP request's deadline, a new listener's limit and
        keep-alive, a channel's next renewal grace), ``namespace_host`` and
        ``auto_create_hybrid_connections``; the file's hybrid connections and namespace rules
        are laid over the store's at once (an entity that leaves the namespace has its
        listeners and pending senders closed, as a deletion through the management API).
        Connections already relayed stay.

        Needs a restart, and is refused here (:class:`ConfigurationError`): the ``server``,
        ``management`` and ``store`` sections and ``ingress:`` (ports are bound and the store
        opened at start). ``limits.idle_timeout`` applies to connections made after a restart
        only (aiohttp takes it when the server starts).
        """
        old = self.config
        for section in ("server", "management", "store", "ingress", "namespace_name"):
            if getattr(new, section) != getattr(old, section):
                raise ConfigurationError(f"the {section} section changes on restart only")
        self.config = new
        layer = file_layer(new, self._loaded_at.timestamp())
        if self.arm is not None:
            self.arm.file_layer = layer
        self.store.replace_file(layer)
        logger.info("configuration replaced")

    def _entities_removed(self, names: Sequence[str]) -> None:
        """Deleted entities: refuse their pending senders, close their listeners (1001)."""
        for name in names:
            channels = self.broker.entity_gone(name)
            logger.info("hybrid connection %r deleted: closing %d listener(s)", name, len(channels))
            if channels:
                task = asyncio.get_running_loop().create_task(
                    close_channels(self.broker, channels, CloseCode.GOING_AWAY, ENTITY_DELETED)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # -- lifecycle -----------------------------------------------------------------------

    @staticmethod
    def _ssl_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
        if tls is None:
            return None
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

    async def start(self) -> None:
        """Open the store, bind and start serving; returns once the sockets are listening."""
        store = self._given_store
        if store is None:
            try:
                store = self._own_store = await SqliteStore.open(
                    self.config.store.path or MEMORY, namespace=self.config.namespace_name
                )
            except StoreError as exc:
                raise ConfigurationError(f"store.path: {exc}") from exc
        self.store.attach(store)
        # aiohttp's low-level server: routing is ours (one catch-all), so the Application,
        # router and middleware layers would only cost memory per connection (~2 KiB per
        # relayed connection, measured) and CPU per request.
        # keepalive_timeout also bounds the wait for a connection's first request (aiohttp
        # starts it at connection_made): one that never sends one does not stay for ever.
        name_the_server()
        loop = asyncio.get_running_loop()
        server = web.Server(
            self._dispatch,
            request_factory=lambda *parts: RelayRequest(*parts, loop),
            logger=HTTP_LOGGER,  # a malformed request: one short line, never its headers
            access_log=None,
            max_field_size=32768,
            keepalive_timeout=self.config.limits.idle_timeout,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        self._port = await _listen(
            self._runner, self.config.server.host, self.config.server.port, self._ssl
        )
        logger.info("relay listening on %s", self.base_url)
        try:
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
            self.broker.listener_count,
            public_endpoint=self.public_endpoint,
        )
        runtime = RuntimeApi(self.runtime, self.arm.authorize_request)
        secure = self._ssl_context(settings.tls) if settings.tls else self._ssl
        self.dashboard = Dashboard(
            state=lambda: self.store.state,
            runtime=self.runtime,
            store=store,
            token_refusal=self.arm.manage_token_refusal,
            totals=self.observer.totals,
            recent_errors=lambda: self.observer.recent_errors,
            secure=secure is not None,
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
            self._management_port = await _listen(
                self._management_runner, settings.host, settings.port or 0, secure
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
        if self._closing:
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

    async def aclose(self) -> None:
        """Stop accepting, close control channels (1001), end spliced connections, stop."""
        if self._closing:
            await self._closed.wait()
            return
        # 1. New requests are answered 503 from here on (see _dispatch); the ingress ports
        #    stop accepting and reset the connections that have no listener yet.
        self._closing = True
        await asyncio.gather(*(ingress.aclose() for ingress in self.ingress))
        # 2. Listeners learn at once (1001) and stop being offered senders.
        channels = list(self.broker.channels())
        for channel in channels:
            self.broker.unregister(channel)
        await asyncio.gather(
            *(c.socket.aclose(CloseCode.GOING_AWAY, "relay shutting down") for c in channels),
            return_exceptions=True,
        )
        # 3. Spliced connections get a close frame (1001) on both legs; their peers answer and
        #    the splices end by themselves, within a bounded time.
        await self._legs.close(_SHUTDOWN_GRACE)
        # 4. Stop the HTTP servers (closes what is left) and the store.
        if self._runner is not None:
            await self._runner.cleanup()
        if self.dashboard is not None:
            await self.dashboard.aclose()  # its event streams end, then the listener
        if self._management_runner is not None:
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
            return self.config.server.public_base_url.rstrip("/")
        host = request.host or f"{self.config.server.host}:{self.port}"
        return f"{'wss' if self._ssl else 'ws'}://{host}"

    # -- routing ---------------------------------------------------------------------------

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        if not raw_path.startswith(HC_PREFIX):
            if is_runtime_info_request(request, raw_query):
                return runtime_info(
                    request,
                    raw_path,
                    self._context,
                    secure=self._ssl is not None,
                    loaded_at=self._loaded_at,
                )
            if self._closing:
                return error_response(503, "The relay is shutting down.")
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
        if not is_upgrade:
            return error_response(400, "A WebSocket upgrade is required.")
        if action == "listen":  # a listener names its entity exactly: no suffix
            return await self._listen.handle(request, path, params)
        resolved = resolve_entity(path, self.store.get)
        if resolved is None:
            return error_response(404, "The hybrid connection does not exist.")
        entity, suffix = resolved
        return await self.websocket.handle_connect(request, entity, suffix, raw_query, params)


async def _listen(
    runner: web.BaseRunner, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> int:
    """Start a site of ``runner``; the port it got (``port`` 0 picks one)."""
    site = web.TCPSite(
        runner, host, port, ssl_context=ssl_context, backlog=1024, reuse_address=True
    )
    await site.start()
    listening = site._server
    assert listening is not None
    sockets = list(getattr(listening, "sockets", ()))
    return int(sockets[0].getsockname()[1])
