"""HTTP forwards (``-H hc:http://host:port[/base]``): the bridge's reverse proxy from relayed
HTTP requests to a local server.

One SDK listener per forward, with an :class:`HttpReverseProxy` as its request handler:
requests senders send to ``http(s)://relay/{hc}/{rest}?{query}`` go to
``{target}/{rest}?{query}`` (the path and query as the sender encoded them) and the upstream's
answer goes back. On the way to the upstream ``Host`` is the relay's public host (so the URLs
the upstream builds name the relay, as nginx's ``proxy_set_header Host $host``),
``X-Forwarded-For`` is appended to and ``X-Forwarded-Proto``, ``X-Forwarded-Host``,
``X-Forwarded-Prefix`` (``/{hc}``) and ``Via`` are set; both ways, hop-by-hop headers are
dropped (PROTOCOL.md 6.2, 6.5) and ``Via`` gets our hop. On the way back ``Location`` and
``Content-Location`` that point at the upstream (its origin, or a path on its root) are
rewritten to the public URL under ``/{hc}`` (nginx's ``proxy_redirect default``); a cookie's
``Path`` only with ``rewrite_cookie_path``. Every ``Set-Cookie`` arrives (PROTOCOL.md 6.4).

Bodies pass as they are (no decompression) and stream both ways, any size: the sender's body
goes to the upstream as it arrives (chunked), the upstream's comes back as it is read (each
read sent at once unless the upstream announced a small ``Content-Length``, so server-sent
events arrive one by one). When the sender goes away mid-response the upstream request is
closed at once. WebSocket senders on that hybrid connection (through the relay's HTTP
endpoint or the connect URL) are carried to the upstream as WebSockets on the same path
(``websocket_forward.py``).

Like an edge (``-R``): the listener reconnects by itself (SDK); if it cannot be opened at all,
or closes for good, a new one is opened on the SDK's backoff schedule; the forward counts as
"up" once its listener was online. Shutdown: requests that arrive after it began are answered
503 while the ones in flight get ``shutdown_grace_period`` seconds to finish; then the
listener closes (which cuts whatever is left).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp

from hybridrelay.bridge.config import BridgeConfig, HttpForward
from hybridrelay.bridge.listening import EdgeListener, keep_listening
from hybridrelay.bridge.pipe import RelayStream, close_stream
from hybridrelay.bridge.specs import validate_http_target
from hybridrelay.bridge.upstream_http import (
    UpstreamError,
    UpstreamPool,
    UpstreamUnreachable,
    content_length,
)
from hybridrelay.bridge.websocket_forward import WebSocketForwarder
from hybridrelay.client import AcceptContext, AcceptHandler, RelayedHttpContext, RequestHandler
from hybridrelay.client.backoff import RECONNECT_DELAYS
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.observability.bridge_metrics import ForwardMetrics, Outcome
from hybridrelay.observability.http_access import access_logged
from hybridrelay.protocol.addressing import parse_endpoint, target_suffix
from hybridrelay.protocol.http import (
    HOP_BY_HOP_HEADERS,
    INLINE_BODY_LIMIT,
    UNJOINABLE_HEADERS,
    forwarded_headers,
    rewrite_cookie_path,
    rewrite_location,
    split_repeated_headers,
    without_hop_by_hop,
)

__all__ = [
    "HttpForwarder",
    "HttpListenerFactory",
    "HttpReverseProxy",
    "ProxyAnswer",
]

logger = logging.getLogger("hybridrelay.bridge")

#: Connecting to the upstream.
CONNECT_TIMEOUT = 10.0
#: The upstream must send something (headers, or the next body bytes) within this time;
#: the relay itself gives a listener 60 s for the response headers.
READ_TIMEOUT = 60.0
VIA = "1.1 hybridrelay"

# A reverse proxy also drops the credentials meant for a proxy on the way (RFC 9110 11.7):
# they are for the hop that asked for them, not for the upstream or the sender.
_PROXY_AUTH = frozenset({"proxy-authenticate", "proxy-authorization"})
_REQUEST_DROPPED = _PROXY_AUTH
_LOCATIONS = frozenset({"location", "content-location"})
_KEEP_LENGTH = frozenset({"content-length"})

# The one-pass header rules below (HttpReverseProxy.upstream_headers_for and
# .downstream_response) look at each name once: these are the names that pass takes out of
# the plain copy. A Connection header (it may name any header as hop-by-hop) sends the pass
# to the rules written out one by one, which stay the reference (tests/bridge check the two
# agree).
_FORWARDED = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix"}
)
_UPSTREAM_SPECIAL = HOP_BY_HOP_HEADERS | _REQUEST_DROPPED | _FORWARDED | {"via"}
_DOWNSTREAM_DROPPED = (HOP_BY_HOP_HEADERS - _KEEP_LENGTH) | _PROXY_AUTH
_DOWNSTREAM_SPECIAL = (
    _DOWNSTREAM_DROPPED | _LOCATIONS | UNJOINABLE_HEADERS | {"via", "content-length"}
)

#: Builds a listener whose relayed HTTP requests go to the given handler and whose WebSocket
#: senders the given accept handler decides on.
HttpListenerFactory = Callable[[RequestHandler, AcceptHandler], EdgeListener]


def _via_appended(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with our hop added at the end of ``Via`` (RFC 9110 7.6.3)."""
    hops = [value for name, value in headers if name.lower() == "via" and value]
    kept = [(name, value) for name, value in headers if name.lower() != "via"]
    kept.append(("Via", ", ".join([*hops, VIA])))
    return kept


class ProxyAnswer(NamedTuple):
    """How :meth:`HttpReverseProxy.forward` answered one request."""

    #: The status sent (the upstream's, or ours: 502/504); None when the upstream failed
    #: after the response's head was sent and the sender saw it cut.
    status: int | None
    #: From the call to the response's head (None: cut before one was sent).
    seconds: float | None
    #: A value of :class:`~hybridrelay.observability.bridge_metrics.Outcome`.
    outcome: str


class HttpReverseProxy:
    """A ``request_handler`` that forwards each relayed request to one upstream base URL."""

    def __init__(
        self,
        target: str,
        *,
        entity_path: str,
        relay_host: str,
        secure: bool,
        ssl: Any = True,
        connect_timeout: float = CONNECT_TIMEOUT,
        rewrite_cookie_path: bool = False,
    ) -> None:
        validate_http_target(target)
        if connect_timeout <= 0:
            raise ConfigurationError("connect_timeout must be positive")
        self._target = target.rstrip("/")
        self._entity = entity_path.strip("/")
        self._relay_host = relay_host
        self._proto = "https" if secure else "http"
        self._ssl = ssl
        self._connect_timeout = connect_timeout
        self._rewrite_cookie_path = rewrite_cookie_path
        self._prefix = "/" + self._entity
        self._public = f"{self._proto}://{relay_host}{self._prefix}"
        self._forwarded_tail = [
            ("X-Forwarded-Proto", self._proto),
            ("X-Forwarded-Host", relay_host),
            ("X-Forwarded-Prefix", self._prefix),
        ]
        self._session: aiohttp.ClientSession | None = None
        self._upstream: UpstreamPool | None = None

    @property
    def target(self) -> str:
        """The upstream base URL."""
        return self._target

    def _get_upstream(self) -> UpstreamPool:
        if self._upstream is None:
            self._upstream = UpstreamPool(
                self._target,
                ssl=self._ssl,
                connect_timeout=self._connect_timeout,
                read_timeout=READ_TIMEOUT,
            )
        return self._upstream

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._connect_timeout, sock_read=READ_TIMEOUT
                ),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    def upstream_url(self, ctx: RelayedHttpContext) -> str:
        return self.upstream_url_for(target_suffix(ctx.path, self._entity), ctx.query)

    def upstream_url_for(self, suffix: str, query: str) -> str:
        """The upstream URL of a sender's path after the entity and its query (raw)."""
        url = self._target + suffix
        if not suffix and not urlsplit(self._target).path:
            url += "/"
        return url + (f"?{query}" if query else "")

    def upstream_headers(self, ctx: RelayedHttpContext) -> list[tuple[str, str]]:
        client = ctx.remote_endpoint[0] if ctx.remote_endpoint else None
        return self.upstream_headers_for(list(ctx.headers.items()), client)

    def upstream_headers_for(
        self, sender_headers: Sequence[tuple[str, str]], client: str | None
    ) -> list[tuple[str, str]]:
        """A sender's headers as the upstream gets them (see the module): ``Host`` first,
        the sender's end-to-end headers in their order, then ``X-Forwarded-*`` and ``Via``."""
        out = [("Host", self._relay_host)]
        chain: list[str] | None = None
        hops: list[str] | None = None
        for name, value in sender_headers:
            key = name.lower()
            if key not in _UPSTREAM_SPECIAL:
                out.append((name, value))
            elif key == "connection":
                return self._upstream_headers_by_rule(sender_headers, client)
            elif key == "x-forwarded-for":
                if chain is None:
                    chain = []
                chain.extend(part.strip() for part in value.split(",") if part.strip())
            elif key == "via":
                if value:
                    if hops is None:
                        hops = []
                    hops.append(value)
            # anything else special is dropped: hop-by-hop, proxy credentials, X-Forwarded-*
        if client:
            if chain is None:
                chain = []
            chain.append(client)
        if chain:
            out.append(("X-Forwarded-For", ", ".join(chain)))
        out += self._forwarded_tail
        out.append(("Via", f"{', '.join(hops)}, {VIA}" if hops else VIA))
        return out

    def _upstream_headers_by_rule(
        self, sender_headers: Sequence[tuple[str, str]], client: str | None
    ) -> list[tuple[str, str]]:
        """:meth:`upstream_headers_for`, one rule after the other (the reference)."""
        headers = without_hop_by_hop(sender_headers, also=_REQUEST_DROPPED)
        headers = forwarded_headers(
            headers, client=client, proto=self._proto, host=self._relay_host, prefix=self._prefix
        )
        headers.insert(0, ("Host", self._relay_host))
        return _via_appended(headers)

    def downstream_headers(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The upstream's response headers as the sender gets them (see the module)."""
        out: list[tuple[str, str]] = []
        # Content-Length is kept: the relay streams under it, and a HEAD response keeps it.
        for name, value in without_hop_by_hop(headers, also=_PROXY_AUTH, keep=_KEEP_LENGTH):
            key = name.lower()
            if key in _LOCATIONS:
                value = self._location(value)
            elif key == "set-cookie" and self._rewrite_cookie_path:
                value = rewrite_cookie_path(value, prefix=self._prefix)
            out.append((name, value))
        return _via_appended(out)

    def _location(self, value: str) -> str:
        return rewrite_location(
            value, upstream=self._target, public=self._public, public_path=self._prefix
        )

    def downstream_response(
        self, headers: Sequence[tuple[str, str]]
    ) -> tuple[dict[str, str], tuple[tuple[str, str], ...], int | None]:
        """In one pass over the upstream's response headers: what
        :meth:`RelayedHttpContext.respond_merged` takes of :meth:`downstream_headers` (the
        ``responseHeaders`` object and the repeated ``Set-Cookie``/``WWW-Authenticate``
        values), and the upstream's ``Content-Length`` (its first, None if none or not a
        number)."""
        merged: dict[str, str] = {}
        spelling: dict[str, str] = {}
        length: int | None = None
        seen_length = False
        hops: list[str] | None = None
        unjoinable: list[tuple[str, str, str]] | None = None
        for name, value in headers:
            key = name.lower()
            if key in _DOWNSTREAM_SPECIAL:
                if key == "connection":
                    return self._downstream_response_by_rule(headers)
                if key in _DOWNSTREAM_DROPPED:
                    continue
                if key == "via":
                    if value:
                        if hops is None:
                            hops = []
                        hops.append(value)
                    continue
                if key == "content-length" and not seen_length:
                    seen_length = True
                    try:
                        length = int(value)
                    except ValueError:
                        length = None
                elif key in _LOCATIONS:
                    value = self._location(value)
                elif key in UNJOINABLE_HEADERS:
                    if key == "set-cookie" and self._rewrite_cookie_path:
                        value = rewrite_cookie_path(value, prefix=self._prefix)
                    if unjoinable is None:
                        unjoinable = []
                    unjoinable.append((key, name, value))
            first = spelling.get(key)
            if first is None:
                spelling[key] = name
                merged[name] = value
            elif key != "set-cookie":
                merged[first] += ", " + value
        # Every Via was left out above: ours is the one, last (as _via_appended puts it).
        merged["Via"] = f"{', '.join(hops)}, {VIA}" if hops else VIA
        repeated: tuple[tuple[str, str], ...] = ()
        if unjoinable is not None and len(unjoinable) > 1:
            counts: dict[str, int] = {}
            for key, _, _ in unjoinable:
                counts[key] = counts.get(key, 0) + 1
            repeated = tuple((name, value) for key, name, value in unjoinable if counts[key] > 1)
        return merged, repeated, length

    def _downstream_response_by_rule(
        self, headers: Sequence[tuple[str, str]]
    ) -> tuple[dict[str, str], tuple[tuple[str, str], ...], int | None]:
        """:meth:`downstream_response`, one rule after the other (the reference)."""
        merged, repeated = split_repeated_headers(
            without_hop_by_hop(self.downstream_headers(headers), keep=_KEEP_LENGTH)
        )
        return merged, repeated, content_length(headers)

    async def __call__(self, ctx: RelayedHttpContext) -> None:
        await self.forward(ctx)

    async def forward(self, ctx: RelayedHttpContext) -> ProxyAnswer:
        """Forward one request and answer it; says how (for the metrics)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        head: float | None = None
        status: int | None = None
        # The exchange runs in this task; when the sender goes away the listener's watch
        # cancels it (one task and no waits per request, rather than the exchange and a watch
        # in tasks of their own).
        task = asyncio.current_task(loop)  # with the loop: no second look-up of it
        assert task is not None
        over = gone = False

        def sender_gone() -> None:
            nonlocal gone
            if not over and not gone:
                gone = True
                task.cancel()

        body: AsyncIterator[bytes] | None = None
        if ctx.more_body:

            async def upload() -> AsyncIterator[bytes]:
                async for chunk in ctx.body:
                    yield chunk
                ctx.on_disconnect(sender_gone)  # only now: the watch reads what the body came on

            body = upload()
        else:
            ctx.on_disconnect(sender_gone)
        # The exchange is written out here rather than in a coroutine of its own: one level
        # less for every wake-up of this task to pass through.
        try:
            try:
                upstream = await self._get_upstream().request(
                    ctx.method,
                    self.upstream_url(ctx),
                    self.upstream_headers(ctx),
                    body,
                )
                try:
                    headers, repeated, length = self.downstream_response(upstream.headers)
                    ctx.respond_merged(upstream.status, upstream.reason or None, headers, repeated)
                    status, head = upstream.status, loop.time() - started
                    stream = length is None or length > INLINE_BODY_LIMIT
                    # A small answer read whole with its head (the common case): written at
                    # once, without the chunk iterator's coroutines.
                    whole = None if stream else upstream.complete_body()
                    if whole is not None:
                        if whole:
                            await ctx.write(whole)
                    else:
                        async for chunk in upstream.chunks():
                            await ctx.write(chunk)
                            if stream:
                                await ctx.flush()  # this read goes out now (server-sent events)
                finally:
                    # Leaving early (the sender went away, or we are cancelled) closes the
                    # upstream connection; a response read to its end goes back to the pool.
                    upstream.release()
            finally:
                over = True
            await ctx.finish()
            return ProxyAnswer(status, head, Outcome.ACCEPTED)
        except asyncio.CancelledError:
            if not gone or task.uncancel() > 0:
                raise
            ctx.abort()
            return ProxyAnswer(status, head, Outcome.ACCEPTED)
        except UpstreamUnreachable as exc:
            text = "Bad Gateway: the upstream is unreachable"
            answered = await self._error(ctx, 502, text, exc)
            outcome = Outcome.DESTINATION_UNREACHABLE
        except TimeoutError as exc:
            text = "Gateway Timeout: the upstream did not answer"
            answered = await self._error(ctx, 504, text, exc)
            outcome = Outcome.DESTINATION_TIMEOUT
        except UpstreamError as exc:
            answered = await self._error(ctx, 502, "Bad Gateway: the upstream failed", exc)
            outcome = Outcome.FAILED
        except RelayError:
            if not ctx.disconnected:
                raise
            ctx.abort()  # the sender went away while we wrote to it
            return ProxyAnswer(status, head, Outcome.ACCEPTED)
        if answered is None:  # cut after the head
            return ProxyAnswer(None, head, outcome)
        return ProxyAnswer(answered, loop.time() - started, outcome)

    @staticmethod
    async def _error(
        ctx: RelayedHttpContext, status: int, text: str, exc: BaseException
    ) -> int | None:
        """Answer ``status`` with ``text``; None when the response was under way (cut)."""
        logger.warning("upstream request failed: %s: %s", type(exc).__name__, exc)
        if ctx.responded:
            ctx.abort()  # the response was under way: the sender sees it cut
            return None
        await _answer(ctx, status, text)
        return status

    def websockets(self, *, limit: int) -> WebSocketForwarder:
        """The forwarder of this upstream's WebSocket senders (same URLs, headers, session)."""
        return WebSocketForwarder(
            url_for=self.upstream_url_for,
            headers_for=self.upstream_headers_for,
            session=self._get_session,
            ssl=self._ssl,
            connect_timeout=self._connect_timeout,
            limit=limit,
        )

    async def aclose(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            await upstream.aclose()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class HttpForwarder:
    """Serves one ``-H`` forward."""

    def __init__(
        self,
        forward: HttpForward,
        config: BridgeConfig,
        listener_factory: HttpListenerFactory,
        *,
        metrics: ForwardMetrics,
        retry_schedule: Sequence[float] = RECONNECT_DELAYS,
    ) -> None:
        endpoint = config.connection.endpoint
        assert endpoint is not None
        relay = parse_endpoint(endpoint)
        self.forward = forward
        self.config = config
        self._metrics = metrics
        self._factory = listener_factory
        self._schedule = retry_schedule
        self._name = f"-H {forward.hybrid_connection}"
        self._limit = config.max_connections
        self._proxy = HttpReverseProxy(
            forward.target,
            entity_path=forward.hybrid_connection,
            relay_host=relay.host,
            secure=relay.secure,
            connect_timeout=config.connect_timeout,
            rewrite_cookie_path=config.rewrite_cookie_path,
        )
        handler: RequestHandler = self._handle
        if config.access_log:
            handler = access_logged(handler, logging.getLogger("hybridrelay.access"))
        self._handler = handler
        self._websockets = self._proxy.websockets(limit=self._limit)
        self._stop = asyncio.Event()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def serve(self, started: Callable[[], None], stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set; then answer new requests 503 and drain the rest.

        Raises:
            RelayError: the relay refuses the listener in a way retrying cannot fix.
        """
        self._stop = stop

        def online() -> None:
            logger.info("%s: forwarding HTTP requests to %s", self._name, self._proxy.target)

        async def on_stream(stream: RelayStream) -> None:
            if not self._websockets.take(stream):  # its upstream gave up waiting for it
                await close_stream(stream, 1011, "the upstream is gone")

        async def drain() -> None:
            # Still registered, but answering 503, until the drain is done.
            await self._drain(self.config.shutdown_grace_period)

        try:
            await keep_listening(
                self._name,
                lambda: self._factory(self._handler, self._accept_websocket),
                stop=stop,
                started=started,
                online=online,
                on_stream=on_stream,
                drain=drain,
                schedule=self._schedule,
            )
        finally:
            await self._websockets.aclose()
            await self._proxy.aclose()

    async def _accept_websocket(self, ctx: AcceptContext) -> None:
        """The listener's accept handler: a WebSocket sender, to the upstream (or refused)."""
        if self._stop.is_set():
            self._metrics.outcome(Outcome.REFUSED_DRAINING)
            ctx.reject(503, "Service Unavailable: the bridge is shutting down")
            return
        await self._websockets.accept(ctx)
        if ctx.rejection is None:
            self._metrics.outcome(Outcome.ACCEPTED)
        elif ctx.rejection[0] == 503:
            self._metrics.outcome(Outcome.REFUSED_CAPACITY)
        elif ctx.rejection[0] >= 500:
            self._metrics.outcome(Outcome.DESTINATION_UNREACHABLE)

    async def _drain(self, grace: float) -> None:
        if self._in_flight:
            logger.info(
                "%s: waiting up to %.1f s for %d request(s) in flight",
                self._name,
                grace,
                self._in_flight,
            )
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            logger.warning(
                "%s: %d request(s) still in flight after the grace period; cutting them",
                self._name,
                self._in_flight,
            )

    async def _handle(self, ctx: RelayedHttpContext) -> None:
        """The listener's request handler: admission, then the reverse proxy."""
        metrics = self._metrics
        if self._stop.is_set():
            metrics.outcome(Outcome.REFUSED_DRAINING)
            await _answer(ctx, 503, "Service Unavailable: the bridge is shutting down")
            return
        if self._in_flight >= self._limit:
            metrics.outcome(Outcome.REFUSED_CAPACITY)
            await _answer(ctx, 503, "Service Unavailable: the bridge is at capacity")
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            try:
                answer = await self._proxy.forward(ctx)
            except Exception:
                # The sender's side failed (the SDK answers 500 if it still can).
                metrics.outcome(Outcome.FAILED)
                raise
            metrics.http_request(answer.status, answer.seconds, answer.outcome)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


async def _answer(ctx: RelayedHttpContext, status: int, text: str) -> None:
    """Answer with ``text`` as the reason phrase and as a plain-text body."""
    await ctx.respond(status, text, {"content-type": "text/plain; charset=utf-8"})
    await ctx.write(text.encode() + b"\n")
    await ctx.finish()
