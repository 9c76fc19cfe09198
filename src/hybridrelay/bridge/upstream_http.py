"""The ``-H`` forward's HTTP/1.1 client to its upstream: keep-alive connections on asyncio
Protocols, responses parsed by httptools (llhttp, uvicorn's parser).

aiohttp's ``ClientSession.request`` cost the bridge about a quarter of its CPU per relayed
request (request and response objects, header multidicts, its stream reader and timers;
docs/DECISIONS.md D18); a reverse proxy needs none of that. Here one request is: take an idle
connection (or open one), write the head (and the body: as it is when the sender gave a
``Content-Length``, else chunked), and read the response's head and body parts as the parser
reports them. Only ``http://`` and ``https://`` upstreams, HTTP/1.1, no pipelining, no
redirects followed, bodies passed as they are (no decompression).

Bounds: idle connections at most :data:`MAX_IDLE` (each closed after :data:`IDLE_TIMEOUT`);
a response's unread body at most :data:`READ_HIGH_WATER` bytes (reading from the upstream
pauses beyond it); connecting within ``connect_timeout``, each wait for the upstream (the head,
the next body bytes, room to write) within ``read_timeout``. A request without a body that
fails on a reused connection before any answer came (the upstream closed it while idle) is
sent again once on a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl as ssl_module
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
from yarl import URL

from hybridrelay.bridge.deadline import LazyDeadline

__all__ = [
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "content_length",
]

#: Idle keep-alive connections kept per upstream ...
MAX_IDLE = 64
#: ... each for at most this long (aiohttp's default keep-alive time).
IDLE_TIMEOUT = 15.0
#: A response's body bytes read from the upstream but not yet taken: reading pauses beyond.
READ_HIGH_WATER = 256 * 1024
#: Methods that get no ``Content-Length: 0`` when sent without a body (as aiohttp does).
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})


class UpstreamError(Exception):
    """The upstream failed: it broke the protocol or closed the connection mid-exchange."""


class UpstreamUnreachable(UpstreamError):
    """The connection to the upstream could not be opened."""


def _encode_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("\r\n")
    head = "\r\n".join(lines)
    # One check for every line: a CR, LF or NUL inside a name or value would split or end the
    # head (request smuggling); the relay's own parser lets none through, this is the guard.
    if head.count("\n") != len(headers) + 2 or head.count("\r") != len(headers) + 2:
        raise UpstreamError("a header contains a line break")
    if "\x00" in head:
        raise UpstreamError("a header contains a NUL character")
    return head.encode("utf-8", "surrogateescape")


def _has_length(headers: list[tuple[str, str]]) -> bool:
    return any(name.lower() == "content-length" for name, _ in headers)


def _bodyless(method: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of a request sent without a body: ``Content-Length: 0`` added unless it
    has one, or its method takes no body (as aiohttp does)."""
    if method in _BODYLESS_METHODS or _has_length(headers):
        return headers
    return [*headers, ("Content-Length", "0")]


#: What cannot go on a request line as it is: controls, space, DEL, anything not ASCII.
_UNSENDABLE = re.compile(r"[^\x21-\x7e]")


def _sendable(text: str) -> bool:
    return _UNSENDABLE.search(text) is None


def request_url(url: str) -> str:
    """``url`` exactly as the sender encoded it (a re-normalised path, ``%2F`` -> ``/``, would
    change what some applications see), unless it has characters that cannot go on a request
    line as they are: then percent-encoded (by yarl)."""
    return url if _sendable(url) else str(URL(url))


def request_target(url: str) -> str:
    """The request target (path and query) of :func:`request_url`."""
    rest = request_url(url).split("://", 1)[1]
    slash = rest.find("/")
    return rest[slash:] if slash >= 0 else "/"


class _Connection(asyncio.Protocol):
    """One connection to the upstream, and the state of the exchange on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        # Each wait for the upstream (the head, the next body bytes, room to write).
        self._read_timeout = read_timeout
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # Each wait for the upstream, and the idle time in the pool, on lazily moved timers
        # (bridge/deadline.py): two call_later and two cancel per request were ~5 us.
        self._waiting: asyncio.Future[None] | None = None
        self._read_deadline = LazyDeadline(loop, self._read_timed_out)
        self.idle_deadline = LazyDeadline(loop, self.close)
        self._parser: Any = None
        self._head_only = False
        # The response being read.
        self.status = 0
        self._reason = bytearray()
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.done = False
        self.answered = False  # any byte of a response came
        self.reusable = True
        self._interim = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._writable = True
        self._drained: asyncio.Future[None] | None = None

    # -- the exchange ------------------------------------------------------------------

    def start(self, method: str) -> None:
        """Get ready for the response to a request sent with ``method``."""
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self.status = 0
        self._reason.clear()
        self.headers = []
        self.head_done = self.done = self.answered = self._interim = False
        self.reusable = True
        self._error = None
        self._chunks.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def loop_time(self) -> float:
        return self._loop.time()

    @property
    def reason(self) -> str:
        return self._reason.decode("utf-8", "surrogateescape")

    @property
    def chunked(self) -> bool:
        return any(
            name.lower() == "transfer-encoding" and "chunked" in value.lower()
            for name, value in self.headers
        )

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise UpstreamError("the upstream closed the connection")
        self.transport.write(data)

    async def drained(self) -> None:
        """Return once the transport takes more (at once unless it paused us)."""
        if self._writable:
            return
        self._drained = self._loop.create_future()
        await self._wait(self._drained)

    async def wait_head(self) -> None:
        # The waits of _wait_data and _wait written out: the common request waits once, here,
        # and each coroutine level a wake-up passes through costs its own frame's resumption.
        while not self.head_done:
            self._raise_error()
            waiter = self._waiter = self._waiting = self._loop.create_future()
            self._read_deadline.set(self._loop.time() + self._read_timeout)
            try:
                await waiter
            finally:
                self._waiter = self._waiting = None
                self._read_deadline.clear()

    def complete_body(self) -> bytes | None:
        """The whole body when the response was read to its end and is still all here (a
        small answer comes in the read that brought its head), else None: read_chunk then."""
        if not self.done:
            return None
        chunks = self._chunks
        if len(chunks) == 1:
            body = chunks.popleft()
        else:
            body = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()
        return body

    async def read_chunk(self) -> bytes:
        """The next part of the body; b"" at its end."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._reading_paused and self._buffered <= READ_HIGH_WATER // 2:
                    self._reading_paused = False
                    if self.transport is not None and not self.closed:
                        self.transport.resume_reading()
                return chunk
            if self.done:
                return b""
            self._raise_error()
            await self._wait_data()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise UpstreamError("the upstream closed the connection")

    async def _wait_data(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._wait(self._waiter)
        finally:
            self._waiter = None

    async def _wait(self, future: asyncio.Future[None]) -> None:
        # A deadline of our own rather than asyncio.timeout: it is set on every request, and
        # this costs no timer at all unless the last one fired (see LazyDeadline).
        self._waiting = future
        self._read_deadline.set(self._loop.time() + self._read_timeout)
        try:
            await future
        finally:
            self._waiting = None
            self._read_deadline.clear()

    def _read_timed_out(self) -> None:
        if self._waiting is not None:
            _time_out(self._waiting)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self._read_deadline.cancel()
        self.idle_deadline.cancel()
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.close()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.reusable = False
        self._wake()

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self.done:
            # Bytes nobody asked for (after a response, or while idle): not reusable.
            self.reusable = False
            self.close()
            return
        self.answered = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream switched protocols on a plain request"))
            self.abort()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream's response is malformed: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        # Stopped now, not when they would fire: their timers hold this connection.
        self._read_deadline.cancel()
        self.idle_deadline.cancel()
        if self._parser is not None and not self.done:
            if self.head_done and self._until_close():
                self.done = True  # a body delimited by the connection's end
            else:
                self._fail(UpstreamError("the upstream closed the connection mid-response"))
        self._wake()
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_exception(UpstreamError("the upstream closed the connection"))

    def _until_close(self) -> bool:
        return not self.chunked and not any(
            name.lower() == "content-length" for name, _ in self.headers
        )

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim response (100 Continue, 103): not ours to relay
            self._interim = True
            self.headers = []
            self._reason.clear()
            return
        self.status = status
        self.head_done = True
        if self._head_only:  # llhttp cannot be told: the answer to HEAD has no body
            self.done = True
            self._parser = None
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.reusable = False
            return
        self._chunks.append(bytes(body))
        self._buffered += len(body)
        if not self._reading_paused and self._buffered > READ_HIGH_WATER:
            self._reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._parser is not None and not self._parser.should_keep_alive():
            self.reusable = False
        self.done = True
        self._wake()


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def content_length(headers: Sequence[tuple[str, str]]) -> int | None:
    """The first ``Content-Length`` of ``headers`` as a number (None: none, or not one)."""
    for name, value in headers:
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class UpstreamResponse:
    """The upstream's answer: status, reason and headers at once, the body as it comes.

    Call :meth:`release` when done with it (in a ``finally``): a response read to its end
    gives its connection back to the pool, anything else closes it."""

    __slots__ = ("_conn", "_pool", "_released", "headers", "reason", "status")

    def __init__(self, pool: UpstreamPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self._released = False
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers

    @property
    def content_length(self) -> int | None:
        return content_length(self.headers)

    def complete_body(self) -> bytes | None:
        """The whole body if it was all read with the head (a small answer), else None."""
        return self._conn.complete_body()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's parts as they are read (bounded: reading pauses while they wait)."""
        while chunk := await self._conn.read_chunk():
            yield chunk

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool.release(self._conn)


class UpstreamPool:
    """Keep-alive connections to one upstream origin (``http(s)://host:port``)."""

    def __init__(
        self,
        target: str,
        *,
        ssl: Any = True,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        parts = urlsplit(target)
        self._secure = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._secure else 80)
        self._ssl: ssl_module.SSLContext | bool | None = None
        if self._secure:
            self._ssl = ssl if isinstance(ssl, ssl_module.SSLContext) else _ssl_context(ssl)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._closed = False

    async def request(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request and return once its response's head came.

        Raises:
            UpstreamUnreachable: the connection could not be opened.
            TimeoutError: connecting, or the upstream's answer, took too long.
            UpstreamError: the upstream failed (closed early, a malformed response).
        """
        target = request_target(url)
        # One coroutine for both tries (not one more level per request for the exchange).
        allow_retry = True
        while True:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.start(method)
                try:
                    if body is None:
                        conn.write(_encode_head(method, target, _bodyless(method, headers)))
                    else:
                        await self._send(conn, method, target, headers, body)
                except UpstreamError:
                    if not conn.head_done:
                        raise
                    # It answered (a 413, say) and closed before taking the whole body: relay
                    # it.
                    conn.reusable = False
                if not conn.head_done:
                    await conn.wait_head()
            except UpstreamError:
                conn.abort()
                if reused and allow_retry and body is None and not conn.answered:
                    # A reused connection found closed before it answered: on a new one.
                    allow_retry = False
                    continue
                raise
            except BaseException:
                conn.abort()
                raise
            return UpstreamResponse(self, conn)

    async def _send(
        self,
        conn: _Connection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes],
    ) -> None:
        """Send a request with a body (one without is a single write, in :meth:`request`)."""
        chunked = not _has_length(headers)
        if chunked:
            headers = [*headers, ("Transfer-Encoding", "chunked")]
        conn.write(_encode_head(method, target, headers))
        async for chunk in body:
            if conn.head_done:  # answered before the body was all sent (a 413, say)
                conn.reusable = False
                return
            if chunk:
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drained()
        if chunked:
            conn.write(b"0\r\n\r\n")

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            conn.idle_deadline.clear()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._read_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._secure else None,
                )
        except OSError as exc:
            where = f"{self._host}:{self._port}"
            raise UpstreamUnreachable(f"cannot connect to {where}: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        """Back to the pool if it finished cleanly, else closed."""
        if (
            self._closed
            or not conn.done
            or not conn.reusable
            or conn.closed
            or len(self._idle) >= MAX_IDLE
        ):
            conn.close()
            return
        conn.idle_deadline.set(conn.loop_time() + IDLE_TIMEOUT)
        self._idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _ssl_context(verify: Any) -> ssl_module.SSLContext:
    """``ssl=True``: the system's trust store; ``False``: no verification (as aiohttp)."""
    context = ssl_module.create_default_context()
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    return context
