"""The listener's control channel (E1, PROTOCOL.md 4): admission and the channel's life.

``GET /$hc/{path}?sb-hc-action=listen`` with a token carrying Listen opens a WebSocket the relay
keeps for the listener: the broker offers senders on it (``accept``, ``request``), the listener
renews its token on it and answers relayed HTTP requests on it. The channel lives as long as
its token (plus the grace period) is renewed and the socket answers pings.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import ProtocolError
from hybridrelay.protocol.messages import RenewToken, parse_message
from hybridrelay.server.access import request_token
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.http_relay import CONTROL_MAX_MESSAGE, HttpRelay
from hybridrelay.server.ratelimit import FailureLimiter
from hybridrelay.server.responses import error_response, tracking_id
from hybridrelay.store.base import StoreError, StoreQuotaError
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket, ServerWebSocket
from hybridrelay.transport.base import CloseCode, MessageKind

__all__ = ["ListenEndpoint", "upgrade"]

#: How far the token deadline may drift (the wall clock against the loop's) before the
#: channel's timer is moved.
_DEADLINE_SLACK = 0.5

logger = logging.getLogger("hybridrelay.server")


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
    (PROTOCOL.md 5.6); pings only where ``heartbeat`` is given (control channels); an unmasked
    client frame fails the connection with 1002 (RFC 6455 5.1, which aiohttp does not check).
    """
    return ServerWebSocket(
        protocols=(subprotocol,) if subprotocol else (),
        autoclose=False,
        autoping=True,
        compress=False,
        heartbeat=heartbeat,
        max_msg_size=max_message_size,
    )


class ListenEndpoint:
    """E1: admits listeners and serves their control channels until they end.

    Besides the relay's context (its configuration is read at each use, so a replaced one
    applies to the next listener and the next renewal), it gets the HTTP relaying that reads the
    listeners' responses and the base of the rendezvous addresses for a listener's request.
    """

    def __init__(
        self,
        relay: RelayContext,
        *,
        http: HttpRelay,
        public_base: Callable[[web.BaseRequest], str],
    ) -> None:
        self._relay = relay
        self._http = http
        self._public_base = public_base
        self._failures = FailureLimiter()

    async def handle(
        self, request: web.BaseRequest, path: str, params: dict[str, str]
    ) -> web.StreamResponse:
        # Keyed by source and entity: a storm against one entity does not block others.
        source = f"{request.remote or ''} {path.strip('/').lower()}"
        if self._failures.blocked(source, time.monotonic()):
            return error_response(429, "Too many failed listen attempts; back off and retry.")
        response = await self._listen(request, path, params)
        if response.status in (401, 403, 404):
            self._failures.record_failure(source, time.monotonic())
        if response.status >= 400:
            self._relay.observer.listen_refused(
                path.strip("/"), response.status, response.reason or "", request.remote
            )
        return response

    async def _listen(
        self, request: web.BaseRequest, path: str, params: dict[str, str]
    ) -> web.StreamResponse:
        config = self._relay.config
        token = request_token(request.headers, params)
        entity = self._relay.store.get(path) if path.strip("/") else None
        if entity is None and config.auto_create_hybrid_connections and path.strip("/"):
            candidate = HybridConnectionConfig(name=path.strip("/"))
            decision = self._relay.access.authorize(
                token, candidate, Rights.LISTEN, host=request.host
            )
            if not decision.allowed:
                return error_response(decision.status, decision.reason)
            try:
                entity = await self._relay.store.create(candidate)
            except StoreError as exc:  # quota reached, or the store cannot be written
                return error_response(
                    409 if isinstance(exc, StoreQuotaError) else 503,
                    f"The hybrid connection could not be created: {exc}",
                )
            logger.info("created hybrid connection %r on first listen", candidate.name)
        if entity is None:
            return error_response(404, "The hybrid connection does not exist.")
        decision = self._relay.access.authorize(token, entity, Rights.LISTEN, host=request.host)
        if not decision.allowed:
            logger.debug("listen on %r refused: %s", entity.name, decision.reason)
            return error_response(decision.status, decision.reason)
        limit = config.limits.max_listeners_per_connection
        # On every node of a cluster (their counts as cached, at most a second old: a burst of
        # listeners on several nodes at once may pass it by a few; each node holds its own
        # count to the limit exactly, in register()).
        totals = await self._relay.broker.listener_totals([entity.name])
        if totals[entity.name] >= limit:
            return error_response(429, f"QuotaExceeded: at most {limit} listeners are allowed.")

        keep_alive = config.limits.keep_alive_interval
        ws = upgrade(request, None, max_message_size=CONTROL_MAX_MESSAGE, heartbeat=keep_alive)
        await ws.prepare(request)
        socket_ = AiohttpMessageSocket.server(ws, request)
        listener_id = params.get("sb-hc-id") or tracking_id()
        channel = ControlChannel(
            entity.name,
            listener_id,
            socket_,
            float(decision.expiry or 0),
            request.remote or "",
            self._public_base(request),
            request.host,
        )
        if not self._relay.broker.register(channel, limit):  # raced with another listener
            await socket_.aclose(CloseCode.TRY_AGAIN_LATER, "listener limit reached")
            return ws
        logger.info("listener %s online on %r", listener_id, entity.name)
        self._relay.observer.listener_online(entity.name)
        reason = "closed"
        try:
            reason = await self._serve(channel, entity)
        finally:
            self._relay.broker.unregister(channel)
            self._http.forget_channel(channel)
            socket_.abort()
            self._relay.observer.listener_offline(entity.name, reason)
            logger.info("listener %s offline on %r (%s)", listener_id, entity.name, reason)
        return ws

    async def _serve(self, channel: ControlChannel, entity: HybridConnectionConfig) -> str:
        """Serve the channel until it ends; why it ended (the metrics' ``reason`` label).

        The token's expiry (plus grace) is the deadline: a channel whose token ran out without
        a renewal is closed with 1008 (PROTOCOL.md 4.4, 4.6). One timer for the channel, moved
        when the deadline moves (a renewal, a reload's grace), not one per message: a relayed
        HTTP request brings two messages, and the timers showed in the relay's profile.
        """
        try:
            async with asyncio.timeout_at(self._token_deadline(channel)) as deadline:
                return await self._serve_messages(channel, entity, deadline)
        except TimeoutError:
            channel.usable = False
            await channel.socket.aclose(CloseCode.POLICY_VIOLATION, "token expired")
            return "token_expired"

    def _token_deadline(self, channel: ControlChannel) -> float:
        grace = self._relay.config.limits.token_grace_period
        now = asyncio.get_running_loop().time()
        return now + max(0.0, channel.token_expiry + grace - time.time())

    async def _serve_messages(
        self, channel: ControlChannel, entity: HybridConnectionConfig, deadline: asyncio.Timeout
    ) -> str:
        while True:
            when = self._token_deadline(channel)
            if abs(when - (deadline.when() or 0.0)) > _DEADLINE_SLACK:
                deadline.reschedule(when)
            message = await channel.socket.receive()
            if message.kind is MessageKind.CLOSE:
                # Answer the listener's close frame with ours (RFC 6455 5.5.1) before the
                # connection is dropped: a listener closing itself waits for that answer.
                channel.usable = False
                await channel.socket.aclose(message.code or CloseCode.NORMAL)
                return "closed"
            if message.kind is MessageKind.BINARY:
                await self._http.on_control_binary(channel, message.data)
                continue
            try:
                parsed = parse_message(message.data)
            except ProtocolError as exc:
                channel.usable = False
                await channel.socket.aclose(CloseCode.PROTOCOL_ERROR, str(exc)[:100])
                return "protocol_error"
            if isinstance(parsed, RenewToken):
                # The entity as served now: its rules may have been rotated since the listen.
                current = self._relay.store.get(entity.name)
                decision = (
                    self._relay.access.authorize(
                        parsed.token,
                        current,
                        Rights.LISTEN,
                        self._relay.config.limits.token_grace_period,
                        host=channel.host,
                    )
                    if current is not None
                    else None
                )
                if decision is None or not decision.allowed:
                    channel.usable = False
                    await channel.socket.aclose(CloseCode.POLICY_VIOLATION, "token renewal failed")
                    return "renewal_refused"
                channel.token_expiry = float(decision.expiry or 0)
            elif parsed is not None:
                if not await self._http.on_control_message(channel, parsed):
                    channel.usable = False
                    await channel.socket.aclose(CloseCode.PROTOCOL_ERROR, "unexpected message")
                    return "protocol_error"
