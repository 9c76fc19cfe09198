"""The one place where the SDK opens a WebSocket, and the endpoint/proxy helpers.

Sender and rendezvous sockets are our own client (:mod:`hybridrelay.transport.frames_ws`,
docs/DECISIONS.md D11) unless ``HYBRIDRELAY_WS_CLIENT`` (read once, at the first connection)
says ``aiohttp`` or ``picows`` (:mod:`hybridrelay.transport.picows_ws`, ``pip install
hybridrelay[fast]``, D8; without picows installed one warning is logged and the default is
used). Control channels (they need a heartbeat) and every connection that goes through a proxy
are opened with aiohttp whatever the setting.

Everything aiohttp raises is turned into our exception tree here, so no foreign exception
leaves the public API:

* an HTTP status instead of ``101`` -> :func:`hybridrelay.exceptions.http_error` with the
  status and the *reason phrase* (which carries the relay's or the listener's description);
* refused / unreachable / reset / TLS failure -> :class:`RelayConnectionError`;
* no answer in time -> :class:`RelayTimeoutError`.

The reason phrase is captured with the session's ``raise_for_status`` hook: aiohttp's own
``WSServerHandshakeError`` only carries a fixed message, and the phrase is all a rejected
sender learns about why (PROTOCOL.md 5.4).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import urllib.request
from collections.abc import Mapping, Sequence
from urllib.parse import unquote, urlsplit

import aiohttp

from hybridrelay.client.tokens import (
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
    TokenProvider,
)
from hybridrelay.exceptions import (
    ConfigurationError,
    RelayConnectionError,
    RelayError,
    RelayTimeoutError,
    http_error,
)
from hybridrelay.protocol.addressing import Endpoint, parse_endpoint
from hybridrelay.protocol.connection_string import ConnectionString
from hybridrelay.transport import frames_ws
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import FragmentSocket, MessageSocket
from hybridrelay.transport.warm import WarmPool

__all__ = [
    "CONTROL_MAX_MESSAGE",
    "STREAM_MAX_MESSAGE",
    "WS_CLIENT_ENV",
    "Endpoint",
    "WebSocketConnector",
    "env_proxy_for",
    "parse_endpoint",
    "resolve_connection_string",
]

logger = logging.getLogger("hybridrelay.client")

#: Control messages to a .NET listener stay below 64 KiB (PROTOCOL.md 4.2); a request message
#: with headers can be larger than that on the wire, so allow some room.
CONTROL_MAX_MESSAGE = 4 * 64 * 1024
#: Largest single message accepted on a rendezvous stream. We send at most 64 KiB per message;
#: Node senders may send more (ws@6 allows 100 MiB), this bounds what one message can cost us.
STREAM_MAX_MESSAGE = 16 * 1024 * 1024


#: The environment variable that selects the WebSocket client of sender and rendezvous
#: sockets: ``frames`` (ours, :mod:`hybridrelay.transport.frames_ws`), ``aiohttp`` or
#: ``picows``.
WS_CLIENT_ENV = "HYBRIDRELAY_WS_CLIENT"
DEFAULT_WS_CLIENT = "frames"
_ws_client: str | None = None


def ws_client() -> str:
    """``"frames"``, ``"aiohttp"`` or ``"picows"``: the client for rendezvous and sender
    sockets.

    ``HYBRIDRELAY_WS_CLIENT`` is read once per process; asking for picows without picows
    installed (or with an unknown value) logs one warning and gives the default.
    """
    global _ws_client
    if _ws_client is None:
        wanted = os.environ.get(WS_CLIENT_ENV, DEFAULT_WS_CLIENT).strip().lower()
        wanted = wanted or DEFAULT_WS_CLIENT
        chosen = DEFAULT_WS_CLIENT
        if wanted in ("frames", "aiohttp"):
            chosen = wanted
        elif wanted == "picows":
            try:
                import hybridrelay.transport.picows_ws  # noqa: F401
            except ImportError:
                logger.warning(
                    "%s=picows but picows is not installed (pip install hybridrelay[fast]); "
                    "using %s",
                    WS_CLIENT_ENV,
                    DEFAULT_WS_CLIENT,
                )
            else:
                chosen = "picows"
        else:
            logger.warning(
                "%s=%r is not frames, aiohttp or picows; using %s",
                WS_CLIENT_ENV,
                wanted,
                DEFAULT_WS_CLIENT,
            )
        _ws_client = chosen
    return _ws_client


def env_proxy_for(url: str, proxies: Mapping[str, str]) -> str | None:
    """The proxy the environment asks for ``url``, or None.

    ``proxies`` is :func:`urllib.request.getproxies_environment` (``{"https": ..., "no": ...}``).
    aiohttp's own ``trust_env`` looks up ``wss_proxy`` for a ``wss://`` URL and ignores
    ``HTTPS_PROXY``; a WebSocket over TLS is an HTTPS connection to every proxy admin, so we
    map ``wss`` to ``https`` (and ``ws`` to ``http``), with ``NO_PROXY`` honoured.
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


async def _check_handshake(response: aiohttp.ClientResponse) -> None:
    # Runs for every response of the session, before aiohttp checks the upgrade.
    if response.status != 101:
        status, reason = response.status, response.reason or ""
        response.release()
        raise http_error(status, reason)


def _split_proxy(proxy: str) -> tuple[str, dict[str, str]]:
    """Strip ``user:pass@`` from a proxy URL; return it and the Proxy-Authorization header."""
    try:
        parts = urlsplit(proxy)
        _ = parts.port
    except ValueError as exc:
        raise ConfigurationError("invalid proxy URL") from exc
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ConfigurationError("proxy must look like http://[user:pass@]host:port")
    if parts.username is None:
        return proxy, {}
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    auth = aiohttp.encode_basic_auth(unquote(parts.username), unquote(parts.password or ""))
    return bare, {"Proxy-Authorization": auth}


class WebSocketConnector:
    """Owns one ``aiohttp.ClientSession`` (one per listener or client) and opens WebSockets.

    Args:
        ssl_context: verifies the relay's certificate on ``wss://``.
        proxy: ``http://[user:pass@]host:port``; None means "as the environment says".
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, proxy: str | None) -> None:
        self._ssl = ssl_context
        if proxy is not None:
            self._proxy: str | None
            self._proxy, self._proxy_headers = _split_proxy(proxy)
        else:
            self._proxy, self._proxy_headers = None, {}
        self._explicit_proxy = proxy is not None
        # The environment is read once per connector (per listener or client), not for every
        # connection: getproxies_environment() scans os.environ and showed up in profiles.
        self._environment_proxies: dict[str, str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Connections to the relay opened ahead of the handshakes of our own client sockets.
        self._warm: WarmPool[frames_ws.FrameSocket] = WarmPool()
        # Sockets handed out and not finished yet: closing the session would cut them, so
        # aclose() leaves it open until the last one is released (streams outlive their
        # listener or client, like accepted sockets outlive a listening socket).
        self._live: set[MessageSocket] = set()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RelayConnectionError("the connection factory is closed")
        if self._session is None:
            # Created lazily, inside the running loop. limit=0: a listener may hold many
            # rendezvous sockets at once. No aiohttp timeouts: each connect is bounded below,
            # and established WebSockets must not be cut by a "total" request timeout.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
                raise_for_status=_check_handshake,
                # The environment's proxy settings are applied by env_proxy_for (see there).
                trust_env=False,
                # Every request is a one-off upgrade whose answer sets no cookie: no jar to
                # filter and update per connection (~5 % of a connect's CPU, measured).
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _proxy_for(self, url: str) -> tuple[str | None, dict[str, str]]:
        if self._explicit_proxy:
            return self._proxy, self._proxy_headers
        if self._environment_proxies is None:
            self._environment_proxies = urllib.request.getproxies_environment()
        found = env_proxy_for(url, self._environment_proxies)
        return _split_proxy(found) if found else (None, {})

    async def connect(
        self,
        url: str,
        *,
        connect_timeout: float,
        headers: Mapping[str, str] | None = None,
        protocols: Sequence[str] = (),
        heartbeat: float | None = None,
        max_msg_size: int = STREAM_MAX_MESSAGE,
    ) -> FragmentSocket:
        """Open a WebSocket to ``url`` within ``connect_timeout`` seconds.

        ``url`` may hold a secret (a rendezvous address): it never goes into an exception
        message or a log line from here.

        Raises:
            RelayHttpError: (or a subclass) the server answered with an HTTP status.
            RelayTimeoutError: no WebSocket within ``connect_timeout``.
            RelayConnectionError: the connection failed.
        """
        if self._closed:
            raise RelayConnectionError("the connection factory is closed")
        proxy, proxy_headers = self._proxy_for(url)
        if heartbeat is None and proxy is None and ws_client() == "frames":
            own = await frames_ws.connect(
                url,
                ssl_context=self._ssl,
                connect_timeout=connect_timeout,
                headers=dict(headers or {}),
                protocols=tuple(protocols),
                max_message_size=max_msg_size,
                warm=self._warm,
            )
            self._live.add(own)
            return own
        if heartbeat is None and proxy is None and ws_client() == "picows":
            from hybridrelay.transport import picows_ws

            fast = await picows_ws.connect(
                url,
                ssl_context=self._ssl,
                connect_timeout=connect_timeout,
                headers=headers or {},
                protocols=protocols,
                max_message_size=max_msg_size,
            )
            self._live.add(fast)
            return fast
        session = self._get_session()
        secure = url[:4].lower() == "wss:"
        request_headers = dict(headers or {})
        if proxy is not None and not secure:
            # Plain ws:// goes through the proxy as an absolute-form GET, not CONNECT, and
            # aiohttp only sends proxy_headers on CONNECT: the proxy's credentials must ride on
            # the request itself then.
            request_headers.update(proxy_headers)
        try:
            async with asyncio.timeout(connect_timeout):
                ws = await session.ws_connect(
                    url,
                    headers=request_headers,
                    protocols=tuple(protocols),
                    autoclose=False,
                    autoping=True,
                    heartbeat=heartbeat,
                    compress=0,  # never negotiate permessage-deflate (PROTOCOL.md 5.6)
                    max_msg_size=max_msg_size,
                    proxy=proxy,
                    proxy_headers=proxy_headers or None,
                    ssl=self._ssl if secure else True,
                )
        except RelayError:
            raise
        except TimeoutError as exc:
            raise RelayTimeoutError(f"no WebSocket within {connect_timeout:g} s") from exc
        except aiohttp.ClientHttpProxyError as exc:
            raise RelayConnectionError(f"proxy refused the tunnel: {exc.status}") from exc
        except aiohttp.ClientSSLError as exc:
            raise RelayConnectionError(f"TLS handshake failed: {type(exc).__name__}") from exc
        except aiohttp.WSServerHandshakeError as exc:
            # 101 but a bad upgrade (wrong accept key, unrequested sub-protocol, ...).
            raise RelayConnectionError(f"WebSocket handshake failed: {exc.message}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # ValueError: aiohttp rejects a malformed URL (InvalidURL is both).
            raise RelayConnectionError(f"cannot connect: {type(exc).__name__}") from exc
        socket = AiohttpMessageSocket.client(ws)
        self._live.add(socket)
        return socket

    def _prune(self) -> None:
        self._live = {s for s in self._live if not (s.close_sent and s.close_received)}

    async def release(self, socket: MessageSocket) -> None:
        """A socket from :meth:`connect` is finished; closes the session if it was the last
        one after :meth:`aclose`."""
        self._live.discard(socket)
        if self._closed:
            await self._close_if_idle()

    async def _close_if_idle(self) -> None:
        self._prune()
        if self._live:
            return
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def aclose(self) -> None:
        """No new connections; close the session once no socket from it is in use.

        Sockets already handed out keep working until they are closed. Idempotent.
        """
        self._closed = True
        await self._warm.aclose()
        await self._close_if_idle()


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
