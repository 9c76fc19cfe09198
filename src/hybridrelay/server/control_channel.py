"""The listener's control channel (E1, PROTOCOL.md 4): admission and the channel's life.

``GET /$hc/{path}?sb-hc-action=listen`` with a token carrying Listen opens a WebSocket the relay
keeps for the listener: the broker offers senders on it (``accept``, ``request``), the listener
renews its token on it and answers relayed HTTP requests on it. The channel lives as long as
its token (plus the grace period) is renewed and the socket answers pings.

After the 101 the connection is taken from aiohttp (D23): the channel lives on its transport,
a :class:`~hybridrelay.transport.control_leg.ControlLeg`, with no task of its own. Its messages
are handled in the leg's read callback, in order (:class:`_ServedChannel`): a ``response``
and its body go to the HTTP relaying, a ``renewToken`` moves the token's deadline, anything
malformed closes the channel (1002). The deadline is one timer per channel.
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
from hybridrelay.protocol.websocket import HandshakeError, handshake_headers
from hybridrelay.server.access import request_token
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.http_relay import CONTROL_MAX_MESSAGE, HttpRelay
from hybridrelay.server.ratelimit import FailureLimiter
from hybridrelay.server.responses import error_response, tracking_id
from hybridrelay.store.base import StoreError, StoreQuotaError
from hybridrelay.transport.base import CloseCode
from hybridrelay.transport.control_leg import ControlLeg
from hybridrelay.transport.splice import hand_over

__all__ = ["ListenEndpoint"]

#: How far the token deadline may drift (the wall clock against the loop's) before the
#: channel's timer is moved.
_DEADLINE_SLACK = 0.5

logger = logging.getLogger("hybridrelay.server")


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

        try:
            headers = handshake_headers(request.headers, None)
        except HandshakeError as exc:
            return error_response(exc.status, str(exc))
        # Read before the hand-over: from then on the request no longer has a transport.
        remote, host, base_url = request.remote or "", request.host, self._public_base(request)
        keep_alive = config.limits.keep_alive_interval
        response, leg = await hand_over(
            request,
            headers,
            lambda transport: ControlLeg(
                transport, max_message_size=CONTROL_MAX_MESSAGE, keep_alive=keep_alive
            ),
        )
        if leg is None:  # gone during the upgrade
            return response
        listener_id = params.get("sb-hc-id") or tracking_id()
        channel = ControlChannel(
            entity.name,
            listener_id,
            leg,
            float(decision.expiry or 0),
            remote,
            base_url,
            host,
        )
        if not self._relay.broker.register(channel, limit):  # raced with another listener
            leg.start(None)
            leg.close_nowait(CloseCode.TRY_AGAIN_LATER, "listener limit reached")
            return response
        logger.info("listener %s online on %r", listener_id, entity.name)
        self._relay.observer.listener_online(entity.name)
        _ServedChannel(self._relay, self._http, channel, entity.name, leg).start()
        # aiohttp's handler returns now: the connection is no longer aiohttp's.
        return response


class _ServedChannel:
    """One listener's control channel from its 101 to its end: the leg's
    :class:`~hybridrelay.transport.base.MessageSink` and the token's deadline.

    The token's expiry (plus grace) is the deadline: a channel whose token ran out without a
    renewal is closed with 1008 (PROTOCOL.md 4.4, 4.6). One timer for the channel, moved when
    the deadline moves (a renewal, a reload's grace: looked at with each text message and when
    the timer fires), not one per message. When the channel ends, for whatever reason, it is
    unregistered (what waits on it is told) and counted once, with why (the metrics'
    ``reason`` label).
    """

    __slots__ = (
        "_channel",
        "_done",
        "_entity",
        "_http",
        "_leg",
        "_loop",
        "_relay",
        "_timer",
        "_when",
    )

    def __init__(
        self,
        relay: RelayContext,
        http: HttpRelay,
        channel: ControlChannel,
        entity: str,
        leg: ControlLeg,
    ) -> None:
        self._relay = relay
        self._http = http
        self._channel = channel
        self._entity = entity
        self._leg = leg
        self._done = False
        self._timer: asyncio.TimerHandle | None = None
        self._when = 0.0
        #: Kept: the deadline is looked at per message, and on Python 3.11 each look-up of the
        #: running loop is a getpid system call.
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self._follow_deadline()  # first: what came with the upgrade may already renew
        self._leg.start(self)

    # -- MessageSink ------------------------------------------------------------------------------

    def on_text(self, text: str) -> None:
        if self._done:
            return
        self._follow_deadline()
        try:
            parsed = parse_message(text)
        except ProtocolError as exc:
            self._end(CloseCode.PROTOCOL_ERROR, str(exc)[:100], "protocol_error")
            return
        if isinstance(parsed, RenewToken):
            self._renew(parsed)
        elif parsed is not None and not self._http.on_control_message(self._channel, parsed):
            self._end(CloseCode.PROTOCOL_ERROR, "unexpected message", "protocol_error")

    def on_binary(self, data: bytes) -> None:
        if self._done:
            return
        if not self._http.on_control_binary(self._channel, data):
            self._end(CloseCode.PROTOCOL_ERROR, "unexpected binary message", "protocol_error")

    def on_close(self, code: int, reason: str) -> None:
        if self._done:
            return
        self._channel.usable = False
        # Answer the listener's close frame with ours (RFC 6455 5.5.1), with its code: a
        # listener closing itself waits for that answer. (Nothing is sent when ours went out
        # already or the connection is gone.)
        self._leg.close_nowait(code)
        self._finish("closed")

    # -- the token ----------------------------------------------------------------------------

    def _renew(self, renewal: RenewToken) -> None:
        relay = self._relay
        # The entity as served now: its rules may have been rotated since the listen.
        current = relay.store.get(self._entity)
        decision = (
            relay.access.authorize(
                renewal.token,
                current,
                Rights.LISTEN,
                relay.config.limits.token_grace_period,
                host=self._channel.host,
            )
            if current is not None
            else None
        )
        if decision is None or not decision.allowed:
            self._end(CloseCode.POLICY_VIOLATION, "token renewal failed", "renewal_refused")
            return
        self._channel.token_expiry = float(decision.expiry or 0)
        self._follow_deadline()

    def _deadline(self) -> float:
        grace = self._relay.config.limits.token_grace_period
        now = self._loop.time()
        return now + max(0.0, self._channel.token_expiry + grace - time.time())

    def _follow_deadline(self) -> None:
        when = self._deadline()
        if self._timer is not None:
            if abs(when - self._when) <= _DEADLINE_SLACK:
                return
            self._timer.cancel()
        self._when = when
        self._timer = self._loop.call_at(when, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer = None
        if self._done:
            return
        if self._deadline() - self._loop.time() > _DEADLINE_SLACK:
            self._follow_deadline()  # a reload lengthened the grace since the timer was set
            return
        self._end(CloseCode.POLICY_VIOLATION, "token expired", "token_expired")

    # -- the end ------------------------------------------------------------------------------

    def _end(self, code: int, reason: str, why: str) -> None:
        """Close the channel from this end (the listener gets ``code``; its answer is
        awaited by the leg) and end it now."""
        self._channel.usable = False
        self._leg.close_nowait(code, reason)
        self._finish(why)

    def _finish(self, why: str) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        channel = self._channel
        self._relay.broker.unregister(channel)
        self._http.forget_channel(channel)
        self._relay.observer.listener_offline(self._entity, why)
        logger.info("listener %s offline on %r (%s)", channel.listener_id, self._entity, why)
