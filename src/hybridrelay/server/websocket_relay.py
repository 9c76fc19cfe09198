"""Relaying WebSocket connections (PROTOCOL.md 5): the sender's connect (E2) and the listener's
accept or reject of it on the rendezvous address it was told (E3, E4).

The broker (``broker.py``) offers the sender to a listener and holds the rendezvous; once both
sides are upgraded, ``transport/splice.py`` takes the two connections over from aiohttp and
forwards frames between them in the read callbacks, and the legs are tracked for the relay's
shutdown (``legs.py``).

Nothing here logs a token or a rendezvous address.
"""

from __future__ import annotations

import time

from aiohttp import web

from hybridrelay.auth.sas import Rights
from hybridrelay.protocol.addressing import (
    REJECTED_BY_HEADER,
    REJECTED_BY_LISTENER,
    UNDESCRIBED_REJECTION,
    parse_accept_params,
)
from hybridrelay.protocol.websocket import HandshakeError, handshake_headers
from hybridrelay.server.access import AUTH_HEADER, request_token
from hybridrelay.server.broker import (
    NO_LISTENER,
    SHUTTING_DOWN,
    Accepted,
    Connection,
    PendingRendezvous,
    Rejection,
    Unanswered,
    remote_endpoint,
)
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.legs import RelayedConnection
from hybridrelay.server.request import connection_gone
from hybridrelay.server.responses import error_response, reason_phrase, tracking_id
from hybridrelay.transport.base import CloseCode
from hybridrelay.transport.splice import take_over

__all__ = ["WebSocketRelay"]

# Request headers that are the relay's business and never reach the listener in connectHeaders.
_PRIVATE_HEADERS = frozenset({AUTH_HEADER.lower()})


class WebSocketRelay:
    """E2-E4 for one relay."""

    def __init__(self, relay: RelayContext) -> None:
        self._relay = relay

    # -- E2: the sender ----------------------------------------------------------------------

    async def handle_connect(
        self,
        request: web.BaseRequest,
        entity: HybridConnectionConfig,
        suffix: str,
        raw_query: str,
        params: dict[str, str],
        *,
        token: str | None = None,
        connect_headers: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """A sender's upgrade. ``token`` and ``connect_headers`` are given by an upgrade on the
        HTTP endpoint (``http_upgrade.py``: its token may be a cookie, its headers are stripped
        of it); else they come from the request."""
        started = time.monotonic()
        observer = self._relay.observer
        if entity.requires_client_authorization:
            if token is None:
                token = request_token(request.headers, params)
            decision = self._relay.access.authorize(
                token, entity, Rights.SEND, suffix=suffix, host=request.host
            )
            if not decision.allowed:
                observer.sender_refused(
                    "connect", entity.name, decision.status, decision.reason, request.remote
                )
                return error_response(decision.status, decision.reason)
        try:
            handshake_headers(request.headers, None)
        except HandshakeError as exc:
            return error_response(exc.status, str(exc))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if connect_headers is None:
            connect_headers = {
                k: v for k, v in request.headers.items() if k.lower() not in _PRIVATE_HEADERS
            }
        connection = Connection(
            params.get("sb-hc-id") or tracking_id(),
            connect_headers,
            remote=remote_endpoint(peer),
            suffix=suffix,
            raw_query=raw_query,
            gone=connection_gone(request),
        )
        async with self._relay.broker.offer(entity.name, connection, self._relay.config.limits) as (
            pending,
            outcome,
        ):
            if isinstance(outcome, Unanswered):
                if outcome is NO_LISTENER and self._relay.draining():
                    # Admitted as the drain began (its listeners take nothing new): retryable.
                    outcome = SHUTTING_DOWN
                observer.sender_refused(
                    "connect", entity.name, outcome.status, outcome.description, request.remote
                )
                return error_response(outcome.status, outcome.description)
            assert pending is not None
            if isinstance(outcome, Rejection):
                observer.sender_refused(
                    "connect",
                    entity.name,
                    outcome.status,
                    outcome.description,
                    request.remote,
                    by_listener=True,
                    accept_seconds=time.monotonic() - started,
                )
            return await self._rendezvous_sender(request, entity, pending, outcome, started)

    async def _rendezvous_sender(
        self,
        request: web.BaseRequest,
        entity: HybridConnectionConfig,
        pending: PendingRendezvous,
        outcome: Accepted | Rejection,
        started: float,
    ) -> web.StreamResponse:
        if isinstance(outcome, Rejection):
            return web.Response(
                status=outcome.status,
                reason=reason_phrase(outcome.description) or "Error",
                headers={REJECTED_BY_HEADER: REJECTED_BY_LISTENER},
            )
        response, sender = await take_over(
            request,
            outcome.subprotocol,
            max_message_size=self._relay.config.limits.max_message_size,
            name=f"{pending.id} on {entity.name!r} (sender)",
            on_lost=self._relay.legs.lost,
            keep_alive=self._relay.config.limits.keep_alive_interval,
        )
        if sender is None:
            return response  # leaving the broker's offer closes the listener's leg
        self._relay.legs.track(sender)
        listener = pending.splice.listener
        pending.splice.join(sender)
        if listener is not None:
            connection = RelayedConnection(
                pending.id,
                entity.name,
                "websocket",
                sender,
                listener,
                request.remote,
                pending.listener_address,
            )
            self._relay.legs.joined(connection)
            self._relay.observer.connection_joined(connection, time.monotonic() - started)
        return response

    # -- E3 / E4: listener accepts or rejects ---------------------------------------------------

    async def handle_accept(
        self, request: web.BaseRequest, params: dict[str, str]
    ) -> web.StreamResponse:
        address = parse_accept_params(params)
        pending = self._relay.broker.claim(address.secret, address.connection_id, PendingRendezvous)
        if pending is None:
            return error_response(403, "The rendezvous address is not valid or has expired.")
        if address.rejects:
            if address.status_code is None:
                if not pending.outcome.done():
                    pending.outcome.set_result(Rejection(400, UNDESCRIBED_REJECTION))
                return error_response(400, "sb-hc-statusCode must be an error status, 400-599.")
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
            max_message_size=self._relay.config.limits.max_message_size,
            name=f"{pending.id} on {pending.entity!r} (listener)",
            on_lost=self._relay.legs.lost,
            response_headers=headers,
            keep_alive=self._relay.config.limits.keep_alive_interval,
        )
        if listener is None:
            if not pending.outcome.done():
                pending.outcome.set_result(Rejection(502, "The listener's upgrade failed."))
            return response
        self._relay.legs.track(listener)
        pending.listener_address = request.remote
        if pending.outcome.done():  # the sender gave up meanwhile
            listener.close_now(CloseCode.GOING_AWAY, "sender went away")
        else:
            pending.splice.listener = listener
            pending.outcome.set_result(Accepted(subprotocol))
        return response
