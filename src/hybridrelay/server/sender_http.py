"""The relay's own HTTP/1.1 front for senders' plain requests (PROTOCOL.md 6; DECISIONS D25).

Every connection that passed the gate (``connection_gate.py``) comes here first. Each request
head is found by its blank line and parsed by httptools (llhttp, the C parser uvicorn uses),
then either relayed from here or the connection is handed to aiohttp:

* **relayed here**: a plain request to ``/{hc}/{path}`` that can go inline (6.2): no body or a
  ``Content-Length`` of at most 64 KiB, no ``Transfer-Encoding``, no ``Expect``, no upgrade,
  its token accepted and the broker answering it on this process. Its body is read whole and
  :meth:`HttpRelay.relay_inline` relays it without a task of its own; the answer is written
  here, head and body in one write. The relay's profile (D17) had aiohttp's request and
  response objects, its handler task and its writer among the costs of every request.
* **handed to aiohttp**, with the request's bytes exactly as they came, for everything else:
  WebSocket upgrades (listeners, senders, rendezvous, HTTP-relayed WebSockets), the runtime
  information, bodies that stream (chunked, large), ``Expect: 100-continue``, heads llhttp
  refuses, and the requests answered with an error before anything is relayed (an unknown
  entity, a refused token, a relay that drains): aiohttp's path answers those exactly as it
  always has. The connection stays with aiohttp from then on.

One request at a time: a pipelined request waits in the buffer until the one before it is
answered, and reading pauses while more than a head and an inline body are waiting. A
connection that sends no complete request within ``limits.idle_timeout`` of its last answer
is closed, as aiohttp's keep-alive timeout did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import httptools
from aiohttp import web
from multidict import CIMultiDict

from hybridrelay.protocol.addressing import HC_PREFIX
from hybridrelay.protocol.http import INLINE_BODY_LIMIT, INLINE_HEADER_LIMIT, header_json_size
from hybridrelay.protocol.messages import RemoteEndpoint
from hybridrelay.server.broker import remote_endpoint
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.http_relay import (
    BodySink,
    HttpRelay,
    ResponseHead,
    response_deadline,
    sender_request,
)
from hybridrelay.server.http_upgrade import sender_entity
from hybridrelay.server.responses import SERVER_HEADER, error_response, tracking_id
from hybridrelay.server.runtime_info import is_runtime_info

__all__ = ["SenderFront"]

#: What may wait in a connection's buffer while a request is answered: a head and an inline
#: body (reading pauses above it).
_BUFFER_LIMIT = 2 * INLINE_BODY_LIMIT
#: A request head longer than this, or with more headers, is handed to aiohttp: below both,
#: none of its limits (8190 bytes a line, 32 KiB a field, 128 headers) can be reached, so the
#: front never takes a head aiohttp would refuse.
_LARGE_HEAD = 8190
_MANY_HEADERS = 100


class SenderFront:
    """Makes the protocol of each connection the gate lets in (see the module docstring)."""

    def __init__(
        self,
        relay: RelayContext,
        http: HttpRelay,
        aiohttp_handler: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self.relay = relay
        self.http = http
        self.aiohttp_handler = aiohttp_handler
        #: The connections the front owns now (not yet handed to aiohttp, not closed).
        self.connections: set[_SenderConnection] = set()

    def __call__(self) -> asyncio.Protocol:
        return _SenderConnection(self)

    def close_all(self) -> None:
        """Close every connection the front owns (the relay's shutdown; aiohttp closes its
        own): a request still in flight is failed by its exchange."""
        for connection in list(self.connections):
            connection.close()


class _Head:
    """httptools' callbacks for one request head: its target, headers, method, version and
    whether the connection stays open after it (read as the head ends: llhttp resets its
    state when a message without a body is complete)."""

    __slots__ = ("headers", "keep_alive", "method", "parser", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.parser = httptools.HttpRequestParser(self)
        self.method = b""
        self.version = ""
        self.keep_alive = False

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.method = parser.get_method()
        self.version = parser.get_http_version()
        self.keep_alive = parser.should_keep_alive()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp reads them: UTF-8, undecodable bytes kept as surrogates.
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )


class _Inline:
    """A request the front relays, from its head on: what the exchange needs of it (entity,
    forwarded headers, target, body length, keep-alive, version), what
    :class:`~HttpRelay.relay_inline` needs of it (the ``InlineSender`` protocol) and how its
    answer reaches the connection. One object per request, made when its head is read."""

    __slots__ = (
        "connection",
        "content_length",
        "entity",
        "gone",
        "headers",
        "host",
        "keep_alive",
        "length",
        "method",
        "remote",
        "remote_endpoint",
        "target",
        "version",
    )

    def __init__(
        self,
        connection: _SenderConnection,
        parsed: _Parsed,
        entity: HybridConnectionConfig,
        headers: dict[str, str],
        target: str,
    ) -> None:
        self.connection = connection
        self.method = parsed.method
        self.host = parsed.host
        self.entity = entity
        self.headers = headers
        self.target = target
        self.length = parsed.length
        self.content_length = parsed.length or None
        self.keep_alive = parsed.keep_alive
        self.version = parsed.version
        self.remote_endpoint = connection.remote_endpoint
        self.remote = connection.remote
        self.gone = connection.gone

    def answer(self, response: web.Response) -> int:
        body = response.body
        assert isinstance(body, bytes)
        head = ResponseHead(
            response.status, response.reason, list(response.headers.items()), None, True
        )
        # A HEAD's length: what the GET would have had (as aiohttp does).
        self.connection.write_response(head, body, self.method, empty_length=len(body))
        return len(body)

    def answer_head(self, head: ResponseHead, body: bytes) -> int:
        if not head.has_body:
            length = head.listener_length if self.method == "HEAD" else None
            self.connection.write_response(head, b"", self.method, empty_length=length)
            return 0
        self.connection.write_response(head, body, self.method)
        return len(body)

    def sink(self, head: ResponseHead) -> BodySink:
        return _StreamedBody(self.connection, head)

    def done(self) -> None:
        self.connection.request_done()


class _StreamedBody:
    """A response body written as it arrives: under a length, chunked (HTTP/1.1), or until
    the connection closes (HTTP/1.0)."""

    def __init__(self, connection: _SenderConnection, head: ResponseHead) -> None:
        self._connection = connection
        self._head = head
        self._chunked = False
        #: The response head, until it goes out with the first part of the body (one write).
        self._unsent = b""

    async def start(self, length: int | None) -> None:
        self._unsent, self._chunked = self._connection.stream_head(self._head, length)

    async def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self._chunked:
            part = b"%x\r\n" % len(data) + bytes(data) + b"\r\n"
        else:
            part = bytes(data)
        self._connection.write(self._unsent + part if self._unsent else part)
        self._unsent = b""
        await self._connection.drain()

    async def end(self) -> None:
        last = b"0\r\n\r\n" if self._chunked else b""
        if self._unsent or last:
            self._connection.write(self._unsent + last)
            self._unsent = b""
        await self._connection.drain()
        if not self._connection.keep_alive:
            self._connection.close()

    def cut(self) -> None:
        self._connection.close()


class _SenderConnection(asyncio.Protocol):
    """One sender's connection while the front owns it."""

    def __init__(self, front: SenderFront) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._raw = bytearray()
        #: The request whose body is still arriving: (its head's size, its body's, the request).
        self._waiting: tuple[int, int, _Inline] | None = None
        #: The last head parsed on this connection and what it says (see :class:`_Parsed`).
        self._parsed: _Parsed | None = None
        self._busy = False
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._answered_at = 0.0
        #: When the body of the request in ``_waiting`` must have arrived (408 after that).
        self._body_due: float | None = None
        self.keep_alive = True
        self.version = b"1.1"
        self.peer: Any = None
        self.remote_endpoint: RemoteEndpoint | None = None
        self.remote: str | None = None
        #: The loop, kept: on Python 3.11 each look-up is a getpid system call.
        self._loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._front.connections.add(self)
        self.peer = transport.get_extra_info("peername")
        if isinstance(self.peer, tuple) and self.peer:
            self.remote = str(self.peer[0])
        self.remote_endpoint = remote_endpoint(self.peer)
        loop = asyncio.get_running_loop()
        self._answered_at = loop.time()
        self._arm_idle(loop)

    def data_received(self, data: bytes) -> None:
        self._raw += data
        if not self._busy:
            self._advance()
        elif len(self._raw) > _BUFFER_LIMIT and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True

    def eof_received(self) -> bool | None:
        # The sender is gone, as aiohttp took it (and nginx does): the transport closes, an
        # exchange in flight ends (the listener learns: its rendezvous, if any, is closed).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.gone.done():
            self.gone.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionResetError("the sender's connection is lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- requests ----------------------------------------------------------------------------

    def _advance(self) -> None:
        """Take the next request from the buffer, if it is all there."""
        while not self._busy and self._transport is not None:
            if self._waiting is None:
                end = self._raw.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._raw) > self._front.relay.config.limits.max_header_bytes:
                        self._hand_over()  # aiohttp answers the oversized head
                    return
                size = end + 4
                # A large head is aiohttp's, whose limits apply to it exactly as before.
                if size > _LARGE_HEAD:
                    self._hand_over()
                    return
                # The same head as the last one (a keep-alive client's next request): what
                # its bytes say is known; the rest (entity, token, limits) is asked anew.
                parsed = self._parsed
                if (
                    parsed is None
                    or len(parsed.head) != size
                    or not self._raw.startswith(parsed.head)
                ):
                    parsed = _parse(bytes(self._raw[:size]))
                    if parsed is None:
                        self._hand_over()
                        return
                    self._parsed = parsed
                prepared = self._prepare(parsed)
                if prepared is None:
                    self._hand_over()
                    return
                self._waiting = (size, prepared.length, prepared)
            head_size, length, prepared = self._waiting
            if len(self._raw) < head_size + length:
                if self._body_due is None:
                    self._expect_body(prepared)
                return
            self._body_due = None
            if length:
                body = bytes(self._raw[head_size : head_size + length])
                del self._raw[: head_size + length]
            else:
                body = b""
                if len(self._raw) == head_size:
                    self._raw.clear()
                else:
                    del self._raw[:head_size]
            self._waiting = None
            self._busy = True
            self.keep_alive = prepared.keep_alive
            self.version = prepared.version
            self._front.http.relay_inline(
                prepared, prepared.entity, prepared.headers, prepared.target, body
            )

    def _prepare(self, parsed: _Parsed) -> _Inline | None:
        """The request whose head says ``parsed``, if the front relays it; None: aiohttp's."""
        relay = self._front.relay
        if relay.draining():
            return None
        # What the head says (its entity, token, forwarded headers) is kept with the head
        # while the namespace is as it was read in (a number, not the namespace: an idle
        # connection's head holds no namespace of the past).
        namespace = relay.store.generation
        said = parsed.said
        if said is None or said[0] != namespace:
            resolved = sender_entity(parsed.raw_path, relay)
            if not isinstance(resolved, tuple):  # its 404: aiohttp's path answers it
                return None
            entity, suffix = resolved
            token, forwarded, target = sender_request(
                entity, parsed.headers, parsed.items, parsed.raw_path, parsed.raw_query
            )
            fits = header_json_size(forwarded) <= INLINE_HEADER_LIMIT
            said = parsed.said = (namespace, entity, suffix, token, forwarded, target, fits)
        _, entity, suffix, token, forwarded, target, fits = said
        if not fits:
            return None
        http = self._front.http
        if http.refusal(token, entity, suffix, parsed.host) is not None:
            return None  # its refusal: aiohttp's path answers it
        if not relay.broker.answers_inline(entity.name):
            return None
        return _Inline(self, parsed, entity, forwarded, target)

    def request_done(self) -> None:
        """The answer to the request is written: the next one, if any."""
        self._busy = False
        if not self.keep_alive:
            self.close()
            return
        transport = self._transport
        if transport is None:
            return
        self._answered_at = self._loop.time()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._raw:
            self._advance()

    def _hand_over(self) -> None:
        """aiohttp's from now on, from the first byte of the request not answered here."""
        transport = self._transport
        assert transport is not None
        self._transport = None
        self._front.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        data, self._raw = bytes(self._raw), bytearray()
        protocol = cast(asyncio.Protocol, self._front.aiohttp_handler())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._reading_paused:
            transport.resume_reading()
        if data and not transport.is_closing():
            protocol.data_received(data)

    # -- answers -----------------------------------------------------------------------------

    def write_response(
        self, head: ResponseHead, body: bytes, method: str, *, empty_length: int | None = None
    ) -> None:
        """A whole response, head and body in one write. A response that has no body (HEAD,
        1xx, 204, 304) gets ``empty_length`` as its ``Content-Length`` if given (HEAD)."""
        status = head.status
        empty = method == "HEAD" or status < 200 or status in (204, 304)
        parts, missing = self._head_lines(head)
        if empty:
            if empty_length is not None:
                parts.append(b"Content-Length: %d\r\n" % empty_length)
        else:
            parts.append(b"Content-Length: %d\r\n" % len(body))
            if body and _CONTENT_TYPE in missing:
                parts.append(_DEFAULT_CONTENT_TYPE)
        parts.append(self._tail(missing))
        if not empty:
            parts.append(body)
        self.write(b"".join(parts))

    def stream_head(self, head: ResponseHead, length: int | None) -> tuple[bytes, bool]:
        """The head of a response whose body follows in parts, and whether it is chunked."""
        parts, missing = self._head_lines(head)
        chunked = False
        if length is not None:
            parts.append(b"Content-Length: %d\r\n" % length)
        elif self.version == b"1.1":
            parts.append(b"Transfer-Encoding: chunked\r\n")
            chunked = True
        else:
            self.keep_alive = False  # HTTP/1.0: the body ends where the connection does
        if _CONTENT_TYPE in missing:
            parts.append(_DEFAULT_CONTENT_TYPE)
        parts.append(self._tail(missing))
        return b"".join(parts), chunked

    def _head_lines(self, head: ResponseHead) -> tuple[list[bytes], frozenset[str]]:
        """The status line and headers, and which of the headers the relay adds when the
        response has none (``Content-Type``, ``Date``, ``Server``, as aiohttp did) it lacks;
        made once per HTTP version and kept with the head (``ResponseHead.lines``)."""
        made = head.lines.get(self.version)
        if made is None:
            status, reason = head.status, head.reason
            line = b"HTTP/%s %d %s\r\n" % (
                self.version,
                status,
                (reason if reason is not None else _phrase(status)).encode("latin-1", "replace"),
            )
            parts = [line]
            missing = set(_DEFAULTED)
            for name, value in head.headers:
                parts.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
                if missing:
                    missing.discard(name.lower())
            made = head.lines[self.version] = (b"".join(parts), frozenset(missing))
        return [made[0]], made[1]

    def _tail(self, missing: frozenset[str]) -> bytes:
        """The headers the relay adds last, and the blank line."""
        tail = b""
        if _DATE in missing:
            tail += _date_line()
        if _SERVER in missing:
            tail += _SERVER_LINE
        if not self.keep_alive:
            if self.version == b"1.1":
                tail += b"Connection: close\r\n"
        elif self.version == b"1.0":
            tail += b"Connection: keep-alive\r\n"
        return tail + b"\r\n"

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self._transport is None:
            raise ConnectionResetError("the sender's connection is lost")
        if not self._writing_paused:
            return
        if self._drained is None or self._drained.done():
            self._drained = self._loop.create_future()
        await self._drained

    def close(self) -> None:
        transport, self._transport = self._transport, None
        self._front.connections.discard(self)
        if transport is not None:
            transport.close()

    # -- the idle timeout --------------------------------------------------------------------

    def _arm_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        # One timer per connection, moved lazily: not one per request.
        idle = self._front.relay.config.limits.idle_timeout
        self._idle_timer = loop.call_at(self._answered_at + idle, self._idle_check)

    def _idle_check(self) -> None:
        if self._transport is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._body_due is not None and now >= self._body_due:
            self._body_late()
            return
        idle = self._front.relay.config.limits.idle_timeout
        if self._busy or self._body_due is not None or now < self._answered_at + idle:
            when = max(now, self._answered_at) + idle
            if self._body_due is not None:
                when = min(when, self._body_due)
            self._idle_timer = loop.call_at(when, self._idle_check)
            return
        self.close()

    def _expect_body(self, prepared: _Inline) -> None:
        """The head is here, the body is not (all of it): it has the listener's response
        deadline to arrive (as aiohttp's path gave it), then 408."""
        loop = asyncio.get_running_loop()
        limits = self._front.relay.config.limits
        self._body_due = loop.time() + response_deadline(limits, prepared.entity)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = loop.call_at(self._body_due, self._idle_check)

    def _body_late(self) -> None:
        assert self._waiting is not None
        _, length, prepared = self._waiting
        answer = error_response(408, "The request body did not arrive in time.")
        self.keep_alive = False
        self.version = prepared.version
        sent = prepared.answer(answer)
        self._front.relay.observer.http_request(
            tracking_id(),
            prepared.entity.name,
            method=prepared.method,
            status=408,
            seconds=response_deadline(self._front.relay.config.limits, prepared.entity),
            request_bytes=length,
            response_bytes=sent,
            remote=self.remote,
        )
        self.close()


#: What a head says in a namespace (``_Parsed.said``).
_Said = tuple[int, HybridConnectionConfig, str, str | None, dict[str, str], str, bool]


class _Parsed:
    """What a request head the front may relay says from its bytes alone: parsed, and past
    every check that looks at nothing else (the entity, the token, the relay's state are
    looked at for each request, by :meth:`_SenderConnection._prepare`). The same bytes always
    parse the same, so a connection keeps its last head's and reuses it while its client
    sends that head again (a keep-alive client's requests often differ in nothing), which
    saves the parse, the header checks and the case-insensitive headers per request."""

    __slots__ = (
        "head",
        "headers",
        "host",
        "items",
        "keep_alive",
        "length",
        "method",
        "raw_path",
        "raw_query",
        "said",
        "version",
    )

    def __init__(
        self,
        head: bytes,
        reader: _Head,
        method: str,
        headers: CIMultiDict[str],
        length: int,
        raw_path: str,
        raw_query: str,
    ) -> None:
        self.head = head
        self.method = method
        #: The request's headers case-insensitive, and in order with their repeats (read
        #: only, by every request that reuses them).
        self.headers = headers
        self.items = reader.headers
        self.host = headers["Host"]
        self.length = length
        self.raw_path = raw_path
        self.raw_query = raw_query
        self.keep_alive = reader.keep_alive
        self.version = reader.version.encode("ascii")
        #: What this head says in a namespace (``_SenderConnection._prepare``): the
        #: namespace's generation, the entity and the path below it, the token, the
        #: ``requestHeaders`` (read only), the target, and whether the headers fit inline.
        self.said: _Said | None = None


def _parse(head: bytes) -> _Parsed | None:
    """What ``head`` says, if the front may relay a request with it; None: aiohttp's."""
    reader = _Head()
    try:
        reader.parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None  # aiohttp's to answer (a malformed head) or to upgrade
    if len(reader.headers) > _MANY_HEADERS:
        return None
    method = reader.method.decode("ascii")
    if method == "CONNECT" or not reader.url.startswith(b"/") or not reader.url.isascii():
        return None
    if reader.version not in ("1.1", "1.0"):
        return None
    headers = CIMultiDict(reader.headers)
    if (
        "Transfer-Encoding" in headers
        or "Expect" in headers
        or "Upgrade" in headers
        or "Host" not in headers
    ):
        return None
    length = 0
    lengths = headers.getall("Content-Length", ())
    if lengths:
        if len(lengths) > 1 or not lengths[0].isdigit():
            return None
        length = int(lengths[0])
        if length > INLINE_BODY_LIMIT:
            return None
    raw_path, _, raw_query = reader.url.decode("ascii").partition("?")
    if raw_path.startswith(HC_PREFIX) or is_runtime_info(method, raw_query, headers):
        return None
    return _Parsed(head, reader, method, headers, length, raw_path, raw_query)


_CONTENT_TYPE, _DATE, _SERVER = "content-type", "date", "server"
_DEFAULTED = frozenset({_CONTENT_TYPE, _DATE, _SERVER})
_DEFAULT_CONTENT_TYPE = b"Content-Type: application/octet-stream\r\n"
_SERVER_LINE = f"Server: {SERVER_HEADER}\r\n".encode("ascii")
_PHRASES: dict[int, str] = {status.value: status.phrase for status in HTTPStatus}


def _phrase(status: int) -> str:
    return _PHRASES.get(status, "")


_date_cache: list[Any] = [0, b""]


def _date_line() -> bytes:
    """``Date:`` for the current second, made once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        text = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _date_cache[0], _date_cache[1] = now, f"Date: {text}\r\n".encode("ascii")
    return cast(bytes, _date_cache[1])
