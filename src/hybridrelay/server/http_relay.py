"""HTTP request relaying (PROTOCOL.md section 6): the relay side.

A sender's plain HTTP request (E6) becomes a ``request`` message for one listener; the
listener's ``response`` (+ body) becomes the HTTP response. One *exchange* per request:

* small requests (``Content-Length`` known and <= 64 KiB, headers <= 32 KiB) go inline on the
  control channel, the body as one binary message right after the JSON;
* everything else (larger, chunked) is announced *address-only*; the listener opens the request
  rendezvous (E5) and the relay sends the full ``request`` and streams the body there as ONE
  binary message, written in fragments (:meth:`AiohttpMessageSocket.send_fragment`), so an upload
  is never held in memory;
* the listener answers on the control channel (``response`` + its binary body, tracked per channel
  as "the next binary message belongs to request X") or on a rendezvous. It may also open a
  rendezvous only to send a large response to a request that was delivered inline (6.3 case 2);
  the relay then does not resend the request.

The sender's handler task owns the whole exchange, including the rendezvous socket once the
listener opened it (the rendezvous' own handler just waits until the exchange is over), so that
every timeout and every cleanup lives in one place.

Limitation: aiohttp reassembles a fragmented WebSocket message before handing it over, so a
response body is held whole (up to ``limits.max_message_size`` on a rendezvous, 256 KiB on a
control channel) before the relay forwards it, with a ``Content-Length``. Arrival of bytes is
still observed while the message is incomplete (:class:`_TrackedWebSocketResponse`), so a body
that keeps flowing is not cut by the response deadline; a body that stalls longer than it is.

Nothing here logs a token or a rendezvous address.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote

from aiohttp import web

from hybridrelay.auth.sas import Rights
from hybridrelay.exceptions import ProtocolError, RelayConnectionError
from hybridrelay.protocol.addressing import (
    build_relay_url,
    filter_query,
    protocol_params,
    resolve_entity,
)
from hybridrelay.protocol.messages import (
    ControlMessage,
    RemoteEndpoint,
    Request,
    Response,
    encode_message,
    parse_message,
)
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.registry import ControlChannel
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import CloseCode, MessageKind, WsMessage

if TYPE_CHECKING:
    from hybridrelay.server.app import RelayServer

__all__ = ["INLINE_BODY_LIMIT", "INLINE_HEADER_LIMIT", "HttpRelay"]

logger = logging.getLogger("hybridrelay.server.http")

#: Bodies up to this size (known in advance) travel inline on the control channel (6.2).
INLINE_BODY_LIMIT = 64 * 1024
#: Request header metadata up to this size travels inline on the control channel (6.2).
INLINE_HEADER_LIMIT = 32 * 1024
#: Largest message a listener may send on its control channel (see ``app.py``).
CONTROL_MAX_MESSAGE = 4 * INLINE_BODY_LIMIT
#: Each fragment of a streamed upload carries at most this much.
_FRAGMENT_SIZE = 64 * 1024
#: Response bodies are written to the sender in slices of this size.
_WRITE_SLICE = 256 * 1024
_CLOSE_TIMEOUT = 5.0

# RFC 7230 connection-level headers: never forwarded in either direction (6.2, 6.5).
_CONNECTION_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "close",
        "keep-alive",
        "proxy-connection",
    }
)
# Answered by the relay itself (aiohttp sends "100 Continue"), so not forwarded (6.1).
_REQUEST_ONLY_DROPPED = frozenset({"expect"})
_SB_AUTH_HEADER = "ServiceBusAuthorization"

T = TypeVar("T")


class _TrackedWebSocketResponse(web.WebSocketResponse):
    """A server WebSocket that records when bytes last arrived from the peer.

    aiohttp calls ``_on_data_received`` for every chunk read from the connection while a
    heartbeat is configured (``WebSocketResponse._post_start``), including the fragments of a
    message it is still reassembling; that is the only way to see that a large body is still
    flowing. Pinned by ``test_streamed_body_not_cut_while_flowing_but_cut_when_stalled``.
    """

    last_data: float = 0.0

    def _on_data_received(self) -> None:
        self.last_data = asyncio.get_running_loop().time()
        super()._on_data_received()


@dataclass(slots=True)
class _Rendezvous:
    socket: AiohttpMessageSocket
    ws: _TrackedWebSocketResponse


@dataclass(slots=True)
class _ListenerResponse:
    response: Response
    body: bytes


class _ExchangeFailed(Exception):
    """The exchange cannot produce a listener response: answer the sender with ``status``."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


class _SenderGone(Exception):
    """The sender's connection broke (upload cut off): nothing can be answered."""


@dataclass(eq=False)
class _Exchange:
    """One relayed HTTP request, from the sender's request to the end of the response."""

    id: str
    entity: str
    inline: bool
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    channel: ControlChannel | None = None
    #: Set from the control channel: the listener's response, or None if the channel died.
    control_response: asyncio.Future[_ListenerResponse | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    #: Set when the listener opened this request's rendezvous.
    rendezvous: asyncio.Future[_Rendezvous] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    #: Set when the sender's handler is over; the rendezvous handler then returns.
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _BodyOwner:
    """Whom a control channel's next binary message belongs to (after ``body: true``).

    ``exchange`` is None when the request is no longer live: the body is then dropped.
    """

    exchange: _Exchange | None
    head: Response


class HttpRelay:
    """HTTP relaying for one :class:`RelayServer`; ``app.py`` routes E5, E6 and the listeners'
    ``response`` messages here."""

    def __init__(self, server: RelayServer) -> None:
        self._server = server
        self._by_id: dict[str, _Exchange] = {}
        self._by_secret: dict[str, _Exchange] = {}
        self._by_channel: dict[ControlChannel, set[_Exchange]] = {}
        #: Per control channel: whom the next binary message belongs to (after body:true).
        self._binary_owner: dict[ControlChannel, _BodyOwner] = {}

    # -- E6: the sender ------------------------------------------------------------------

    async def handle_sender_request(
        self, request: web.BaseRequest, raw_path: str, raw_query: str
    ) -> web.StreamResponse:
        from hybridrelay.server.app import error_response

        server = self._server
        if request.method == "CONNECT":
            return error_response(405, "CONNECT cannot be relayed.")
        if "upgrade" in request.headers.get("Connection", "").lower() and request.headers.get(
            "Upgrade"
        ):
            return error_response(400, "Upgrades cannot be relayed; WebSockets use /$hc/.")
        if server._closing:
            return error_response(503, "The relay is shutting down.")
        try:
            path = unquote(raw_path.lstrip("/"), errors="strict")
        except UnicodeDecodeError:
            return error_response(404, "Malformed path.")
        resolved = resolve_entity(path, server.store.get)
        if resolved is None:
            return error_response(404, "The hybrid connection does not exist.")
        entity, suffix = resolved

        params = protocol_params(raw_query)
        token, strip_authorization = _sender_token(request, params, entity)
        if entity.requires_client_authorization:
            decision = server.authorize(token, entity, Rights.SEND, suffix=suffix)
            if not decision.allowed:
                return error_response(decision.status, decision.reason)

        headers = forwarded_request_headers(request.headers.items(), strip_authorization)
        target = raw_path + ("?" + filtered if (filtered := filter_query(raw_query)) else "")
        peer = request.transport.get_extra_info("peername") if request.transport else None
        remote = RemoteEndpoint(str(peer[0]), int(peer[1])) if peer else None
        length = request.content_length
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        has_body = request.body_exists
        header_size = len(json.dumps(headers, separators=(",", ":")).encode("utf-8"))
        inline = (
            not chunked
            and (length or 0) <= INLINE_BODY_LIMIT
            and header_size <= INLINE_HEADER_LIMIT
        )
        if len(self._by_secret) >= server.config.limits.max_pending_rendezvous:
            return error_response(503, "Too many pending requests; try again later.")
        expect = request.headers.get("Expect")
        if expect is not None:
            # The relay answers Expect itself, once it knows it will take the body (auth and
            # routing passed), and never forwards it (PROTOCOL.md 6.1).
            if expect.lower() != "100-continue" or request.version < (1, 1):
                return error_response(417, "Only 'Expect: 100-continue' is supported.")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        deadline = _response_deadline(server, entity)
        body: bytes | None = None
        if inline and has_body:
            try:
                async with asyncio.timeout(deadline):
                    body = await request.read()
            except TimeoutError:
                return error_response(408, "The request body did not arrive in time.")
            except (ConnectionError, web.HTTPException) as exc:
                logger.debug("sender's request body could not be read: %s", type(exc).__name__)
                return error_response(400, "The request body could not be read.")

        exchange = _Exchange(id=str(uuid.uuid4()), entity=entity.name, inline=inline)

        @functools.cache
        def full_request(base_url: str) -> Request:
            # The address is built from the listener's own base (ControlChannel.base_url),
            # never from this sender's Host header. Cached: announcing and the rendezvous
            # both need it for the same base.
            return Request(
                address=build_relay_url(
                    base_url,
                    entity.name,
                    action="request",
                    params={"sb-hc-id": exchange.id, "sb-hc-rendezvous": exchange.secret},
                ),
                id=exchange.id,
                request_target=target,
                method=request.method,
                request_headers=headers,
                remote_endpoint=remote,
                body=bool(body) if inline else has_body,
            )

        self._by_id[exchange.id] = exchange
        self._by_secret[exchange.secret] = exchange
        try:
            if inline:
                announced = await self._announce(
                    exchange, lambda base: encode_message(full_request(base)), body or None
                )
            else:
                announced = await self._announce(
                    exchange,
                    lambda base: encode_message(
                        Request(address=full_request(base).address, id=exchange.id)
                    ),
                    None,
                )
            if not announced:
                return error_response(502, "There are no listeners connected for the endpoint.")
            assert exchange.channel is not None
            full = full_request(exchange.channel.base_url)
            try:
                result = await self._await_response(request, exchange, full, has_body, deadline)
            except _ExchangeFailed as exc:
                logger.info(
                    "request %s on %r failed: %d %s",
                    exchange.id,
                    entity.name,
                    exc.status,
                    exc.description,
                )
                return error_response(exc.status, exc.description)
            except _SenderGone:
                logger.info("request %s on %r: the sender went away", exchange.id, entity.name)
                return error_response(400, "The request body broke off.")
            return await self._respond(request, result, deadline)
        finally:
            await self._finish(exchange)

    async def _announce(
        self, exchange: _Exchange, text_for: Callable[[str], str], body: bytes | None
    ) -> bool:
        """Send the request (or its address) to one listener; False if none took it.

        ``text_for(base_url)`` renders the message for a listener's rendezvous base.
        """
        for channel in self._server.registry.candidates(exchange.entity):
            # Registered before sending: the answer may be read before send() returns.
            exchange.channel = channel
            self._by_channel.setdefault(channel, set()).add(exchange)
            try:
                await channel.send(text_for(channel.base_url), body)
            except RelayConnectionError:
                self._unlink(exchange)
                self._server.registry.remove(channel)
                continue
            return True
        exchange.channel = None
        return False

    async def _await_response(
        self,
        request: web.BaseRequest,
        exchange: _Exchange,
        full: Request,
        has_body: bool,
        deadline: float,
    ) -> _ListenerResponse:
        waiters: set[asyncio.Future[_ListenerResponse | None] | asyncio.Future[_Rendezvous]] = {
            exchange.control_response,
            exchange.rendezvous,
        }
        done, _ = await asyncio.wait(waiters, timeout=deadline, return_when="FIRST_COMPLETED")
        if not done:
            raise _ExchangeFailed(504, "The listener did not respond in time.")
        if exchange.control_response.done():
            answer = exchange.control_response.result()
            if answer is None:
                raise _ExchangeFailed(502, "The listener disconnected before responding.")
            return answer
        rendezvous = exchange.rendezvous.result()
        return await self._over_rendezvous(request, exchange, rendezvous, full, has_body, deadline)

    async def _over_rendezvous(
        self,
        request: web.BaseRequest,
        exchange: _Exchange,
        rendezvous: _Rendezvous,
        full: Request,
        has_body: bool,
        deadline: float,
    ) -> _ListenerResponse:
        socket = rendezvous.socket
        upload: asyncio.Task[None] | None = None
        if not exchange.inline:  # address-only: the request itself goes here (6.3 case 1)
            try:
                async with asyncio.timeout(deadline):
                    await socket.send(encode_message(full))
            except (RelayConnectionError, TimeoutError) as exc:
                raise _ExchangeFailed(502, "The listener's rendezvous failed.") from exc
            if has_body:
                upload = asyncio.create_task(_upload(request, socket, deadline))
        receive = asyncio.create_task(socket.receive())
        try:
            if upload is not None:
                await asyncio.wait({receive, upload}, return_when="FIRST_COMPLETED")
                if upload.done():
                    upload.result()  # raises _SenderGone / _ExchangeFailed
            # The response deadline runs from the end of the upload (or an early answer).
            while True:
                message = await _wait_for(receive, deadline)
                if message is None:
                    raise _ExchangeFailed(504, "The listener did not respond in time.")
                receive = asyncio.create_task(socket.receive())
                if message.kind is MessageKind.CLOSE:
                    raise _ExchangeFailed(502, "The listener closed the rendezvous.")
                if message.kind is MessageKind.BINARY and not message.data:
                    continue  # a stray empty message (6.6)
                if message.kind is not MessageKind.TEXT:
                    raise _ExchangeFailed(502, "The listener sent data before its response.")
                try:
                    parsed = parse_message(message.data)
                except ProtocolError as exc:
                    raise _ExchangeFailed(502, "The listener sent a malformed response.") from exc
                if isinstance(parsed, Response):
                    break
                if parsed is not None:
                    raise _ExchangeFailed(502, "The listener sent an unexpected message.")
            if not parsed.body:
                return _ListenerResponse(parsed, b"")
            body = await _wait_while_flowing(receive, rendezvous.ws, deadline)
            if body is None:
                raise _ExchangeFailed(504, "The listener's response body stalled.")
            if body.kind is MessageKind.CLOSE and body.code == CloseCode.MESSAGE_TOO_BIG:
                raise _ExchangeFailed(
                    502, "The listener's response body exceeds the relay's max_message_size."
                )
            if body.kind is MessageKind.CLOSE:
                raise _ExchangeFailed(502, "The listener closed the rendezvous mid-response.")
            data = body.data.encode("utf-8") if isinstance(body.data, str) else body.data
            return _ListenerResponse(parsed, data)
        finally:
            for task in (receive, upload):
                if task is None:
                    continue
                if not task.done():
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task  # also retrieves an exception nobody needs any more

    async def _respond(
        self, request: web.BaseRequest, result: _ListenerResponse, deadline: float
    ) -> web.StreamResponse:
        response = result.response
        status = response.status_code
        if status < 200:
            from hybridrelay.server.app import error_response

            return error_response(502, f"The listener answered with status {status}.")
        reason = _reason_phrase(response.status_description)
        out = web.StreamResponse(status=status, reason=reason)
        listener_length: str | None = None
        for name, value in forwarded_response_headers(response.response_headers):
            if name.lower() == "content-length":
                listener_length = value
                continue
            out.headers.add(name, value)
        via = f"1.1 {self._via_name(request)}"
        existing = out.headers.popall("Via", [])
        out.headers["Via"] = ", ".join([*existing, via])
        body = result.body
        no_body = request.method == "HEAD" or status in (204, 304)
        if not no_body and len(body) <= _WRITE_SLICE:
            # The common small response: aiohttp sends head and body in one write once the
            # handler returns (profiles showed transport.write as the relay's top cost).
            small = web.Response(status=status, reason=reason, body=body)
            small.headers.extend(out.headers)
            return small
        if not no_body:
            out.content_length = len(body)
        elif request.method == "HEAD" and listener_length and listener_length.isdigit():
            out.content_length = int(listener_length)
        try:
            async with asyncio.timeout(deadline):
                await out.prepare(request)
            if not no_body:
                view = memoryview(body)
                for start in range(0, len(body), _WRITE_SLICE):
                    async with asyncio.timeout(deadline):  # the sender must keep reading
                        await out.write(view[start : start + _WRITE_SLICE])
            async with asyncio.timeout(deadline):
                await out.write_eof()
        except (ConnectionError, TimeoutError) as exc:
            logger.info("response to the sender failed: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
        return out

    def _via_name(self, request: web.BaseRequest) -> str:
        host = self._server.config.namespace_host or request.host or "hybridrelay"
        return "".join(ch for ch in host if ch.isprintable() and ch not in " ,;\r\n")[:255]

    async def _finish(self, exchange: _Exchange) -> None:
        self._by_id.pop(exchange.id, None)
        self._by_secret.pop(exchange.secret, None)
        self._unlink(exchange)
        if not exchange.control_response.done():
            exchange.control_response.cancel()
        if exchange.rendezvous.done():
            socket = exchange.rendezvous.result().socket
            with contextlib.suppress(RelayConnectionError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await socket.send_close(CloseCode.NORMAL, "")
            socket.abort()
        else:
            exchange.rendezvous.cancel()
        exchange.finished.set()

    def _unlink(self, exchange: _Exchange) -> None:
        channel = exchange.channel
        if channel is None:
            return
        members = self._by_channel.get(channel)
        if members is not None:
            members.discard(exchange)
            if not members:
                del self._by_channel[channel]
        owner = self._binary_owner.get(channel)
        if owner is not None and owner.exchange is exchange:
            owner.exchange = None  # its body still arrives on the channel; drop it then

    # -- E5: the listener's request rendezvous ----------------------------------------------

    async def handle_request_rendezvous(
        self, request: web.BaseRequest, params: dict[str, str]
    ) -> web.StreamResponse:
        from hybridrelay.server.app import error_response

        exchange = self._claim(params.get("sb-hc-rendezvous", ""), params.get("sb-hc-id", ""))
        if exchange is None:
            return error_response(403, "The rendezvous address is not valid or has expired.")
        limits = self._server.config.limits
        entity = self._server.store.get(exchange.entity)
        deadline = _response_deadline(self._server, entity) if entity else 60.0
        ws = _TrackedWebSocketResponse(
            autoclose=False,
            autoping=True,
            compress=False,
            max_msg_size=limits.max_message_size,
            # The heartbeat makes aiohttp report incoming data (see _TrackedWebSocketResponse);
            # it is long so that pongs do not count as a response body that keeps flowing.
            heartbeat=max(limits.keep_alive_interval, 2 * deadline),
        )
        await ws.prepare(request)
        ws.last_data = asyncio.get_running_loop().time()
        socket = AiohttpMessageSocket.server(ws, request)
        if exchange.rendezvous.done():  # the sender's handler is over
            await socket.aclose(CloseCode.GOING_AWAY, "request is over")
            return ws
        exchange.rendezvous.set_result(_Rendezvous(socket, ws))
        await exchange.finished.wait()
        return ws

    def _claim(self, secret: str, request_id: str) -> _Exchange | None:
        exchange = self._by_secret.get(secret)
        if exchange is None or not hmac.compare_digest(exchange.id.encode(), request_id.encode()):
            return None
        if exchange.rendezvous.done():  # single use
            return None
        return exchange

    # -- the listeners' control channels ----------------------------------------------------

    async def on_control_message(self, channel: ControlChannel, message: ControlMessage) -> bool:
        """A listener's message other than renewToken; False closes the channel (1002)."""
        if not isinstance(message, Response):
            return False
        if channel in self._binary_owner:
            # A body was announced and has not come: the listener broke the framing (6.6).
            return False
        exchange = self._by_id.get(message.request_id)
        live = (
            exchange is not None
            and exchange.channel is channel
            and not exchange.control_response.done()
        )
        if message.body:
            self._binary_owner[channel] = _BodyOwner(exchange if live else None, message)
        elif live and exchange is not None:
            exchange.control_response.set_result(_ListenerResponse(message, b""))
        return True

    async def on_control_binary(self, channel: ControlChannel, data: bytes | str) -> None:
        """A binary message on a control channel: the body of the last ``response``."""
        owner = self._binary_owner.pop(channel, None)
        if owner is None:
            if not data:
                return  # hyco-https' stray empty message after body:false (6.6)
            channel.usable = False
            await channel.socket.aclose(CloseCode.PROTOCOL_ERROR, "unexpected binary message")
            return
        exchange = owner.exchange
        if exchange is not None and not exchange.control_response.done():
            body = data.encode("utf-8") if isinstance(data, str) else data
            exchange.control_response.set_result(_ListenerResponse(owner.head, body))

    def forget_channel(self, channel: ControlChannel) -> None:
        """The channel is gone: fail the requests still waiting on it (502)."""
        self._binary_owner.pop(channel, None)
        for exchange in list(self._by_channel.pop(channel, ())):
            if not exchange.rendezvous.done() and not exchange.control_response.done():
                exchange.control_response.set_result(None)


# -- helpers -------------------------------------------------------------------------------


def _sender_token(
    request: web.BaseRequest, params: dict[str, str], entity: HybridConnectionConfig
) -> tuple[str | None, bool]:
    """The sender's token and whether ``Authorization`` was used (and must be stripped), 3.4.

    Order: the ``sb-hc-token`` query parameter, the ``ServiceBusAuthorization`` header, and the
    ``Authorization`` header only when authorization is on and neither of the others is present.
    """
    if "sb-hc-token" in params:
        return params["sb-hc-token"], False
    header = request.headers.get(_SB_AUTH_HEADER)
    if header is not None:
        return header, False
    if entity.requires_client_authorization and "Authorization" in request.headers:
        return request.headers["Authorization"], True
    return None, False


def forwarded_request_headers(
    items: Iterable[tuple[str, str]], strip_authorization: bool
) -> dict[str, str]:
    """The ``requestHeaders`` of a request message (PROTOCOL.md 6.2).

    Connection-level headers (and those the ``Connection`` header names), ``Expect`` and the
    relay's auth material are removed; repeated headers are joined with ``", "``; a name keeps
    the spelling of its first occurrence.
    """
    pairs = list(items)
    dropped = set(_CONNECTION_HEADERS | _REQUEST_ONLY_DROPPED)
    dropped.add(_SB_AUTH_HEADER.lower())
    if strip_authorization:
        dropped.add("authorization")
    for name, value in pairs:
        if name.lower() == "connection":
            dropped.update(t.strip().lower() for t in value.split(",") if t.strip())
    merged: dict[str, tuple[str, list[str]]] = {}
    for name, value in pairs:
        key = name.lower()
        if key in dropped:
            continue
        if key in merged:
            merged[key][1].append(value)
        else:
            merged[key] = (name, [value])
    return {name: ", ".join(values) for name, values in merged.values()}


def forwarded_response_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The listener's ``responseHeaders`` minus hop-by-hop headers (6.5); values made safe."""
    dropped = set(_CONNECTION_HEADERS - {"content-length"})
    for name, value in headers.items():
        if name.lower() == "connection":
            dropped.update(t.strip().lower() for t in value.split(",") if t.strip())
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        if name.lower() in dropped or not _is_token(name):
            continue
        out.append((name, value.replace("\r", " ").replace("\n", " ")))
    return out


# RFC 9110 token characters; a compiled regex is ~10x faster than a per-character check.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_token(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def _reason_phrase(description: str | None) -> str | None:
    if not description:
        return None  # aiohttp supplies the standard phrase
    # Only ASCII is safe on a status line (clients disagree on obs-text); else "?".
    cleaned = "".join(
        (ch if ord(ch) < 128 else "?") if ch.isprintable() else " " for ch in description
    ).strip()
    return cleaned[:512] or None


def _response_deadline(server: RelayServer, entity: HybridConnectionConfig) -> float:
    if entity.http_response_timeout is not None:
        return entity.http_response_timeout
    return server.config.limits.http_response_timeout


async def _wait_for(task: asyncio.Task[T], seconds: float) -> T | None:
    """The task's result, or None (task left running) if it takes longer than ``seconds``."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return task.result() if done else None


async def _wait_while_flowing(
    task: asyncio.Task[WsMessage], ws: _TrackedWebSocketResponse, idle: float
) -> WsMessage | None:
    """Wait for a (possibly huge, fragmented) message while its bytes keep arriving.

    None when nothing arrived on the socket for ``idle`` seconds (6.8: a stalled body).
    """
    loop = asyncio.get_running_loop()
    ws.last_data = max(ws.last_data, loop.time())
    while True:
        remaining = ws.last_data + idle - loop.time()
        if remaining <= 0:
            return None
        done, _ = await asyncio.wait({task}, timeout=remaining)
        if done:
            return task.result()


async def _upload(request: web.BaseRequest, socket: AiohttpMessageSocket, idle: float) -> None:
    """Stream the sender's body to the listener as ONE binary message, in fragments.

    Raises :class:`_SenderGone` if the sender's body breaks off (the rendezvous is then dropped:
    a cut-off body must not reach the listener as if complete) and :class:`_ExchangeFailed` if
    the listener does not take the data for ``idle`` seconds.
    """
    content = request.content

    async def read() -> bytes:
        try:
            async with asyncio.timeout(idle):
                return await content.read(_FRAGMENT_SIZE)
        except TimeoutError:
            socket.abort()
            raise _SenderGone() from None
        except (ConnectionError, web.HTTPException, OSError) as exc:
            socket.abort()
            raise _SenderGone() from exc
        except Exception as exc:  # aiohttp's payload errors (truncated chunked body, ...)
            socket.abort()
            raise _SenderGone() from exc

    async def send(data: bytes, first: bool, last: bool) -> None:
        try:
            async with asyncio.timeout(idle):
                await socket.send_fragment(data, first=first, last=last)
        except (RelayConnectionError, TimeoutError) as exc:
            socket.abort()
            raise _ExchangeFailed(504, "The listener did not take the request body.") from exc

    first = True
    chunk = await read()
    while True:
        following = await read() if chunk else b""
        last = not following
        await send(chunk, first, last)
        if last:
            return
        first = False
        chunk = following
