"""WebSocket upgrades sent to the HTTP endpoint ``/{hc}/{path}`` (PROTOCOL.md 6.9): what a
browser's ``new WebSocket("wss://relay/hc/path")`` does.

Such an upgrade is authorized like a relayed HTTP request to that entity (Send right; the token
from the ``sb-hc-token`` query parameter, the ``ServiceBusAuthorization`` header, the
``Authorization`` header, or the ``sb-hc-token`` cookie, :mod:`hybridrelay.protocol.cookies`;
none when the hybrid connection does not require client authorization), and then handed to a
listener exactly as a Hybrid Connections WebSocket sender (``websocket_relay.py``): an
``accept`` with a rendezvous address carrying the path after the entity and the query minus the
``sb-hc-*`` parameters, the request's headers as ``connectHeaders``, and the two WebSockets
spliced frame by frame (DECISIONS D9). The credential that was used never reaches the listener.

Nothing here logs a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

from aiohttp import web

from hybridrelay.protocol.addressing import protocol_params, resolve_entity
from hybridrelay.protocol.cookies import TOKEN_COOKIE, cookie_value, without_cookie
from hybridrelay.server.access import AUTH_HEADER, sender_token
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.responses import error_response
from hybridrelay.server.websocket_relay import WebSocketRelay

__all__ = [
    "HttpUpgrade",
    "cookie_token",
    "is_websocket_upgrade",
    "sender_entity",
    "strip_token_cookie",
]


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """The request asks for a WebSocket (``Upgrade: websocket``, any case)."""
    return request.headers.get("Upgrade", "").strip().lower() == "websocket"


def cookie_token(headers: Mapping[str, str]) -> str | None:
    """The token of the ``sb-hc-token`` cookie, if the request has one: the last credential a
    sender to ``/{hc}/{path}`` may use (a browser's ``WebSocket`` or ``EventSource`` cannot
    set headers), after the query parameter and the two headers."""
    cookies = headers.get("Cookie")
    if not cookies or TOKEN_COOKIE not in cookies:
        return None
    return cookie_value(cookies, TOKEN_COOKIE)


def strip_token_cookie(sent: Mapping[str, str], forwarded: dict[str, str]) -> None:
    """Remove the ``sb-hc-token`` cookie from ``forwarded`` (the headers a listener gets; a
    ``Cookie`` header left empty goes), whether or not it was the credential used: it is meant
    for the relay only. ``sent`` (the request's own, case-insensitive) makes the usual case,
    no such cookie, one lookup."""
    if TOKEN_COOKIE not in sent.get("Cookie", ""):
        return
    for name in [name for name in forwarded if name.lower() == "cookie"]:
        value = without_cookie(forwarded[name], TOKEN_COOKIE)
        if value:
            forwarded[name] = value
        else:
            del forwarded[name]


def sender_entity(
    raw_path: str, relay: RelayContext
) -> tuple[HybridConnectionConfig, str] | web.Response:
    """The hybrid connection a sender on ``/{hc}/{path}`` addresses and the path after it, or
    the 404 to answer (a path that is not UTF-8, no such entity): for HTTP requests and
    WebSocket upgrades alike."""
    try:
        path = unquote(raw_path.lstrip("/"), errors="strict")
    except UnicodeDecodeError:
        return error_response(404, "Malformed path.")
    resolved = resolve_entity(path, relay.store.get)
    if resolved is None:
        return error_response(404, "The hybrid connection does not exist.")
    return resolved


class HttpUpgrade:
    """Routes ``app.py`` sends here: a WebSocket upgrade on ``/{hc}/{path}``."""

    def __init__(self, relay: RelayContext, websocket: WebSocketRelay) -> None:
        self._relay = relay
        self._websocket = websocket

    async def handle(
        self, request: web.BaseRequest, raw_path: str, raw_query: str
    ) -> web.StreamResponse:
        resolved = sender_entity(raw_path, self._relay)
        if isinstance(resolved, web.Response):
            return resolved
        entity, suffix = resolved
        params = protocol_params(raw_query)
        token, used_authorization = sender_token(request.headers, params, entity)
        if token is None and entity.requires_client_authorization:
            token = cookie_token(request.headers)
        drop = (
            {AUTH_HEADER.lower(), "authorization"} if used_authorization else {AUTH_HEADER.lower()}
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        strip_token_cookie(request.headers, headers)
        return await self._websocket.handle_connect(
            request, entity, suffix, raw_query, params, token=token, connect_headers=headers
        )
