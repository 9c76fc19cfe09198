"""Reverse proxy for relayed HTTP requests: the bridge's ``-H hc:http://host:port[/base]``.

Requests that senders send to ``http(s)://relay/{hc}/{rest}?{query}`` are forwarded to
``http://host:port{/base}/{rest}?{query}`` and the upstream's answer goes back. Headers added
on the way to the upstream: ``X-Forwarded-For`` (appended), ``X-Forwarded-Proto``,
``X-Forwarded-Host`` and ``Via``; hop-by-hop headers are dropped both ways; bodies are passed
as they are (no decompression). The upstream's response body is streamed (over a rendezvous
once it passes 64 KiB).

As a listener's request handler (this is what the bridge does for each ``-H``)::

    relay_host, secure = relay_origin("sb://relay.example.com")
    proxy = HttpReverseProxy("http://127.0.0.1:8080/api", entity_path="hc",
                             relay_host=relay_host, secure=secure)
    listener = HybridConnectionListener(..., request_handler=proxy)
    ...
    await proxy.aclose()

or :func:`serve_http_forward` for a whole forward from a connection string (listener
included). Only the public SDK is used.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from hybridrelay.client import AcceptContext, HybridConnectionListener, RelayedHttpContext
from hybridrelay.exceptions import ConfigurationError, RelayConnectionError
from hybridrelay.protocol.connection_string import ConnectionString

__all__ = [
    "HttpForwardSpec",
    "HttpReverseProxy",
    "parse_http_forward",
    "reject_websocket",
    "relay_origin",
    "serve_http_forward",
    "validate_http_target",
]

logger = logging.getLogger("hybridrelay.http_proxy")

#: Connecting to the upstream.
CONNECT_TIMEOUT = 10.0
#: The upstream must send something (headers, or the next body bytes) within this time;
#: the relay itself gives a listener 60 s for the response headers.
READ_TIMEOUT = 60.0
_CHUNK = 64 * 1024
VIA = "1.1 hybridrelay"

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


class HttpForwardSpec:
    """A parsed ``-H hybrid_connection:http://host:port[/base]``."""

    __slots__ = ("entity_path", "target")

    def __init__(self, entity_path: str, target: str) -> None:
        self.entity_path = entity_path
        self.target = target

    def __repr__(self) -> str:
        return f"HttpForwardSpec({self.entity_path!r}, {self.target!r})"


def parse_http_forward(spec: str) -> HttpForwardSpec:
    """Parse ``hc:http://host:port[/base]`` (the entity may contain ``/``; https allowed).

    Raises:
        ConfigurationError: no entity, or the target is not an http(s) URL with a host.
    """
    for scheme in ("http://", "https://"):
        entity, sep, rest = spec.partition(":" + scheme)
        if sep:
            break
    else:
        raise ConfigurationError(
            f"-H expects hybrid_connection:http://host:port[/base], not {spec!r}"
        )
    entity = entity.strip("/")
    target = scheme + rest
    validate_http_target(target)
    if not entity:
        raise ConfigurationError(f"-H {spec!r}: the hybrid connection name is missing")
    return HttpForwardSpec(entity, target.rstrip("/"))


def validate_http_target(target: str) -> None:
    """Check an upstream base URL: ``http(s)://host[:port][/base]``.

    Raises:
        ConfigurationError: another scheme, no host, a bad port, credentials, a query or a
            fragment.
    """
    try:
        parts = urlsplit(target)
        _ = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid upstream URL {target!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"the upstream must be http(s)://host[:port][/base]: {target!r}")
    if "@" in parts.netloc:
        # Credentials in the URL would end up in logs; the sender's Authorization is passed on.
        raise ConfigurationError("the upstream URL must not contain credentials (user@host)")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"the upstream URL must not have a query: {target!r}")


def relay_origin(endpoint: str) -> tuple[str, bool]:
    """``(host[:port], secure)`` of a relay endpoint (``sb://``, ``wss://``, ``ws://``, ...):
    what :class:`HttpReverseProxy` reports as ``X-Forwarded-Host`` / ``X-Forwarded-Proto``.

    Raises:
        ConfigurationError: not a URL with a host.
    """
    try:
        parts = urlsplit(endpoint.strip())
        _ = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"invalid endpoint {endpoint!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("sb", "wss", "ws", "https", "http") or not parts.hostname:
        raise ConfigurationError(f"endpoint must look like sb://host[:port], not {endpoint!r}")
    return parts.netloc.rpartition("@")[2], scheme not in ("ws", "http")


def _suffix(path: str, entity: str) -> str:
    prefix = "/" + entity.strip("/")
    if path.lower() == prefix.lower():
        return ""
    if path[: len(prefix) + 1].lower() == prefix.lower() + "/":
        return path[len(prefix) :]
    return path


def _as_sent(url: str) -> URL:
    """The URL exactly as the sender encoded it: yarl would otherwise re-normalise the path
    and query (``%2F`` -> ``/``), which changes what some applications see. A target with
    characters that cannot go on a request line as they are is normalised instead."""
    if url.isascii() and not any(ch <= " " or ch == "\x7f" for ch in url):
        return URL(url, encoded=True)
    return URL(url)


def _dropped(headers: dict[str, str] | Any) -> set[str]:
    dropped = set(_HOP_BY_HOP)
    for name, value in headers.items():
        if name.lower() == "connection":
            dropped.update(t.strip().lower() for t in value.split(",") if t.strip())
    return dropped


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
        self._session: aiohttp.ClientSession | None = None

    @property
    def target(self) -> str:
        """The upstream base URL."""
        return self._target

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
        suffix = _suffix(ctx.path, self._entity)
        url = self._target + suffix
        if not suffix and not urlsplit(self._target).path:
            url += "/"
        return url + (f"?{ctx.query}" if ctx.query else "")

    def upstream_headers(self, ctx: RelayedHttpContext) -> list[tuple[str, str]]:
        dropped = _dropped(ctx.headers) | {"x-forwarded-proto", "x-forwarded-host"}
        headers = [(k, v) for k, v in ctx.headers.items() if k.lower() not in dropped]
        forwarded_for = ctx.header("x-forwarded-for")
        client = ctx.remote_endpoint[0] if ctx.remote_endpoint else None
        if client:
            chain = f"{forwarded_for}, {client}" if forwarded_for else client
            headers = [(k, v) for k, v in headers if k.lower() != "x-forwarded-for"]
            headers.append(("X-Forwarded-For", chain))
        headers.append(("X-Forwarded-Proto", self._proto))
        headers.append(("X-Forwarded-Host", self._relay_host))
        via = ctx.header("via")
        headers = [(k, v) for k, v in headers if k.lower() != "via"]
        headers.append(("Via", f"{via}, {VIA}" if via else VIA))
        return headers

    async def __call__(self, ctx: RelayedHttpContext) -> None:
        session = self._get_session()
        url = _as_sent(self.upstream_url(ctx))
        body = await ctx.read()
        try:
            async with session.request(
                ctx.method,
                url,
                headers=self.upstream_headers(ctx),
                # BytesIO: aiohttp writes it in slices (raw bytes > 1 MiB would block the loop).
                data=io.BytesIO(body) if body else None,
                allow_redirects=False,
                ssl=self._ssl,
            ) as upstream:
                dropped = _dropped(upstream.headers)
                headers: dict[str, str] = {}
                for name, value in upstream.headers.items():
                    if name.lower() in dropped:
                        continue
                    if name in headers:
                        if name.lower() == "set-cookie":
                            continue  # responseHeaders cannot carry two (PROTOCOL.md 6.4)
                        headers[name] += ", " + value
                    else:
                        headers[name] = value
                via = headers.pop("Via", None)
                headers["Via"] = f"{via}, {VIA}" if via else VIA
                await ctx.respond(upstream.status, upstream.reason or None, headers)
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await ctx.write(chunk)
        except (aiohttp.ClientConnectorError, aiohttp.ClientOSError) as exc:
            await self._error(ctx, 502, "Bad Gateway: the upstream is unreachable", exc)
            return
        except TimeoutError as exc:
            await self._error(ctx, 504, "Gateway Timeout: the upstream did not answer", exc)
            return
        except aiohttp.ClientError as exc:
            await self._error(ctx, 502, "Bad Gateway: the upstream failed", exc)
            return
        await ctx.finish()

    @staticmethod
    async def _error(ctx: RelayedHttpContext, status: int, text: str, exc: BaseException) -> None:
        logger.warning("upstream request failed: %s: %s", type(exc).__name__, exc)
        if ctx.responded:
            ctx.abort()  # the response was under way: the sender sees it cut
            return
        await ctx.respond(status, text, {"content-type": "text/plain; charset=utf-8"})
        await ctx.write(text.encode() + b"\n")
        await ctx.finish()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def reject_websocket(ctx: AcceptContext) -> None:
    """Accept handler of an HTTP-only listener: WebSocket senders get 501."""
    ctx.reject(501, "This hybrid connection forwards HTTP requests only")


async def serve_http_forward(
    connection_string: str,
    spec: HttpForwardSpec,
    *,
    ready: asyncio.Event | None = None,
    **listener_kwargs: Any,
) -> None:
    """Run one ``-H`` forward until cancelled.

    Raises:
        ConfigurationError, AuthorizationError, EndpointNotFoundError, RelayConnectionError:
            the first connection failed, or the listener stopped for good.
    """
    endpoint = ConnectionString.parse(connection_string).endpoint
    relay_host, secure = relay_origin(endpoint)
    listener_kwargs.setdefault("accept_handler", reject_websocket)
    listener = HybridConnectionListener.from_connection_string(
        connection_string, spec.entity_path, **listener_kwargs
    )
    entity = listener.entity_path
    proxy = HttpReverseProxy(spec.target, entity_path=entity, relay_host=relay_host, secure=secure)
    listener.request_handler = proxy
    try:
        async with listener:
            if ready is not None:
                ready.set()
            while (stream := await listener.accept_connection()) is not None:
                await stream.aclose()
    finally:
        await proxy.aclose()
    raise RelayConnectionError(f"-H {entity}: the listener stopped: the relay refuses it")
