"""The one place where the SDK opens a WebSocket, and the endpoint/proxy helpers.

Every client connection (sender and rendezvous sockets, listener control channels, and
connections through an HTTP proxy) is our own client socket
(:mod:`hybridrelay.transport.frames_ws`, docs/DECISIONS.md D11): control channels ask it for
keep-alive pings, proxied connections for a ``CONNECT`` tunnel. It raises only our exception
tree:

* an HTTP status instead of ``101`` -> :func:`hybridrelay.exceptions.http_error` with the
  status and the *reason phrase* (which carries the relay's or the listener's description,
  PROTOCOL.md 5.4);
* refused / unreachable / reset / TLS failure / a proxy's refusal -> :class:`RelayConnectionError`;
* no answer in time -> :class:`RelayTimeoutError`.

Connect failures name the address and the cause in words
(:mod:`hybridrelay.transport.connect_failure`). :meth:`WebSocketConnector.get` is the one plain
HTTP request of the SDK (the runtime information, PROTOCOL.md 8.2), over the same TLS settings
and proxy.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from urllib.parse import unquote, urlsplit

from hybridrelay.client.tokens import (
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
    TokenProvider,
)
from hybridrelay.exceptions import ConfigurationError, ProtocolError, RelayConnectionError
from hybridrelay.protocol.addressing import Endpoint, parse_endpoint
from hybridrelay.protocol.connection_string import ConnectionString
from hybridrelay.protocol.websocket import MAX_RESPONSE_HEAD, ResponseHead, parse_response_head
from hybridrelay.transport import frames_ws
from hybridrelay.transport.connect_failure import connect_failure
from hybridrelay.transport.warm import WarmPool

__all__ = [
    "CONTROL_MAX_MESSAGE",
    "STREAM_MAX_MESSAGE",
    "Endpoint",
    "WebSocketConnector",
    "env_proxy_for",
    "parse_endpoint",
    "resolve_connection_string",
]

#: Control messages to a .NET listener stay below 64 KiB (PROTOCOL.md 4.2); a request message
#: with headers can be larger than that on the wire, so allow some room.
CONTROL_MAX_MESSAGE = 4 * 64 * 1024
#: Largest single message accepted on a rendezvous stream. We send at most 64 KiB per message;
#: Node senders may send more (ws@6 allows 100 MiB), this bounds what one message can cost us.
STREAM_MAX_MESSAGE = 16 * 1024 * 1024
#: The most of an answer's body :meth:`WebSocketConnector.get` reads (a runtime information
#: entry is well under 1 KiB).
MAX_GET_BODY = 64 * 1024


def env_proxy_for(url: str, proxies: Mapping[str, str]) -> str | None:
    """The proxy the environment asks for ``url``, or None.

    ``proxies`` is :func:`urllib.request.getproxies_environment` (``{"https": ..., "no": ...}``).
    A WebSocket over TLS is an HTTPS connection to every proxy admin, so ``wss`` falls back to
    ``HTTPS_PROXY`` (and ``ws`` to ``HTTP_PROXY``) when no ``WSS_PROXY``/``WS_PROXY`` is set,
    with ``NO_PROXY`` honoured.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _bypassed(host, proxies.get("no", "")):
        return None
    scheme = parts.scheme.lower()
    fallback = {"wss": "https", "ws": "http"}.get(scheme, scheme)
    return proxies.get(scheme) or proxies.get(fallback) or None


def _bypassed(host: str, no_proxy: str) -> bool:
    """``NO_PROXY`` semantics as curl and urllib apply them: ``*``, or a comma-separated list
    of host names / domain suffixes (``example.com`` and ``.example.com`` both cover
    ``a.example.com``), ports ignored."""
    host = host.lower().rstrip(".")
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        name = name.lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _split_proxy(proxy: str) -> frames_ws.Proxy:
    """The proxy of an ``http://[user:pass@]host:port`` URL (basic auth from the userinfo)."""
    try:
        parts = urlsplit(proxy)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError("invalid proxy URL") from exc
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ConfigurationError("proxy must look like http://[user:pass@]host:port")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")
    return frames_ws.Proxy(parts.hostname, port or 80, authorization)


class WebSocketConnector:
    """Opens the WebSockets of one listener or client, and keeps their warm connections.

    Args:
        ssl_context: verifies the relay's certificate on ``wss://``.
        proxy: ``http://[user:pass@]host:port``; None means "as the environment says".
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, proxy: str | None) -> None:
        self._ssl = ssl_context
        self._proxy = _split_proxy(proxy) if proxy is not None else None
        self._explicit_proxy = proxy is not None
        # The environment is read once per connector (per listener or client), not for every
        # connection: getproxies_environment() scans os.environ and showed up in profiles.
        self._environment_proxies: dict[str, str] | None = None
        self._closed = False
        # Connections to the relay opened ahead of the handshakes (never through a proxy).
        self._warm: WarmPool[frames_ws.FrameSocket] = WarmPool()

    def _proxy_for(self, url: str) -> frames_ws.Proxy | None:
        if self._explicit_proxy:
            return self._proxy
        if self._environment_proxies is None:
            self._environment_proxies = urllib.request.getproxies_environment()
        found = env_proxy_for(url, self._environment_proxies)
        return _split_proxy(found) if found else None

    async def connect(
        self,
        url: str,
        *,
        connect_timeout: float,
        headers: Mapping[str, str] | None = None,
        protocols: Sequence[str] = (),
        keepalive: float | None = None,
        stream_keepalive: float | None = None,
        max_msg_size: int = STREAM_MAX_MESSAGE,
    ) -> frames_ws.FrameSocket:
        """Open a WebSocket to ``url`` within ``connect_timeout`` seconds.

        ``keepalive``: ping every that many seconds, and drop the connection when a pong is not
        back within half of it (control channels). ``stream_keepalive``: ping after that many
        seconds of silence, and drop a link that stays silent (relayed streams; see
        :mod:`hybridrelay.transport.frames_ws`). ``url`` may hold a secret (a rendezvous
        address): it never goes into an exception message or a log line from here.

        Raises:
            RelayHttpError: (or a subclass) the server answered with an HTTP status.
            RelayTimeoutError: no WebSocket within ``connect_timeout``.
            RelayConnectionError: the connection failed, or the proxy refused the tunnel.
        """
        if self._closed:
            raise RelayConnectionError("the connection factory is closed")
        return await frames_ws.connect(
            url,
            ssl_context=self._ssl,
            connect_timeout=connect_timeout,
            headers=dict(headers or {}),
            protocols=tuple(protocols),
            max_message_size=max_msg_size,
            warm=self._warm,
            proxy=self._proxy_for(url),
            keepalive=keepalive,
            stream_keepalive=stream_keepalive,
        )

    async def get(
        self, url: str, *, headers: Mapping[str, str], request_timeout: float
    ) -> tuple[ResponseHead, bytes]:
        """``GET url`` (``http[s]://``, or the ``ws[s]://`` form of the same address) on a
        connection of its own, within ``request_timeout`` seconds: the answer's head and at most
        ``MAX_GET_BODY`` bytes of its body.

        Raises:
            RelayTimeoutError: no whole answer within ``request_timeout``.
            RelayConnectionError: the connection failed (the address and the cause named), the
                proxy refused the tunnel, or the answer is not HTTP.
        """
        if self._closed:
            raise RelayConnectionError("the connection factory is closed")
        parts = urlsplit(url)
        secure = parts.scheme.lower() in ("https", "wss")
        host = parts.hostname or ""
        port = parts.port or (443 if secure else 80)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        proxy = self._proxy_for(url.replace("http", "ws", 1) if url.startswith("http") else url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc.rpartition('@')[2]}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += ["Connection: close", "", ""]
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(request_timeout):
                if proxy is None:
                    reader, writer = await asyncio.open_connection(
                        host,
                        port,
                        ssl=self._ssl if secure else None,
                        server_hostname=host if secure else None,
                        limit=MAX_RESPONSE_HEAD,
                    )
                else:
                    reader, writer = await asyncio.open_connection(
                        proxy.host, proxy.port, limit=MAX_RESPONSE_HEAD
                    )
                    writer.write(proxy.connect_request(host, port))
                    tunnel = parse_response_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
                    if not 200 <= tunnel.status < 300:
                        raise RelayConnectionError(
                            f"the proxy refused the tunnel: {tunnel.status} {tunnel.reason}"
                        )
                    if secure:
                        await writer.start_tls(self._ssl, server_hostname=host)
                writer.write("\r\n".join(lines).encode("latin-1"))
                head = parse_response_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
                length = head.headers.get("content-length", "")
                if length.isdigit():
                    body = await reader.readexactly(min(int(length), MAX_GET_BODY))
                else:  # Connection: close: the body ends with the connection
                    body = await reader.read(MAX_GET_BODY)
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            via = f"{proxy.host}:{proxy.port}" if proxy is not None else None
            raise connect_failure(address, exc, timeout=request_timeout, via=via) from exc
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError) as exc:
            raise RelayConnectionError(
                f"cannot connect to {address}: not an HTTP answer ({type(exc).__name__})"
            ) from exc
        finally:
            if writer is not None:
                writer.transport.abort()
        return head, body

    async def aclose(self) -> None:
        """No new connections; the warm ones are closed. Sockets already handed out keep
        working until they are closed. Idempotent."""
        self._closed = True
        await self._warm.aclose()


def resolve_connection_string(
    connection_string: str, entity_path: str | None
) -> tuple[str, str, TokenProvider | None]:
    """``(endpoint, entity_path, token_provider)`` from an Azure-style connection string.

    Raises:
        ConfigurationError: malformed, no entity path, or two different entity paths.
    """
    parsed = ConnectionString.parse(connection_string)
    if (
        entity_path
        and parsed.entity_path
        and entity_path.strip("/") != parsed.entity_path.strip("/")
    ):
        raise ConfigurationError(
            "the entity path given differs from the connection string's EntityPath"
        )
    entity = entity_path or parsed.entity_path
    if not entity:
        raise ConfigurationError("no entity path: give one or put EntityPath= in the string")
    provider: TokenProvider | None = None
    if parsed.token:
        provider = SharedAccessSignatureTokenProvider(parsed.token)
    elif parsed.key_name and parsed.key:
        provider = SharedAccessKeyTokenProvider(parsed.key_name, parsed.key)
    return parsed.endpoint, entity, provider
