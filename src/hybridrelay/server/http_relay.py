"""HTTP request relaying (PROTOCOL.md section 6): the relay side.

A sender's plain HTTP request (E6) becomes a ``request`` message for one listener; the
listener's ``response`` (+ body) becomes the HTTP response. One *exchange* per request:

* small requests (``Content-Length`` known and <= 64 KiB, headers <= 32 KiB) go inline on the
  control channel, the body as one binary message right after the JSON;
* everything else (larger, chunked) is announced *address-only*; the listener opens the request
  rendezvous (E5) and the relay sends the full ``request`` and streams the body there as ONE
  binary message, written in fragments (:meth:`MessageLeg.send_fragment`), so an upload
  is never held in memory;
* the listener answers on the control channel (``response`` + its binary body, tracked per channel
  as "the next binary message belongs to request X") or on a rendezvous. It may also open a
  rendezvous only to send a large response to a request that was delivered inline (6.3 case 2);
  the relay then does not resend the request.

Requests come two ways. The relay's own HTTP front (``sender_http.py``) hands over the small
ones it read whole: :meth:`HttpRelay.relay_inline` relays them without a task of their own,
the answer, the deadline and the sender's going away settling the exchange by callback
(:class:`_InlineWait`). Everything else comes through aiohttp (:meth:`handle_sender_request`),
whose handler task owns the whole exchange, including the rendezvous socket once the listener
opened it. Either way every timeout and every cleanup of an exchange lives in one place, and
the two share the admission (:meth:`HttpRelay.admit`), the response head and the streamed body.

Bodies stream both ways, any size, in memory bounded by buffers: the rendezvous is taken away
from aiohttp after its 101 (:class:`~hybridrelay.transport.http_leg.MessageLeg`, D9's frame
path), so each fragment of a response body is written to the sender as it arrives: under the
listener's ``Content-Length`` when it gave one, else with chunked transfer-encoding (a body that
arrived whole and small goes out in one write with its length). A sender that goes away
mid-response gets the rendezvous closed (1001) at once, so the listener learns. The gap between
two parts of a body is bounded by the response deadline (``http_response_timeout``). Repeated
``Set-Cookie`` headers come in hybridrelay's ``repeatedResponseHeaders`` (PROTOCOL.md 6.4).

Requests reach a listener through the broker (``broker.py``), like WebSocket senders: it picks
the listener, holds the request's rendezvous secret in the relay's one table of pending
rendezvous and tells this module when the listener's control channel goes away.

Nothing here logs a token or a rendezvous address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, Protocol, TypeVar

from aiohttp import web

from hybridrelay.auth.sas import AuthDecision, Rights
from hybridrelay.exceptions import ProtocolError, RelayConnectionError
from hybridrelay.protocol.addressing import (
    filter_query,
    parse_accept_params,
    protocol_params,
    rendezvous_url,
)
from hybridrelay.protocol.http import (
    HOP_BY_HOP_HEADERS,
    INLINE_BODY_LIMIT,
    expand_repeated_headers,
    header_json_size,
    merge_repeated_headers,
    response_has_body,
    sends_inline,
    without_hop_by_hop,
)
from hybridrelay.protocol.messages import (
    ControlMessage,
    RemoteEndpoint,
    Request,
    Response,
    encode_message,
    encode_request,
    parse_message,
)
from hybridrelay.protocol.websocket import HandshakeError, handshake_headers
from hybridrelay.server.access import AUTH_HEADER, sender_token
from hybridrelay.server.broker import WOULD_WAIT, Pending, remote_endpoint
from hybridrelay.server.channel import ControlChannel
from hybridrelay.server.config import HybridConnectionConfig, LimitsConfig, RelayConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.deadlines import Deadlines
from hybridrelay.server.http_upgrade import cookie_token, sender_entity, strip_token_cookie
from hybridrelay.server.request import connection_gone
from hybridrelay.server.responses import error_response, reason_phrase, tracking_id
from hybridrelay.transport.base import CloseCode, MessageKind
from hybridrelay.transport.http_leg import MessageLeg
from hybridrelay.transport.splice import hand_over

__all__ = ["CONTROL_MAX_MESSAGE", "HttpRelay", "response_deadline"]

logger = logging.getLogger("hybridrelay.server.http")

#: Largest message a listener may send on its control channel (``control_channel.py``).
CONTROL_MAX_MESSAGE = 4 * INLINE_BODY_LIMIT
#: Each fragment of a streamed upload carries at most this much.
_FRAGMENT_SIZE = 64 * 1024
#: Response bodies are written to the sender in slices of this size.
_WRITE_SLICE = 256 * 1024

# Besides the hop-by-hop headers (protocol/http.py), never forwarded in requests: Expect (the
# relay answers it itself, 6.1) and the relay's own credentials.
_REQUEST_DROPPED = frozenset({"expect", AUTH_HEADER.lower()})
_REQUEST_DROPPED_WITH_AUTHORIZATION = _REQUEST_DROPPED | {"authorization"}
_KEEP_LENGTH = frozenset({"content-length"})
#: What a listener's response loses besides the names its Connection header lists (6.5).
_RESPONSE_HOP_BY_HOP = HOP_BY_HOP_HEADERS - _KEEP_LENGTH

_TOO_MANY_PENDING = "Too many pending requests; try again later."
_NO_ANSWER = "The listener did not respond in time."

T = TypeVar("T")


@dataclass(slots=True)
class _Rendezvous:
    socket: MessageLeg


@dataclass(slots=True)
class _ListenerResponse:
    response: Response
    #: The body when it came inline (or there is none) ...
    body: bytes
    #: ... or the rendezvous it streams on (the next messages are its parts).
    stream: MessageLeg | None = None


class BodyBroken(Exception):
    """The listener's response body broke off or stalled after the head was sent."""


class _ExchangeFailed(Exception):
    """The exchange cannot produce a listener response: answer the sender with ``status``."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


class _SenderGone(Exception):
    """The sender's connection broke (upload cut off): nothing can be answered."""


@dataclass(eq=False, kw_only=True)
class _Exchange(Pending):
    """One relayed HTTP request, from the sender's request to the end of the response.

    Its entry in the broker's table (the secret of its request rendezvous) lives as long as the
    exchange; ``channel`` is the listener the broker told.
    """

    inline: bool
    #: Set from the control channel: the listener's response, or None if the channel died.
    control_response: asyncio.Future[_ListenerResponse | None] = field(init=False)
    #: Set when the listener opened this request's rendezvous.
    rendezvous: asyncio.Future[_Rendezvous] = field(init=False)
    #: The sender's body streaming to the listener (it may go on while the response streams).
    upload: asyncio.Task[None] | None = None
    #: A request from the relay's HTTP front (:meth:`HttpRelay.relay_inline`): the task that
    #: waits for a busy control channel, or streams a response from a rendezvous.
    task: asyncio.Task[None] | None = None
    #: The front's request waiting for the answer or the rendezvous (:class:`_InlineWait`),
    #: told by :meth:`answered` and :meth:`opened` (no done callbacks on the futures: three
    #: added and removed per request, each with a copy of the context, showed in profiles).
    waiter: _InlineWait | None = field(default=None, init=False)
    #: The running loop when the caller has it at hand: on Python 3.11 each look-up of it is a
    #: getpid system call.
    loop: InitVar[asyncio.AbstractEventLoop | None] = None

    def __post_init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        # One look-up of the loop for both futures, if the caller had none.
        if loop is None:
            loop = asyncio.get_running_loop()
        self.control_response = loop.create_future()
        self.rendezvous = loop.create_future()

    def answered(self, result: _ListenerResponse | None) -> None:
        """The listener's response (None: the listener went away); ``control_response`` must
        not be done. A waiter learns in a callback of its own, as a done callback would."""
        self.control_response.set_result(result)
        waiter = self.waiter
        if waiter is not None:
            self.control_response.get_loop().call_soon(waiter.on_answer)

    def opened(self, rendezvous: _Rendezvous) -> None:
        """The listener opened this request's rendezvous; ``rendezvous`` must not be done."""
        self.rendezvous.set_result(rendezvous)
        waiter = self.waiter
        if waiter is not None:
            self.rendezvous.get_loop().call_soon(waiter.on_rendezvous)

    def listener_gone(self) -> None:
        # Fail the request (502) unless the listener's rendezvous already carries it.
        if not self.rendezvous.done() and not self.control_response.done():
            self.answered(None)


class _InlineWait:
    """What settles an inline request from the front (:meth:`HttpRelay._await_inline`): the
    first of the listener's answer, its rendezvous, the deadline and the sender's going away;
    the others are then ignored. Bound methods as callbacks, not closures made per request.
    The deadline is an entry in the relay's :class:`~hybridrelay.server.deadlines.Deadlines`
    (one timer per deadline value, not one per request): ``settled`` tells it the wait is
    over, ``expire`` is its callback."""

    __slots__ = ("_deadlines", "_exchange", "_relay", "_sender", "_started", "deadline", "settled")

    def __init__(
        self,
        relay: HttpRelay,
        sender: InlineSender,
        exchange: _Exchange,
        deadline: float,
        started: float,
    ) -> None:
        self._relay = relay
        self._sender = sender
        self._exchange = exchange
        self.deadline = deadline
        self._started = started
        self.settled = False
        answer = exchange.control_response
        loop = answer.get_loop()
        self._deadlines = relay._deadlines.add(loop, deadline, self)
        # Came already (while a busy control channel was waited for): learnt in a callback, as
        # a done callback added to a done future would be.
        if answer.done():
            loop.call_soon(self.on_answer)
        elif exchange.rendezvous.done():
            loop.call_soon(self.on_rendezvous)
        exchange.waiter = self  # a cycle, until _settle breaks it
        sender.gone.add_done_callback(self._on_gone)

    def _settle(self) -> bool:
        if not self._deadlines.settle(self):
            return False
        self._exchange.waiter = None
        self._sender.gone.remove_done_callback(self._on_gone)
        return True

    def on_answer(self) -> None:
        """The exchange's ``control_response`` is set (:meth:`_Exchange.answered`)."""
        future = self._exchange.control_response
        if not future.cancelled() and self._settle():
            self._relay._inline_answered(
                self._sender, self._exchange, self._started, future.result()
            )

    def on_rendezvous(self) -> None:
        """The exchange's ``rendezvous`` is set (:meth:`_Exchange.opened`)."""
        future = self._exchange.rendezvous
        if not future.cancelled() and self._settle():
            exchange = self._exchange
            exchange.task = asyncio.create_task(
                self._relay._inline_over_rendezvous(
                    self._sender, exchange, future.result(), self.deadline, self._started
                )
            )

    def expire(self) -> None:
        if self._settle():
            self._relay._inline_failed(self._sender, self._exchange, self._started, 504, _NO_ANSWER)

    def _on_gone(self, _: object) -> None:
        if self._settle():
            exchange = self._exchange
            logger.info("request %s on %r: the sender went away", exchange.id, exchange.entity)
            self._relay._inline_done(self._sender, exchange, self._started, 400, 0)


@dataclass(slots=True)
class _BodyOwner:
    """Whom a control channel's next binary message belongs to (after ``body: true``).

    ``exchange`` is None when the request is no longer live: the body is then dropped.
    """

    exchange: _Exchange | None
    head: Response


class HttpRelay:
    """HTTP relaying: ``app.py`` routes E5 and E6 here, ``control_channel.py`` the listeners'
    ``response`` messages and their bodies.

    """

    def __init__(self, relay: RelayContext) -> None:
        self._relay = relay
        #: Live exchanges by request id: where a listener's ``response`` goes.
        self._by_id: dict[str, _Exchange] = {}
        #: Per control channel: whom the next binary message belongs to (after body:true).
        self._binary_owner: dict[ControlChannel, _BodyOwner] = {}
        #: Set each time an exchange ends: the relay's drain waits on it (``wait_exchanges``).
        self._exchange_ended = asyncio.Event()
        #: The Host the last ``Via`` entry was made for, and the entry (``_via``).
        self._via_for: str | None = None
        self._via_entry = ""
        #: The inline requests' response deadlines: one timer per deadline value.
        self._deadlines = Deadlines()
        #: The last response head made, and what it was made from (``response_head``).
        self._last_head: (
            tuple[RelayConfig, int, str, str, str | None, list[tuple[str, str]], ResponseHead]
            | None
        ) = None

    def live_exchanges(self, channel: ControlChannel | None = None) -> list[str]:
        """Ids of the requests in flight (those told to ``channel``, if given)."""
        return [key for key, e in self._by_id.items() if channel is None or e.channel is channel]

    async def wait_exchanges(self, channel: ControlChannel | None = None) -> None:
        """Return once no request (told to ``channel``, if given) is in flight; unbounded, the
        caller bounds it (the relay's drain: a listener's control channel carries responses)."""
        while self.live_exchanges(channel):
            self._exchange_ended.clear()
            await self._exchange_ended.wait()

    # -- E6: the sender ------------------------------------------------------------------

    async def handle_sender_request(
        self, request: web.BaseRequest, raw_path: str, raw_query: str
    ) -> web.StreamResponse:
        if request.method == "CONNECT":
            return error_response(405, "CONNECT cannot be relayed.")
        if "upgrade" in request.headers.get("Connection", "").lower() and request.headers.get(
            "Upgrade"
        ):
            return error_response(400, "Upgrades cannot be relayed; WebSockets use /$hc/.")
        resolved = sender_entity(raw_path, self._relay)
        if isinstance(resolved, web.Response):
            return resolved
        entity, suffix = resolved
        started = time.monotonic()
        exchange_id = tracking_id()
        response = await self._relay_request(
            request, entity, suffix, raw_path, raw_query, exchange_id
        )
        self._relay.observer.http_request(
            exchange_id,
            entity.name,
            method=request.method,
            status=response.status,
            seconds=time.monotonic() - started,
            request_bytes=request.content_length,
            response_bytes=response.body_length,
            remote=request.remote,
        )
        return response

    async def _relay_request(
        self,
        request: web.BaseRequest,
        entity: HybridConnectionConfig,
        suffix: str,
        raw_path: str,
        raw_query: str,
        exchange_id: str,
    ) -> web.StreamResponse:
        admitted = self.admit(
            entity,
            suffix,
            request.host,
            request.headers,
            request.headers.items(),
            raw_path,
            raw_query,
        )
        if isinstance(admitted, AuthDecision):
            return error_response(admitted.status, admitted.reason)
        headers, target = admitted
        peer = request.transport.get_extra_info("peername") if request.transport else None
        remote = remote_endpoint(peer)
        has_body = request.body_exists
        small = sends_inline(
            chunked="chunked" in request.headers.get("Transfer-Encoding", "").lower(),
            content_length=request.content_length,
            header_bytes=header_json_size(headers),
        )
        inline = small and self._relay.broker.answers_inline(entity.name)
        limits = self._relay.config.limits
        if self._relay.broker.pending_count >= limits.max_pending_rendezvous:
            return error_response(503, _TOO_MANY_PENDING)
        expect = request.headers.get("Expect")
        if expect is not None:
            # The relay answers Expect itself, once it knows it will take the body (auth and
            # routing passed), and never forwards it (PROTOCOL.md 6.1).
            if expect.lower() != "100-continue" or request.version < (1, 1):
                return error_response(417, "Only 'Expect: 100-continue' is supported.")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

        deadline = response_deadline(limits, entity)
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

        # Small but not inline: the broker drew another node's listener (one draw, not two).
        exchange = _Exchange(
            id=exchange_id, entity=entity.name, inline=inline, remote_first=small and not inline
        )
        built: dict[str, Request] = {}

        def full_request(base_url: str) -> Request:
            # The address is built from the listener's own base (ControlChannel.base_url),
            # never from this sender's Host header. Kept: announcing and the rendezvous both
            # need it for the same base (a dict, not functools.cache: that builds a wrapper
            # per request, which profiles showed).
            message = built.get(base_url)
            if message is None:
                message = built[base_url] = request_message(
                    exchange,
                    base_url,
                    target,
                    request.method,
                    headers,
                    remote,
                    body=bool(body) if inline else has_body,
                )
            return message

        refused = self._relay.broker.open(exchange, limits)
        if refused is not None:
            return error_response(refused.status, refused.description)
        self._by_id[exchange.id] = exchange
        try:
            if inline:
                channel = await self._relay.broker.announce(
                    exchange, lambda base: encode_message(full_request(base)), body or None
                )
            else:
                channel = await self._relay.broker.announce(
                    exchange,
                    lambda base: encode_message(
                        Request(address=full_request(base).address, id=exchange.id)
                    ),
                )
            if channel is None:
                if self._relay.draining():
                    # Admitted as the drain began: its listeners take nothing new now. 503 is
                    # retried elsewhere (a load balancer, a client with several nodes).
                    return error_response(503, "The relay is shutting down.")
                return error_response(502, "There are no listeners connected for the endpoint.")
            full = full_request(channel.base_url)
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

    def admit(
        self,
        entity: HybridConnectionConfig,
        suffix: str,
        host: str,
        headers: Mapping[str, str],
        items: Iterable[tuple[str, str]],
        raw_path: str,
        raw_query: str,
    ) -> tuple[dict[str, str], str] | AuthDecision:
        """A sender's request to ``entity``: the refusal of its token, or the ``requestHeaders``
        and ``requestTarget`` its listener is told (6.2). ``headers`` are the request's
        (case-insensitive), ``items`` the same in order, repeats included."""
        token, forwarded, target = sender_request(entity, headers, items, raw_path, raw_query)
        refusal = self.refusal(token, entity, suffix, host)
        return refusal if refusal is not None else (forwarded, target)

    def refusal(
        self, token: str | None, entity: HybridConnectionConfig, suffix: str, host: str
    ) -> AuthDecision | None:
        """Why a sender with ``token`` may not send to ``entity`` (``suffix`` below it, on
        ``host``), or None if it may: checked for every request (a token expires, a rule
        changes)."""
        if not entity.requires_client_authorization:
            return None
        decision = self._relay.access.authorize(
            token, entity, Rights.SEND, suffix=suffix, host=host
        )
        return None if decision.allowed else decision

    async def _await_response(
        self,
        request: web.BaseRequest,
        exchange: _Exchange,
        full: Request,
        has_body: bool,
        deadline: float,
    ) -> _ListenerResponse:
        gone = connection_gone(request)
        answered = (exchange.control_response, exchange.rendezvous)
        await _first_done(answered if gone is None else (*answered, gone), deadline)
        if not exchange.control_response.done() and not exchange.rendezvous.done():
            if gone is not None and gone.done():
                # The sender left before the answer: the rendezvous (if any) is closed now.
                raise _SenderGone()
            raise _ExchangeFailed(504, _NO_ANSWER)
        if exchange.control_response.done():
            answer = exchange.control_response.result()
            if answer is None:
                raise _ExchangeFailed(502, "The listener disconnected before responding.")
            return answer
        rendezvous = exchange.rendezvous.result()
        return await self._over_rendezvous(
            exchange, rendezvous, full, request if has_body else None, deadline, gone
        )

    async def _over_rendezvous(
        self,
        exchange: _Exchange,
        rendezvous: _Rendezvous,
        full: Request | None,
        upload_from: web.BaseRequest | None,
        deadline: float,
        gone: asyncio.Future[None] | None,
    ) -> _ListenerResponse:
        """The listener's response on the rendezvous it opened; first, for an address-only
        request, the request itself and (``upload_from``) its body (6.3 case 1)."""
        socket = rendezvous.socket
        if not exchange.inline and full is not None:  # address-only: the request goes here (6.3)
            try:
                async with asyncio.timeout(deadline):
                    await socket.send(encode_message(full))
            except (RelayConnectionError, TimeoutError) as exc:
                raise _ExchangeFailed(502, "The listener's rendezvous failed.") from exc
            if upload_from is not None:
                exchange.upload = asyncio.create_task(_upload(upload_from, socket, deadline))
        upload = exchange.upload
        receive = asyncio.create_task(socket.receive())
        try:
            if upload is not None:
                await asyncio.wait({receive, upload}, return_when="FIRST_COMPLETED")
                if upload.done():
                    upload.result()  # raises _SenderGone / _ExchangeFailed
            # The response deadline runs from the end of the upload (or an early answer); an
            # upload still going on continues while the response streams.
            while True:
                message = await _wait_for(receive, deadline, gone)
                if message is None:
                    raise _ExchangeFailed(504, _NO_ANSWER)
                if message.kind is MessageKind.CLOSE:
                    if upload is not None and upload.done():
                        upload.result()  # the sender's side failed first
                    raise _ExchangeFailed(502, "The listener closed the rendezvous.")
                if message.kind is MessageKind.BINARY and not message.data and not message.more:
                    receive = asyncio.create_task(socket.receive())
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
                receive = asyncio.create_task(socket.receive())
            return _ListenerResponse(parsed, b"", socket if parsed.body else None)
        finally:
            if not receive.done():
                receive.cancel()
            with contextlib.suppress(BaseException):
                await receive  # also retrieves an exception nobody needs any more

    def response_head(
        self, method: str, host: str, response: Response
    ) -> ResponseHead | web.Response:
        """What the sender is told of the listener's ``response`` (6.5), or the 502 to answer
        instead: the status, a safe reason phrase, the headers without hop-by-hop ones and with
        this relay's ``Via`` entry added, and the listener's ``Content-Length`` apart."""
        status = response.status_code
        if status < 200:
            return error_response(502, f"The listener answered with status {status}.")
        if response.repeated_headers:
            return self._make_response_head(method, host, response)
        # A listener's responses often differ in nothing but their body: the last head made
        # is given again while everything it was made from is the same (header order too).
        config = self._relay.config
        made_from = (
            config,
            status,
            method,
            host,
            response.status_description,
            list(response.response_headers.items()),
        )
        last = self._last_head
        if last is not None and last[0] is config and last[1:6] == made_from[1:]:
            return last[6]
        head = self._make_response_head(method, host, response)
        self._last_head = (*made_from, head)
        return head

    def _make_response_head(self, method: str, host: str, response: Response) -> ResponseHead:
        status = response.status_code
        reason = reason_phrase(response.status_description or "") or None
        headers: list[tuple[str, str]] = []
        hops: list[str] = []
        listener_length: int | None = None
        relayed = _plain_response_headers(response)
        if relayed is None:
            relayed = forwarded_response_headers(
                expand_repeated_headers(response.response_headers, response.repeated_headers)
            )
        for name, value in relayed:
            key = name.lower()
            if key == "content-length":
                listener_length = int(value) if value.isdigit() else None
            elif key == "via":
                hops.append(value)
            else:
                headers.append((name, value))
        hops.append(self._via(host))
        headers.append(("Via", ", ".join(hops)))
        return ResponseHead(
            status, reason, headers, listener_length, response_has_body(method, status)
        )

    async def _respond(
        self, request: web.BaseRequest, result: _ListenerResponse, deadline: float
    ) -> web.StreamResponse:
        head = self.response_head(request.method, request.host, result.response)
        if not isinstance(head, ResponseHead):
            return head
        stream = result.stream
        if not head.has_body:
            # HEAD keeps the listener's Content-Length (what a GET would send); no body is
            # relayed even if the listener sent one.
            out = web.StreamResponse(status=head.status, reason=head.reason)
            out.headers.extend(head.headers)
            if request.method == "HEAD" and head.listener_length is not None:
                out.content_length = head.listener_length
            return await self._send_head_only(request, out, deadline)
        body, more = result.body, False
        if stream is not None:
            try:
                body, more = await next_part(stream, deadline)
            except BodyBroken as exc:
                return error_response(502, str(exc))
        if not more and len(body) <= _WRITE_SLICE:
            # The common small response: aiohttp sends head and body in one write once the
            # handler returns (profiles showed transport.write as the relay's top cost).
            small = web.Response(status=head.status, reason=head.reason, body=body)
            small.headers.extend(head.headers)
            return small
        out = web.StreamResponse(status=head.status, reason=head.reason)
        out.headers.extend(head.headers)
        await stream_body(
            _AiohttpSink(request, out), head, body, more, stream, deadline, connection_gone(request)
        )
        return out

    @staticmethod
    async def _send_head_only(
        request: web.BaseRequest, out: web.StreamResponse, deadline: float
    ) -> web.StreamResponse:
        try:
            async with asyncio.timeout(deadline):
                await out.prepare(request)
                await out.write_eof()
        except (ConnectionError, TimeoutError) as exc:
            logger.info("response to the sender failed: %s", type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
        return out

    # -- E6 through the relay's own HTTP front (sender_http.py) ------------------------------

    def relay_inline(
        self,
        sender: InlineSender,
        entity: HybridConnectionConfig,
        headers: dict[str, str],
        target: str,
        body: bytes,
    ) -> None:
        """Relay a request the front has read whole and found small (inline, 6.2), without a
        task of its own while the listener's control channel takes it at once and answers on
        it: the listener's answer, its deadline and the sender's going away each settle the
        exchange by a callback. A busy control channel, or a response that the listener sends
        on a rendezvous, gets a task (owned by the exchange)."""
        started = time.monotonic()
        exchange = _Exchange(
            id=tracking_id(), entity=entity.name, inline=True, loop=sender.gone.get_loop()
        )
        limits = self._relay.config.limits
        broker = self._relay.broker
        if broker.pending_count >= limits.max_pending_rendezvous:
            self._inline_refused(sender, exchange, started, error_response(503, _TOO_MANY_PENDING))
            return
        refused = broker.open(exchange, limits)
        if refused is not None:
            answer = error_response(refused.status, refused.description)
            self._inline_refused(sender, exchange, started, answer)
            return
        self._by_id[exchange.id] = exchange
        remote = sender.remote_endpoint

        def text_for(base_url: str) -> str:
            # request_message's text, without the Request in between (encode_request).
            return encode_request(
                _request_address(exchange, base_url),
                exchange.id,
                target,
                sender.method,
                headers,
                remote,
                body=bool(body),
            )

        deadline = response_deadline(limits, entity)
        told = broker.announce_nowait(exchange, text_for, body or None)
        if told is WOULD_WAIT:
            exchange.task = asyncio.create_task(
                self._announce_inline(sender, exchange, text_for, body, deadline, started)
            )
        elif told is None:
            self._no_listener(sender, exchange, started)
        else:
            self._await_inline(sender, exchange, deadline, started)

    async def _announce_inline(
        self,
        sender: InlineSender,
        exchange: _Exchange,
        text_for: Callable[[str], str],
        body: bytes,
        deadline: float,
        started: float,
    ) -> None:
        channel = await self._relay.broker.announce(exchange, text_for, body or None)
        if channel is None:
            self._no_listener(sender, exchange, started)
        else:
            self._await_inline(sender, exchange, deadline, started)

    def _no_listener(self, sender: InlineSender, exchange: _Exchange, started: float) -> None:
        if self._relay.draining():
            answer = error_response(503, "The relay is shutting down.")
        else:
            answer = error_response(502, "There are no listeners connected for the endpoint.")
        self._inline_refused(sender, exchange, started, answer)

    def _await_inline(
        self, sender: InlineSender, exchange: _Exchange, deadline: float, started: float
    ) -> None:
        """Settle the exchange by whichever comes first: the listener's answer on its control
        channel, the rendezvous it opened for a large response, the deadline, the sender
        gone (:class:`_InlineWait`)."""
        _InlineWait(self, sender, exchange, deadline, started)

    def _inline_answered(
        self,
        sender: InlineSender,
        exchange: _Exchange,
        started: float,
        result: _ListenerResponse | None,
    ) -> None:
        if result is None:
            answer = error_response(502, "The listener disconnected before responding.")
            self._inline_refused(sender, exchange, started, answer)
            return
        head = self.response_head(sender.method, sender.host, result.response)
        if not isinstance(head, ResponseHead):
            self._inline_refused(sender, exchange, started, head)
            return
        sent = sender.answer_head(head, result.body)
        self._inline_done(sender, exchange, started, head.status, sent)

    async def _inline_over_rendezvous(
        self,
        sender: InlineSender,
        exchange: _Exchange,
        rendezvous: _Rendezvous,
        deadline: float,
        started: float,
    ) -> None:
        """A response the listener sends on a rendezvous (6.3 case 2), streamed to the front."""
        try:
            result = await self._over_rendezvous(
                exchange, rendezvous, None, None, deadline, sender.gone
            )
            head = self.response_head(sender.method, sender.host, result.response)
            if not isinstance(head, ResponseHead):
                self._inline_refused(sender, exchange, started, head)
                return
            body, more, stream = b"", False, result.stream
            if head.has_body and stream is not None:
                body, more = await next_part(stream, deadline)
            if not more and len(body) <= _WRITE_SLICE:
                sent = sender.answer_head(head, body)
            else:
                sent = await stream_body(
                    sender.sink(head), head, body, more, stream, deadline, sender.gone
                )
            self._inline_done(sender, exchange, started, head.status, sent)
        except _ExchangeFailed as exc:
            self._inline_failed(sender, exchange, started, exc.status, exc.description)
        except BodyBroken as exc:
            self._inline_refused(sender, exchange, started, error_response(502, str(exc)))
        except _SenderGone:
            logger.info("request %s on %r: the sender went away", exchange.id, exchange.entity)
            self._inline_done(sender, exchange, started, 400, 0)

    def _inline_failed(
        self, sender: InlineSender, exchange: _Exchange, started: float, status: int, why: str
    ) -> None:
        logger.info("request %s on %r failed: %d %s", exchange.id, exchange.entity, status, why)
        self._inline_refused(sender, exchange, started, error_response(status, why))

    def _inline_refused(
        self, sender: InlineSender, exchange: _Exchange, started: float, answer: web.Response
    ) -> None:
        self._inline_done(sender, exchange, started, answer.status, sender.answer(answer))

    def _inline_done(
        self, sender: InlineSender, exchange: _Exchange, started: float, status: int, sent: int
    ) -> None:
        self._end(exchange)
        exchange.task = None
        self._relay.observer.http_request(
            exchange.id,
            exchange.entity,
            method=sender.method,
            status=status,
            seconds=time.monotonic() - started,
            request_bytes=sender.content_length,
            response_bytes=sent,
            remote=sender.remote,
        )
        sender.done()

    def _via(self, request_host: str) -> str:
        """This relay's ``Via`` entry (``1.1 host``); the last one is kept, as every response
        of a relay with ``namespace.host`` (or of one client's connection) has the same."""
        host = self._relay.config.namespace_host or request_host or "hybridrelay"
        if host != self._via_for:
            name = "".join(ch for ch in host if ch.isprintable() and ch not in " ,;\r\n")
            self._via_for, self._via_entry = host, f"1.1 {name[:255]}"
        return self._via_entry

    async def _finish(self, exchange: _Exchange) -> None:
        self._end(exchange)
        upload, exchange.upload = exchange.upload, None
        if upload is not None:
            if not upload.done():
                upload.cancel()
            with contextlib.suppress(BaseException):
                await upload  # also retrieves an exception nobody needs any more

    def _end(self, exchange: _Exchange) -> None:
        """The exchange is over: out of the tables, its rendezvous closed (an upload still
        running is ``_finish``'s to end)."""
        self._by_id.pop(exchange.id, None)
        self._exchange_ended.set()
        channel = exchange.channel
        self._relay.broker.forget(exchange)
        owner = self._binary_owner.get(channel) if channel is not None else None
        if owner is not None and owner.exchange is exchange:
            owner.exchange = None  # its body still arrives on the channel; drop it then
        if not exchange.control_response.done():
            exchange.control_response.cancel()
        if exchange.rendezvous.done() and not exchange.rendezvous.cancelled():
            # The close handshake runs on its own (the leg drops the connection once the
            # listener answered, or after its close timeout).
            exchange.rendezvous.result().socket.close_nowait(CloseCode.NORMAL, "")
        else:
            exchange.rendezvous.cancel()

    # -- E5: the listener's request rendezvous ----------------------------------------------

    async def handle_request_rendezvous(
        self, request: web.BaseRequest, params: dict[str, str]
    ) -> web.StreamResponse:
        address = parse_accept_params(params)
        exchange = self._relay.broker.claim(address.secret, address.connection_id, _Exchange)
        if exchange is None:
            return error_response(403, "The rendezvous address is not valid or has expired.")
        try:
            headers = handshake_headers(request.headers, None)
        except HandshakeError as exc:
            return error_response(exc.status, str(exc))
        response, leg = await hand_over(
            request,
            headers,
            lambda transport: MessageLeg(transport, max_text_size=CONTROL_MAX_MESSAGE),
        )
        if leg is None:
            return response
        leg.start()
        if exchange.rendezvous.done():  # the sender's handler is over
            leg.close_nowait(CloseCode.GOING_AWAY, "request is over")
        else:
            exchange.opened(_Rendezvous(leg))
        return response

    # -- the listeners' control channels ----------------------------------------------------

    def on_control_message(self, channel: ControlChannel, message: ControlMessage) -> bool:
        """A listener's message other than renewToken; False closes the channel (1002).
        Called in the channel's read callback, in the order the messages came."""
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
            exchange.answered(_ListenerResponse(message, b""))
        return True

    def on_control_binary(self, channel: ControlChannel, data: bytes) -> bool:
        """A binary message on a control channel: the body of the last ``response``; False
        (no ``response`` announced one) closes the channel (1002)."""
        owner = self._binary_owner.pop(channel, None)
        if owner is None:
            return not data  # hyco-https' stray empty message after body:false (6.6)
        exchange = owner.exchange
        if exchange is not None and not exchange.control_response.done():
            exchange.answered(_ListenerResponse(owner.head, data))
        return True

    def forget_channel(self, channel: ControlChannel) -> None:
        """The channel is gone (the requests told to it fail through the broker): drop the
        body it still owed."""
        self._binary_owner.pop(channel, None)


# -- helpers -------------------------------------------------------------------------------


def sender_request(
    entity: HybridConnectionConfig,
    headers: Mapping[str, str],
    items: Iterable[tuple[str, str]],
    raw_path: str,
    raw_query: str,
) -> tuple[str | None, dict[str, str], str]:
    """What a sender's request to ``entity`` says apart from the relay's state: the token it
    carries (PROTOCOL.md 3.4; the ``sb-hc-token`` cookie last, a browser's), and the
    ``requestHeaders`` and ``requestTarget`` its listener is told (6.2). The same head and
    entity always give the same, so the front keeps them for a keep-alive client's next
    request with that head (``sender_http._Parsed``)."""
    token, strip_authorization = sender_token(headers, protocol_params(raw_query), entity)
    if token is None and entity.requires_client_authorization:
        token = cookie_token(headers)
    forwarded = forwarded_request_headers(items, strip_authorization)
    strip_token_cookie(headers, forwarded)
    target = raw_path + ("?" + filtered if (filtered := filter_query(raw_query)) else "")
    return token, forwarded, target


def request_message(
    exchange: _Exchange,
    base_url: str,
    target: str,
    method: str,
    headers: dict[str, str],
    remote: RemoteEndpoint | None,
    *,
    body: bool,
) -> Request:
    """The ``request`` message of ``exchange`` (6.2) for a listener whose rendezvous base is
    ``base_url``: the address is built from the listener's own base (``ControlChannel``),
    never from the sender's ``Host``."""
    return Request(
        address=_request_address(exchange, base_url),
        id=exchange.id,
        request_target=target,
        method=method,
        request_headers=headers,
        remote_endpoint=remote,
        body=body,
    )


def _request_address(exchange: _Exchange, base_url: str) -> str:
    """The rendezvous address of ``exchange``'s request for a listener whose base is
    ``base_url`` (the listener's own, never the sender's ``Host``)."""
    return rendezvous_url(
        base_url,
        exchange.entity,
        action="request",
        connection_id=exchange.id,
        secret=exchange.secret,
    )


def forwarded_request_headers(
    items: Iterable[tuple[str, str]], strip_authorization: bool
) -> dict[str, str]:
    """The ``requestHeaders`` of a request message (PROTOCOL.md 6.2).

    Connection-level headers (and those the ``Connection`` header names), ``Expect`` and the
    relay's auth material are removed; repeated headers are joined with ``", "``; a name keeps
    the spelling of its first occurrence.
    """
    dropped = _REQUEST_DROPPED_WITH_AUTHORIZATION if strip_authorization else _REQUEST_DROPPED
    return merge_repeated_headers(without_hop_by_hop(items, also=dropped))


def forwarded_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The listener's response headers minus hop-by-hop headers (6.5), ``Content-Length``
    kept for the relay to read; values made safe."""
    return [
        (name, value.replace("\r", " ").replace("\n", " "))
        for name, value in without_hop_by_hop(headers, keep=_KEEP_LENGTH)
        if _is_token(name)
    ]


def _plain_response_headers(response: Response) -> list[tuple[str, str]] | None:
    """:func:`forwarded_response_headers` of the common response (no repeated headers, no
    ``Connection`` header naming others) in one pass, or None for the general path: the same
    pairs in the same order (a hypothesis test compares)."""
    if response.repeated_headers:
        return None
    out: list[tuple[str, str]] = []
    for name, value in response.response_headers.items():
        key = name.lower()
        if key in _RESPONSE_HOP_BY_HOP:
            if key == "connection":
                return None  # the names it lists are dropped too: the general path
            continue
        if _TOKEN.fullmatch(name) is None:
            continue
        if "\r" in value or "\n" in value:
            value = value.replace("\r", " ").replace("\n", " ")
        out.append((name, value))
    return out


# RFC 9110 token characters; a compiled regex is ~10x faster than a per-character check.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_token(name: str) -> bool:
    return _TOKEN.fullmatch(name) is not None


def response_deadline(limits: LimitsConfig, entity: HybridConnectionConfig) -> float:
    """How long the relay waits for a listener's response: the entity's own
    ``http_response_timeout`` if it has one, else the relay's."""
    if entity.http_response_timeout is not None:
        return entity.http_response_timeout
    return limits.http_response_timeout


async def _first_done(futures: tuple[asyncio.Future[Any], ...], seconds: float) -> None:
    """Return once one of ``futures`` is done or ``seconds`` have passed.

    What ``asyncio.wait(..., return_when=FIRST_COMPLETED)`` does, without the sets it builds
    and checks on every call: once per relayed request, it showed in the relay's profile.
    """
    if any(future.done() for future in futures):
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in futures:
        future.add_done_callback(wake)
    timer = loop.call_later(seconds, wake, None)
    try:
        await waiter
    finally:
        timer.cancel()
        for future in futures:
            future.remove_done_callback(wake)


async def _wait_for(
    task: asyncio.Task[T], seconds: float, gone: asyncio.Future[None] | None = None
) -> T | None:
    """The task's result, or None (task left running) if it takes longer than ``seconds``.

    Raises :class:`_SenderGone` when ``gone`` (the sender's connection lost) comes first.
    """
    waiters: set[asyncio.Future[Any]] = {task} if gone is None else {task, gone}
    done, _ = await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
    if task in done:
        return task.result()
    if done:
        raise _SenderGone()
    return None


async def next_part(stream: MessageLeg, idle: float) -> tuple[bytes, bool]:
    """The next part of a response body on the rendezvous: (bytes, more parts follow).

    Raises :class:`BodyBroken` when the rendezvous closes before the body's end or nothing
    arrives for ``idle`` seconds (6.8: a stalled body).
    """
    try:
        async with asyncio.timeout(idle):
            message = await stream.receive()
    except TimeoutError:
        raise BodyBroken("the listener's response body stalled") from None
    if message.kind is MessageKind.BINARY:
        data = message.data
        assert isinstance(data, bytes)
        return data, message.more
    if message.kind is MessageKind.CLOSE:
        raise BodyBroken("the listener closed the rendezvous mid-response")
    raise BodyBroken("the listener sent a text message as its response body")


@dataclass(slots=True)
class ResponseHead:
    """The head of a relayed response as the sender gets it (:meth:`HttpRelay.response_head`)."""

    status: int
    reason: str | None
    #: Without ``Content-Length`` (the sender's connection frames the body), with ``Via``.
    headers: list[tuple[str, str]]
    #: The listener's ``Content-Length``, if it gave one: a streamed body is held to it.
    listener_length: int | None
    #: False for HEAD, 1xx, 204 and 304 (RFC 9110 6.4.1).
    has_body: bool
    #: The status line and header lines as the relay's front writes them, and which of the
    #: headers it adds the head lacks, per HTTP version (``sender_http._head_lines``): made
    #: once for a head given again (``HttpRelay.response_head``).
    lines: dict[bytes, tuple[bytes, frozenset[str]]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )


class InlineSender(Protocol):
    """A sender's request as the relay's HTTP front holds it (``sender_http.py``), read whole,
    and how its answer is written (:meth:`HttpRelay.relay_inline`)."""

    #: The request's method, its ``Host`` (the token audience and ``Via`` are made from it),
    #: its peer's address as the listener is told it (``remoteEndpoint``, made once per
    #: connection) and the peer's host alone (logs, metrics).
    method: str
    host: str
    remote_endpoint: RemoteEndpoint | None
    remote: str | None
    #: The request body's length, None when it had none.
    content_length: int | None
    #: Resolved when the sender's connection is lost.
    gone: asyncio.Future[None]

    def answer(self, response: web.Response) -> int:
        """Write one of the relay's own answers (an error); the body's length."""

    def answer_head(self, head: ResponseHead, body: bytes) -> int:
        """Write a listener's response with its whole body; the body's length."""

    def sink(self, head: ResponseHead) -> BodySink:
        """Where a response body with ``head`` goes when it streams."""

    def done(self) -> None:
        """The exchange is over: the connection may read its next request."""


class BodySink(Protocol):
    """Where a streamed response body goes: the sender's connection, through aiohttp's
    response (:class:`_AiohttpSink`) or the relay's own HTTP front (``sender_http.py``)."""

    async def start(self, length: int | None) -> None:
        """Send the head: with ``Content-Length: length``, or chunked when None."""

    async def write(self, data: bytes | memoryview) -> None:
        """Send a part of the body (the caller bounds the wait)."""

    async def end(self) -> None:
        """The body is complete (the last chunk, for chunked)."""

    def cut(self) -> None:
        """Drop the sender's connection: the response is incomplete and cannot be ended."""


class _AiohttpSink:
    def __init__(self, request: web.BaseRequest, out: web.StreamResponse) -> None:
        self._request = request
        self._out = out

    async def start(self, length: int | None) -> None:
        if length is not None:
            self._out.content_length = length
        await self._out.prepare(self._request)

    async def write(self, data: bytes | memoryview) -> None:
        await self._out.write(data)

    async def end(self) -> None:
        await self._out.write_eof()

    def cut(self) -> None:
        if self._request.transport is not None:
            self._request.transport.close()


async def stream_body(
    sink: BodySink,
    head: ResponseHead,
    body: bytes,
    more: bool,
    stream: MessageLeg | None,
    deadline: float,
    gone: asyncio.Future[None] | None,
) -> int:
    """Send a response body to the sender: ``body`` (the first part, or all of it), then the
    parts that follow on the rendezvous ``stream`` while ``more``, each as it arrives.

    It goes under the listener's ``Content-Length`` when it gave one (and is held to it),
    with the length of ``body`` when that is all of it, else chunked. A sender that goes away
    gets the rendezvous closed (1001) at once, so the listener learns; a response that breaks
    off is cut (the sender sees no last chunk, or fewer bytes than announced). The bytes sent.
    """

    def sender_gone(_: object) -> None:
        if stream is not None:
            stream.close_nowait(CloseCode.GOING_AWAY, "the HTTP client went away")

    if gone is not None and stream is not None:
        gone.add_done_callback(sender_gone)
    limit = head.listener_length
    sent = 0
    try:
        async with asyncio.timeout(deadline):
            await sink.start(limit if limit is not None else None if more else len(body))
        while True:
            sent += len(body)
            if limit is not None and sent > limit:
                raise BodyBroken("the listener sent more than its Content-Length")
            view = memoryview(body)
            for start in range(0, len(body), _WRITE_SLICE):
                async with asyncio.timeout(deadline):  # the sender must keep reading
                    await sink.write(view[start : start + _WRITE_SLICE])
            if not more or stream is None:
                break
            body, more = await next_part(stream, deadline)
        if limit is not None and sent != limit:
            raise BodyBroken("the listener sent less than its Content-Length")
        async with asyncio.timeout(deadline):
            await sink.end()
    except (ConnectionError, TimeoutError, BodyBroken) as exc:
        logger.info("response to the sender cut: %s", exc or type(exc).__name__)
        if stream is not None:
            stream.close_nowait(CloseCode.GOING_AWAY, "the response was cut")
        sink.cut()
    finally:
        if gone is not None and stream is not None:
            gone.remove_done_callback(sender_gone)
    return sent


async def _upload(request: web.BaseRequest, socket: MessageLeg, idle: float) -> None:
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
