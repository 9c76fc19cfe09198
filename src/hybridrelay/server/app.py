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

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.protocol.addressing import (
    HC_PREFIX,
    STATUS_CODE_PARAM,
    UNDESCRIBED_REJECTION,
    parse_accept_params,
    protocol_params,
    resolve_entity,
)
from hybridrelay.protocol.websocket import HandshakeError, handshake_headers
from hybridrelay.server.access import AUTH_HEADER, Access, request_token
from hybridrelay.server.broker import (
    Accepted,
    Broker,
    Connection,
    LocalBroker,
    PendingRendezvous,
    Rejection,
    Unanswered,
    remote_endpoint,
)
from hybridrelay.server.config import HybridConnectionConfig, LimitsConfig, RelayConfig
from hybridrelay.server.control_channel import ListenEndpoint
from hybridrelay.server.http_relay import HttpRelay
from hybridrelay.server.ingress import RelayIngress
from hybridrelay.server.legs import RelayedLegs
from hybridrelay.server.responses import error_response, reason_phrase, tracking_id
from hybridrelay.server.runtime_info import (
    error_xml,
    is_runtime_info_request,
    runtime_info_response,
)
from hybridrelay.server.store import EntityStore, InMemoryEntityStore
from hybridrelay.transport.base import CloseCode
from hybridrelay.transport.splice import take_over

__all__ = ["RelayServer"]

logger = logging.getLogger("hybridrelay.server")

#: How long a shutdown waits for spliced connections to finish their close handshakes.
_SHUTDOWN_GRACE = 5.0
# Request headers that are the relay's business and never reach the listener in connectHeaders.
_PRIVATE_HEADERS = frozenset({AUTH_HEADER.lower()})


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
        self.http = HttpRelay(
            settings=self._settings,
            store=self.store,
            access=self.access,
            broker=self.broker,
        )
        self._listen = ListenEndpoint(
            settings=self._settings,
            store=self.store,
            access=self.access,
            broker=self.broker,
            http=self.http,
            public_base=self.public_base,
        )
        #: The relay's own TCP ports (``ingress:``).
        self.ingress = [
            RelayIngress(
                entry, broker=self.broker, store=self.store, limits=self._limits, legs=self._legs
            )
            for entry in config.ingress
        ]

    def _settings(self) -> RelayConfig:
        return self.config

    def _limits(self) -> LimitsConfig:
        return self.config.limits

    # -- configuration -------------------------------------------------------------------------

    def replace_config(self, new: RelayConfig) -> None:
        """Run with ``new`` from now on.

        Takes effect for what comes next: limits are read when used (a new sender's rendezvous
        timeout and the pending bound, a new HTTP request's deadline, a new listener's limit and
        keep-alive, a channel's next renewal grace), ``namespace_host``,
        ``auto_create_hybrid_connections`` and the public base URL; and, when the relay was
        started without a ``store``, the hybrid connections and namespace rules (an entity
        created on first listen is kept). Connections already relayed and listeners already
        connected stay. A removed entity's listeners stay connected until they leave, but no
        sender reaches them.

        Needs a restart, and is refused here (:class:`ConfigurationError`): the ``server``
        section (address, port, TLS) and ``ingress:`` (the ports are bound at start).
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
                return self._runtime_info(request, raw_path)
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
            return await self._handle_accept(request, params)
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
        return await self._handle_connect(request, entity, suffix, raw_query, params)

    # -- E7: runtime information ---------------------------------------------------------------

    def _runtime_info(self, request: web.BaseRequest, raw_path: str) -> web.Response:
        try:
            path = unquote(raw_path.lstrip("/"), errors="strict").strip("/")
        except UnicodeDecodeError:
            path = ""
        entity = self.store.get(path)
        track = tracking_id()
        # Any right on the entity will do; for an unknown path the namespace's rules decide,
        # so that existence is not revealed to a caller without a valid token.
        subject = entity or HybridConnectionConfig(name=path or "-")
        token = request.headers.get("Authorization") or request.headers.get(AUTH_HEADER)
        decision = self.access.authorize(token, subject, Rights.NONE)
        if not decision.allowed:
            return error_xml(decision.status, f"{decision.reason} TrackingId:{track}")
        url = f"{'https' if self._ssl else 'http'}://{request.host}/{path}"
        if entity is None:
            return runtime_info_response(url=url, path=None, created_at=self._loaded_at)
        return runtime_info_response(
            url=url,
            path=entity.name,
            requires_client_authorization=entity.requires_client_authorization,
            user_metadata=entity.user_metadata,
            listener_count=self.broker.listener_count(entity.name),
            created_at=self._loaded_at,
        )

    # -- E2: sender ----------------------------------------------------------------------

    async def _handle_connect(
        self,
        request: web.BaseRequest,
        entity: HybridConnectionConfig,
        suffix: str,
        raw_query: str,
        params: dict[str, str],
    ) -> web.StreamResponse:
        if entity.requires_client_authorization:
            token = request_token(request.headers, params)
            decision = self.access.authorize(token, entity, Rights.SEND, suffix=suffix)
            if not decision.allowed:
                return error_response(decision.status, decision.reason)
        try:
            handshake_headers(request.headers, None)
        except HandshakeError as exc:
            return error_response(exc.status, str(exc))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        connection = Connection(
            params.get("sb-hc-id") or tracking_id(),
            {k: v for k, v in request.headers.items() if k.lower() not in _PRIVATE_HEADERS},
            remote=remote_endpoint(peer),
            suffix=suffix,
            raw_query=raw_query,
        )
        limits = self.config.limits
        async with self.broker.offer(
            entity.name,
            connection,
            max_pending=limits.max_pending_rendezvous,
            rendezvous_timeout=limits.rendezvous_timeout,
        ) as (pending, outcome):
            if isinstance(outcome, Unanswered):
                return error_response(outcome.status, outcome.description)
            assert pending is not None
            return await self._rendezvous_sender(request, entity, pending, outcome)

    async def _rendezvous_sender(
        self,
        request: web.BaseRequest,
        entity: HybridConnectionConfig,
        pending: PendingRendezvous,
        outcome: Accepted | Rejection,
    ) -> web.StreamResponse:
        if isinstance(outcome, Rejection):
            return web.Response(
                status=outcome.status, reason=reason_phrase(outcome.description) or "Error"
            )
        response, sender = await take_over(
            request,
            outcome.subprotocol,
            max_message_size=self.config.limits.max_message_size,
            name=f"{pending.id} on {entity.name!r} (sender)",
            on_lost=self._legs.lost,
        )
        if sender is None:
            return response  # leaving the broker's offer closes the listener's leg
        self._legs.track(sender)
        pending.splice.join(sender)
        return response

    # -- E3 / E4: listener accepts or rejects ---------------------------------------------------

    async def _handle_accept(
        self, request: web.BaseRequest, params: dict[str, str]
    ) -> web.StreamResponse:
        address = parse_accept_params(params)
        pending = self.broker.claim(address.secret, address.connection_id, PendingRendezvous)
        if pending is None:
            return error_response(403, "The rendezvous address is not valid or has expired.")
        if address.rejects:
            if address.status_code is None:
                if not pending.outcome.done():
                    pending.outcome.set_result(Rejection(400, UNDESCRIBED_REJECTION))
                return error_response(400, "sb-hc-statusCode must be an HTTP status code.")
            if not pending.outcome.done():
                pending.outcome.set_result(
                    Rejection(address.status_code, address.status_description)
                )
            return web.Response(status=410, reason="Gone")
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        subprotocol = offered.split(",")[0].strip() or None
        try:
            headers = handshake_headers(request.headers, subprotocol)
        except HandshakeError as exc:
            if not pending.outcome.done():
                pending.outcome.set_result(Rejection(502, "The listener's upgrade failed."))
            return error_response(exc.status, str(exc))
        response, listener = await take_over(
            request,
            subprotocol,
            max_message_size=self.config.limits.max_message_size,
            name=f"{pending.id} on {pending.entity!r} (listener)",
            on_lost=self._legs.lost,
            response_headers=headers,
        )
        if listener is None:
            if not pending.outcome.done():
                pending.outcome.set_result(Rejection(502, "The listener's upgrade failed."))
            return response
        self._legs.track(listener)
        if pending.outcome.done():  # the sender gave up meanwhile
            listener.close_now(CloseCode.GOING_AWAY, "sender went away")
        else:
            pending.splice.listener = listener
            pending.outcome.set_result(Accepted(subprotocol))
        return response
