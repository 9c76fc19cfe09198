"""The relay server: HTTP(S) and WebSocket endpoints of Hybrid Connections on one port.

Endpoints (PROTOCOL.md section 2):

* ``GET /$hc/{path}?sb-hc-action=listen``  — listener control channel (E1)
* ``GET /$hc/{path}[/suffix]?...sb-hc-action=connect`` — sender WebSocket (E2)
* ``GET {accept address}``                 — listener's rendezvous (E3) or reject (E4)
* ``{METHOD} /{path}[/suffix]``            — HTTP request relaying (E6), see ``http_relay.py``

Nothing here logs a token, a key or a rendezvous address; aiohttp's access log is off because
request targets carry ``sb-hc-token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from hybridrelay.auth.cache import AuthCache
from hybridrelay.auth.sas import AuthDecision, AuthorizationRule, Rights
from hybridrelay.exceptions import ConfigurationError, ProtocolError, RelayConnectionError
from hybridrelay.protocol.addressing import (
    HC_PREFIX,
    build_relay_url,
    filter_query,
    protocol_params,
    resolve_entity,
)
from hybridrelay.protocol.messages import (
    Accept,
    RemoteEndpoint,
    RenewToken,
    encode_message,
    parse_message,
)
from hybridrelay.protocol.websocket import HandshakeError, handshake_headers
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig
from hybridrelay.server.ingress import RelayIngress
from hybridrelay.server.ratelimit import FailureLimiter
from hybridrelay.server.registry import ControlChannel, InMemoryListenerRegistry, ListenerRegistry
from hybridrelay.server.rendezvous import (
    Accepted,
    PendingRendezvous,
    Rejection,
    RendezvousTable,
    Unanswered,
)
from hybridrelay.server.runtime_info import (
    error_xml,
    is_runtime_info_request,
    runtime_info_response,
)
from hybridrelay.server.store import EntityStore, InMemoryEntityStore
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import CloseCode, MessageKind
from hybridrelay.transport.splice import RawLeg, SpliceLeg, take_over

__all__ = ["RelayServer"]

logger = logging.getLogger("hybridrelay.server")

_AUTH_HEADER = "ServiceBusAuthorization"
#: How long a shutdown waits for spliced connections to finish their close handshakes.
_SHUTDOWN_GRACE = 5.0
# Request headers that are the relay's business and never reach the listener in connectHeaders.
_PRIVATE_HEADERS = frozenset({"servicebusauthorization"})


def tracking_id() -> str:
    return str(uuid.uuid4())


def _reason(text: str) -> str:
    """A reason phrase that is safe on a status line (no CR/LF, printable, bounded)."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return cleaned[:512] or "Error"


def error_response(status: int, description: str, track: str | None = None) -> web.Response:
    """An error answer whose reason phrase carries a TrackingId, as Azure's do."""
    track = track or tracking_id()
    text = f"{description} TrackingId:{track}"
    return web.Response(status=status, reason=_reason(text), text=text + "\n")


def upgrade(
    request: web.BaseRequest,
    subprotocol: str | None,
    *,
    max_message_size: int,
    heartbeat: float | None = None,
) -> web.WebSocketResponse:
    """The server side of one of our WebSockets, before ``prepare``.

    ``autoclose=False``: a close frame is reported, not answered, so half-close crosses the
    relay (docs/DECISIONS.md D2); ``compress=False``: no extension is ever negotiated
    (PROTOCOL.md 5.6); pings only where ``heartbeat`` is given (control channels).
    """
    return web.WebSocketResponse(
        protocols=(subprotocol,) if subprotocol else (),
        autoclose=False,
        autoping=True,
        compress=False,
        heartbeat=heartbeat,
        max_msg_size=max_message_size,
    )


def _request_token(request: web.BaseRequest, params: dict[str, str]) -> str | None:
    # Query first, then the header (PROTOCOL.md 3.4).
    return params.get("sb-hc-token") or request.headers.get(_AUTH_HEADER)


class RelayServer:
    """A Hybrid Connections relay.

    Usage::

        async with RelayServer(RelayConfig.load("relay.yaml")) as server:
            print(server.base_url)
            await server.wait_closed()
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        store: EntityStore | None = None,
        registry: ListenerRegistry | None = None,
    ) -> None:
        self.config = config
        self.store: EntityStore = store or InMemoryEntityStore.from_config(config)
        self.registry: ListenerRegistry = registry or InMemoryListenerRegistry()
        self._rendezvous = RendezvousTable(config.limits.max_pending_rendezvous)
        self._listen_failures = FailureLimiter()
        self._auth_cache = AuthCache()
        #: Reported as CreatedAt/UpdatedAt of configured entities (E7): the file has no dates.
        self._loaded_at = datetime.datetime.now(datetime.UTC)
        #: Legs of relayed connections (senders' and listeners' rendezvous sockets), for the
        #: ordered shutdown.
        self._legs: set[SpliceLeg | RawLeg] = set()
        self._legs_gone = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        self._port = 0
        self._closing = False
        self._closed = asyncio.Event()
        self._ssl = self._ssl_context() if config.server.tls else None
        # Imported here: the HTTP relaying module depends on the pieces above.
        from hybridrelay.server.http_relay import HttpRelay

        self.http = HttpRelay(self)
        #: The relay's own TCP ports (``ingress:``).
        self.ingress = [RelayIngress(self, entry) for entry in config.ingress]

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
        channels = list(self.registry.all())
        for channel in channels:
            self.registry.remove(channel)
        await asyncio.gather(
            *(c.socket.aclose(CloseCode.GOING_AWAY, "relay shutting down") for c in channels),
            return_exceptions=True,
        )
        # 3. Spliced connections get a close frame (1001) on both legs; their peers answer and
        #    the splices end by themselves, within a bounded time.
        for leg in list(self._legs):
            leg.send_close(CloseCode.GOING_AWAY, "relay shutting down")
            leg.expect_close_answer()
        if self._legs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SHUTDOWN_GRACE):
                    await self._legs_gone.wait()
            for leg in list(self._legs):  # no answer within the grace period
                leg.abort()
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
        if action in ("accept", "request") or "sb-hc-statusCode" in params:
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
            return await self._handle_listen(request, path, params)
        resolved = resolve_entity(path, self.store.get)
        if resolved is None:
            return error_response(404, "The hybrid connection does not exist.")
        entity, suffix = resolved
        return await self._handle_connect(request, entity, suffix, raw_query, params)

    def rules_for(self, entity: HybridConnectionConfig) -> Sequence[AuthorizationRule]:
        return (*entity.authorization_rules, *self.store.namespace_rules())

    def authorize(
        self,
        token: str | None,
        entity: HybridConnectionConfig,
        required: Rights,
        grace: float = 0,
        *,
        suffix: str = "",
    ) -> AuthDecision:
        """The token must cover the request's whole path: ``entity`` and the request's
        ``suffix`` below it (PROTOCOL.md 3.5); listeners and renewals have no suffix."""
        return self._auth_cache.authorize(
            token,
            rules=self.rules_for(entity),
            entity_path=entity.name,
            suffix=suffix,
            required=required,
            now=time.time(),
            namespace_host=self.config.namespace_host,
            grace_seconds=grace,
        )

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
        token = request.headers.get("Authorization") or request.headers.get(_AUTH_HEADER)
        decision = self.authorize(token, subject, Rights.NONE)
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
            listener_count=self.registry.count(entity.name),
            created_at=self._loaded_at,
        )

    # -- E1: listener control channel ---------------------------------------------------------

    async def _handle_listen(
        self,
        request: web.BaseRequest,
        path: str,
        params: dict[str, str],
    ) -> web.StreamResponse:
        # Keyed by source and entity: a storm against one entity does not block others.
        source = f"{request.remote or ''} {path.strip('/').lower()}"
        if self._listen_failures.blocked(source, time.monotonic()):
            return error_response(429, "Too many failed listen attempts; back off and retry.")
        response = await self._listen(request, path, params)
        if response.status in (401, 403, 404):
            self._listen_failures.record_failure(source, time.monotonic())
        return response

    async def _listen(
        self,
        request: web.BaseRequest,
        path: str,
        params: dict[str, str],
    ) -> web.StreamResponse:
        entity = self.store.get(path) if path.strip("/") else None
        if entity is None and self.config.auto_create_hybrid_connections and path.strip("/"):
            candidate = HybridConnectionConfig(name=path.strip("/"))
            decision = self.authorize(_request_token(request, params), candidate, Rights.LISTEN)
            if not decision.allowed:
                return error_response(decision.status, decision.reason)
            self.store.create(candidate)
            logger.info("created hybrid connection %r on first listen", candidate.name)
            entity = candidate
        if entity is None:
            return error_response(404, "The hybrid connection does not exist.")
        decision = self.authorize(_request_token(request, params), entity, Rights.LISTEN)
        if not decision.allowed:
            logger.info("listen on %r refused: %s", entity.name, decision.reason)
            return error_response(decision.status, decision.reason)
        limit = self.config.limits.max_listeners_per_connection
        if self.registry.count(entity.name) >= limit:
            return error_response(429, f"QuotaExceeded: at most {limit} listeners are allowed.")

        keep_alive = self.config.limits.keep_alive_interval
        ws = upgrade(request, None, max_message_size=65536 * 4, heartbeat=keep_alive)
        await ws.prepare(request)
        socket_ = AiohttpMessageSocket.server(ws, request)
        listener_id = params.get("sb-hc-id") or tracking_id()
        channel = ControlChannel(
            entity.name,
            listener_id,
            socket_,
            float(decision.expiry or 0),
            request.remote or "",
            self.public_base(request),
        )
        if not self.registry.add(channel, limit):  # raced with another listener
            await socket_.aclose(CloseCode.TRY_AGAIN_LATER, "listener limit reached")
            return ws
        logger.info("listener %s online on %r", listener_id, entity.name)
        try:
            await self._serve_control_channel(channel, entity)
        finally:
            self.registry.remove(channel)
            self.http.forget_channel(channel)
            socket_.abort()
            logger.info("listener %s offline on %r", listener_id, entity.name)
        return ws

    async def _serve_control_channel(
        self, channel: ControlChannel, entity: HybridConnectionConfig
    ) -> None:
        grace = self.config.limits.token_grace_period
        loop = asyncio.get_running_loop()
        while True:
            # The token's expiry (plus grace) is the read deadline: a channel whose token ran
            # out without a renewal is closed with 1008 (PROTOCOL.md 4.4, 4.6).
            deadline = loop.time() + max(0.0, channel.token_expiry + grace - time.time())
            try:
                async with asyncio.timeout_at(deadline):
                    message = await channel.socket.receive()
            except TimeoutError:
                channel.usable = False
                await channel.socket.aclose(CloseCode.POLICY_VIOLATION, "token expired")
                return
            if message.kind is MessageKind.CLOSE:
                return
            if message.kind is MessageKind.BINARY:
                await self.http.on_control_binary(channel, message.data)
                continue
            try:
                parsed = parse_message(message.data)
            except ProtocolError as exc:
                channel.usable = False
                await channel.socket.aclose(CloseCode.PROTOCOL_ERROR, str(exc)[:100])
                return
            if isinstance(parsed, RenewToken):
                decision = self.authorize(parsed.token, entity, Rights.LISTEN, grace)
                if not decision.allowed:
                    channel.usable = False
                    await channel.socket.aclose(CloseCode.POLICY_VIOLATION, "token renewal failed")
                    return
                channel.token_expiry = float(decision.expiry or 0)
            elif parsed is not None:
                if not await self.http.on_control_message(channel, parsed):
                    channel.usable = False
                    await channel.socket.aclose(CloseCode.PROTOCOL_ERROR, "unexpected message")
                    return

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
            token = _request_token(request, params)
            decision = self.authorize(token, entity, Rights.SEND, suffix=suffix)
            if not decision.allowed:
                return error_response(decision.status, decision.reason)
        try:
            handshake_headers(request.headers, None)
        except HandshakeError as exc:
            return error_response(exc.status, str(exc))
        connection_id = params.get("sb-hc-id") or tracking_id()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _PRIVATE_HEADERS}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        async with self.listener_rendezvous(
            entity, connection_id, headers=headers, peer=peer, suffix=suffix, raw_query=raw_query
        ) as (pending, outcome):
            if isinstance(outcome, Unanswered):
                return error_response(outcome.status, outcome.description)
            assert pending is not None
            return await self._rendezvous_sender(request, entity, connection_id, pending, outcome)

    @contextlib.asynccontextmanager
    async def listener_rendezvous(
        self,
        entity: HybridConnectionConfig,
        connection_id: str,
        *,
        headers: dict[str, str],
        peer: Any,
        suffix: str = "",
        raw_query: str = "",
    ) -> AsyncIterator[tuple[PendingRendezvous | None, Accepted | Rejection | Unanswered]]:
        """Offer a new connection to a listener of ``entity`` and wait for its answer.

        Yields the pending rendezvous and the outcome: :class:`Accepted` (the listener's leg
        is ``pending.splice.listener``: join the sender's leg to it before leaving the block),
        the listener's :class:`Rejection`, or :class:`Unanswered` (no listener, too many
        pending connections, or no answer within the rendezvous timeout). On leaving, the
        rendezvous is forgotten and a listener leg that was not joined is closed.
        """
        if not self.registry.candidates(entity.name):
            yield None, Unanswered(404, "There are no listeners connected for the endpoint.")
            return
        pending = self._rendezvous.create(connection_id, entity.name)
        if pending is None:
            yield None, Unanswered(503, "Too many pending connections; try again later.")
            return
        try:
            offer = functools.partial(
                self._offer, entity, suffix, raw_query, headers, peer, connection_id, pending
            )
            channel = await offer(self.registry.candidates(entity.name))
            if channel is None:
                outcome: Accepted | Rejection | Unanswered = Unanswered(
                    404, "There are no listeners connected for the endpoint."
                )
            else:
                answer = await self._await_listener(entity, pending, channel, offer)
                outcome = answer or Unanswered(
                    504, "The listener did not accept the connection in time."
                )
            yield pending, outcome
        finally:
            self._rendezvous.discard(pending)
            if not pending.outcome.done():
                pending.outcome.cancel()
            pending.splice.abandon("sender went away")

    async def _offer(
        self,
        entity: HybridConnectionConfig,
        suffix: str,
        raw_query: str,
        headers: dict[str, str],
        peer: Any,
        connection_id: str,
        pending: PendingRendezvous,
        candidates: Sequence[ControlChannel],
    ) -> ControlChannel | None:
        """Send the ``accept`` to one usable listener; the one that took it, or None.

        A method of its own so that the accept message is garbage once it returns, not held
        for the connection's lifetime.
        """
        texts: dict[str, str] = {}

        def accept_text(base_url: str) -> str:
            if base_url not in texts:
                address = build_relay_url(
                    base_url,
                    entity.name,
                    action="accept",
                    suffix=quote(suffix, safe="/"),
                    app_query=filter_query(raw_query),
                    params={"sb-hc-id": connection_id, "sb-hc-rendezvous": pending.secret},
                )
                accept = Accept(
                    address=address,
                    id=connection_id,
                    connect_headers=headers,
                    remote_endpoint=RemoteEndpoint(str(peer[0]), int(peer[1]))
                    if isinstance(peer, tuple) and len(peer) >= 2
                    else None,
                )
                texts[base_url] = encode_message(accept)
            return texts[base_url]

        for channel in candidates:  # never hand a sender to a dead listener: try the next one
            try:
                await channel.send(accept_text(channel.base_url))
            except RelayConnectionError:
                self.registry.remove(channel)
                continue
            return channel
        return None

    async def _await_listener(
        self,
        entity: HybridConnectionConfig,
        pending: PendingRendezvous,
        channel: ControlChannel,
        offer: Callable[[Sequence[ControlChannel]], Awaitable[ControlChannel | None]],
    ) -> Accepted | Rejection | None:
        """The listener's answer, or None when none came within the rendezvous timeout.

        If the control channel of the listener that was told goes away before it answers, the
        sender is offered to another listener at once instead of waiting out the timeout (the
        rendezvous address is single use, so a late answer from the first one is refused).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.limits.rendezvous_timeout
        tried = {channel}
        while not pending.outcome.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.wait(
                (pending.outcome, channel.closed), timeout=remaining, return_when="FIRST_COMPLETED"
            )
            if channel.closed.done() and not pending.outcome.done():
                others = [c for c in self.registry.candidates(entity.name) if c not in tried]
                next_channel = await offer(others)
                if next_channel is None:
                    # Nobody else: the first listener may still answer; wait out the deadline.
                    remaining = deadline - loop.time()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, remaining)):
                            await asyncio.shield(pending.outcome)
                    break
                channel = next_channel
                tried.add(channel)
        if not pending.outcome.done() or pending.outcome.cancelled():
            return None
        return pending.outcome.result()

    async def _rendezvous_sender(
        self,
        request: web.BaseRequest,
        entity: HybridConnectionConfig,
        connection_id: str,
        pending: PendingRendezvous,
        outcome: Accepted | Rejection,
    ) -> web.StreamResponse:
        if isinstance(outcome, Rejection):
            return web.Response(status=outcome.status, reason=_reason(outcome.description))
        splice = pending.splice
        response, sender = await take_over(
            request,
            outcome.subprotocol,
            max_message_size=self.config.limits.max_message_size,
            name=f"{connection_id} on {entity.name!r} (sender)",
            on_lost=self.leg_lost,
        )
        if sender is None:
            return response  # the finally of _handle_connect closes the listener's leg
        self.track_leg(sender)
        splice.join(sender)
        return response

    def track_leg(self, leg: SpliceLeg | RawLeg) -> None:
        """Legs live on after their aiohttp handler returned; they are tracked for shutdown.
        ``leg_lost`` must be the leg's ``on_lost``."""
        self._legs.add(leg)
        self._legs_gone.clear()

    def leg_lost(self, leg: SpliceLeg | RawLeg) -> None:
        self._legs.discard(leg)
        if not self._legs:
            self._legs_gone.set()
        logger.debug("%s closed: %d bytes forwarded from it", leg.name, leg.bytes_forwarded)

    # -- E3 / E4: listener accepts or rejects ---------------------------------------------------

    async def _handle_accept(
        self, request: web.BaseRequest, params: dict[str, str]
    ) -> web.StreamResponse:
        pending = self._rendezvous.claim(
            params.get("sb-hc-rendezvous", ""), params.get("sb-hc-id", "")
        )
        if pending is None:
            return error_response(403, "The rendezvous address is not valid or has expired.")
        status = params.get("sb-hc-statusCode")
        if status is not None:
            try:
                code = int(status)
                if not 100 <= code <= 999:
                    raise ValueError
            except ValueError:
                if not pending.outcome.done():
                    pending.outcome.set_result(Rejection(400, "Rejected by listener"))
                return error_response(400, "sb-hc-statusCode must be an HTTP status code.")
            description = params.get("sb-hc-statusDescription") or "Rejected by listener"
            if not pending.outcome.done():
                pending.outcome.set_result(Rejection(code, description))
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
            on_lost=self.leg_lost,
            response_headers=headers,
        )
        if listener is None:
            if not pending.outcome.done():
                pending.outcome.set_result(Rejection(502, "The listener's upgrade failed."))
            return response
        self.track_leg(listener)
        if pending.outcome.done():  # the sender gave up meanwhile
            listener.close_now(CloseCode.GOING_AWAY, "sender went away")
        else:
            pending.splice.listener = listener
            pending.outcome.set_result(Accepted(subprotocol))
        return response
