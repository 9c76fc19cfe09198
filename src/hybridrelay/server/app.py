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
from urllib.parse import unquote

from aiohttp import web

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.addressing import (
    HC_PREFIX,
    STATUS_CODE_PARAM,
    protocol_params,
    resolve_entity,
)
from hybridrelay.server.access import Access
from hybridrelay.server.broker import Broker, LocalBroker
from hybridrelay.server.config import RelayConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.control_channel import ListenEndpoint
from hybridrelay.server.http_relay import HttpRelay
from hybridrelay.server.ingress import RelayIngress
from hybridrelay.server.legs import RelayedLegs
from hybridrelay.server.responses import error_response
from hybridrelay.server.runtime_info import is_runtime_info_request, runtime_info
from hybridrelay.server.store import EntityStore, InMemoryEntityStore
from hybridrelay.server.websocket_relay import WebSocketRelay
from hybridrelay.transport.base import CloseCode

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
        store: EntityStore | None = None,
        broker: Broker | None = None,
    ) -> None:
        #: The configuration of the moment: every limit is read from here when it is used, so
        #: :meth:`replace_config` takes effect for what comes next.
        self.config = config
        #: Set when the entities and rules are the configuration's (no ``store`` given).
        self._config_store: InMemoryEntityStore | None = None
        if store is None:
            store = self._config_store = InMemoryEntityStore.from_config(config)
        self.store: EntityStore = store
        self.broker: Broker = broker or LocalBroker()
        #: The authorization check every endpoint uses.
        self.access = Access(self.store, self._settings)
        #: Reported as CreatedAt/UpdatedAt of configured entities (E7): the file has no dates.
        self._loaded_at = datetime.datetime.now(datetime.UTC)
        #: Legs of relayed connections, for the ordered shutdown.
        self._legs = RelayedLegs()
        self._runner: web.ServerRunner | None = None
        self._port = 0
        self._closing = False
        self._closed = asyncio.Event()
        self._ssl = self._ssl_context() if config.server.tls else None
        #: What the endpoints use of the relay.
        self._context = RelayContext(
            self._settings, self.store, self.access, self.broker, self._legs
        )
        self.http = HttpRelay(self._context)
        self.websocket = WebSocketRelay(self._context)
        self._listen = ListenEndpoint(self._context, http=self.http, public_base=self.public_base)
        #: The relay's own TCP ports (``ingress:``).
        self.ingress = [RelayIngress(entry, self._context) for entry in config.ingress]

    def _settings(self) -> RelayConfig:
        return self.config

    # -- configuration -------------------------------------------------------------------------

    def replace_config(self, new: RelayConfig) -> None:
        """Run with ``new`` from now on.

        Takes effect for what comes next: limits are read when used (a new sender's rendezvous
        timeout and the pending bound, a new HTTP request's deadline, a new listener's limit and
        keep-alive, a channel's next renewal grace), ``namespace_host`` and
        ``auto_create_hybrid_connections``; and, when the relay was
        started without a ``store``, the hybrid connections and namespace rules (an entity
        created on first listen is kept). Connections already relayed and listeners already
        connected stay. A removed entity's listeners stay connected until they leave, but no
        sender reaches them.

        Needs a restart, and is refused here (:class:`ConfigurationError`): the ``server``
        section (address, port, TLS, public base URL) and ``ingress:`` (the ports are bound at
        start).
        ``limits.idle_timeout`` applies to connections made after a restart only (aiohttp takes
        it when the server starts).
        """
        old = self.config
        if new.server != old.server:
            raise ConfigurationError("the server section (address, TLS) changes on restart only")
        if new.ingress != old.ingress:
            raise ConfigurationError("ingress ports change on restart only")
        if self._config_store is not None:
            self._config_store.replace(new.authorization_rules, new.hybrid_connections)
        self.config = new
        logger.info("configuration replaced")

    # -- lifecycle -----------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        tls = self.config.server.tls
        assert tls is not None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load TLS certificate/key: {exc}") from exc
        return context

    async def start(self) -> None:
        """Bind and start serving; returns once the socket is listening."""
        # aiohttp's low-level server: routing is ours (one catch-all), so the Application,
        # router and middleware layers would only cost memory per connection (~2 KiB per
        # relayed connection, measured) and CPU per request.
        # keepalive_timeout also bounds the wait for a connection's first request (aiohttp
        # starts it at connection_made): one that never sends one does not stay for ever.
        server = web.Server(
            self._dispatch,
            access_log=None,
            max_field_size=32768,
            keepalive_timeout=self.config.limits.idle_timeout,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.config.server.host,
            self.config.server.port,
            ssl_context=self._ssl,
            backlog=1024,
            reuse_address=True,
        )
        await site.start()
        listening = site._server
        assert listening is not None
        sockets = list(getattr(listening, "sockets", ()))
        self._port = int(sockets[0].getsockname()[1])
        logger.info("relay listening on %s", self.base_url)
        for ingress in self.ingress:
            try:
                await ingress.start()
            except OSError as exc:
                await self.aclose()
                raise ConfigurationError(
                    f"ingress {ingress.config.label}: cannot listen: {exc.strerror or exc}"
                ) from exc

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
        # 4. Stop the HTTP server (closes what is left).
        if self._runner is not None:
            await self._runner.cleanup()
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
