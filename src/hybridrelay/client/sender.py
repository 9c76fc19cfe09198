"""HybridConnectionClient: connects to a listener through the relay (PROTOCOL.md 5, E2)."""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from hybridrelay.client._connect import (
    STREAM_MAX_MESSAGE,
    WebSocketConnector,
    resolve_connection_string,
)
from hybridrelay.client.endpoints import EndpointRing, first_that_answers
from hybridrelay.client.stream import HybridConnectionStream
from hybridrelay.client.tls import build_ssl_context
from hybridrelay.client.tokens import TokenProvider, fetch_token
from hybridrelay.exceptions import (
    AuthorizationError,
    ConfigurationError,
    ConnectionRejectedError,
    EndpointNotFoundError,
    ListenerRejectedError,
    QuotaExceededError,
    RelayHttpError,
    http_error,
    refusal_hint,
    with_hint,
)
from hybridrelay.protocol.addressing import Endpoint, build_relay_url
from hybridrelay.transport.frames_ws import FrameSocket

__all__ = ["HybridConnectionClient"]

logger = logging.getLogger("hybridrelay.client")

T = TypeVar("T")

#: Lifetime of the tokens a client asks for (the .NET default).
TOKEN_TTL = 3600.0
#: The runtime information's API version and marker header (PROTOCOL.md 8.2), as .NET sends.
RUNTIME_INFO_API_VERSION = "2016-07"
UNKNOWN_ENTITY = "The hybrid connection does not exist."

# Headers the WebSocket handshake owns; an application header of that name would break it.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "serviceBusAuthorization".lower(),
    }
)


def _as_rejection(exc: RelayHttpError, entity: str) -> RelayHttpError:
    """Map a refused connect to the exception the SDK promises.

    401/403/404/429 keep their relay meaning, with what to do about them
    (:func:`~hybridrelay.exceptions.refusal_hint`; a 404 for want of a listener gets none: the
    name is right). Any other status is what the listener rejected with (or the relay's own
    verdict on a sender no listener took: 502/504); Azure's wire cannot tell them apart, so it
    is a :class:`ConnectionRejectedError` (a :class:`RelayHttpError`). Our relay marks the
    listener's refusals (PROTOCOL.md 5.4): those are a :class:`ListenerRejectedError`, whatever
    the status (an application's 403 is not about the sender's token).
    """
    if isinstance(exc, ListenerRejectedError):
        return exc  # the relay says the listener refused: not a question of the token
    if isinstance(exc, EndpointNotFoundError) and "listener" in exc.description.lower():
        return exc
    if isinstance(exc, AuthorizationError | EndpointNotFoundError | QuotaExceededError):
        return with_hint(exc, entity, "Send")
    return ConnectionRejectedError(exc.status, exc.description)


class HybridConnectionClient:
    """Opens relayed connections to the listeners of a hybrid connection.

    Args:
        endpoint: ``sb://host[:port]`` (= ``wss``), ``wss://...`` or ``ws://...``; or several,
            the nodes of a cluster (docs/CLUSTER.md): a connect that cannot reach a relay, or
            that it answers 502/503, is tried on the next one within the same
            ``connect_timeout``, and the endpoint that worked is tried first from then on.
        entity_path: the hybrid connection's name.
        token_provider: source of the Send token; None connects anonymously (for a hybrid
            connection that does not require client authorization).
        ssl: verify the relay with this context (else ``ca_file``, else the system store).
        ca_file: PEM file of the CAs to trust instead of the system store.
        proxy: ``http://[user:pass@]host:port``; None honours ``HTTPS_PROXY``/``NO_PROXY``.
        connect_timeout: for the whole connect: relay(s), listener's decision and rendezvous.
        keep_alive_interval: find a stream's link to the relay dead when it stays silent: a
            ping after this many seconds in which nothing came, the stream closed (1006) when
            nothing comes in the next interval either (a slow reader is never dropped; see
            :mod:`hybridrelay.transport.frames_ws`). None (the default): no pings.

    Holds one HTTP session; close it with :meth:`aclose` (or ``async with``). Streams already
    created keep working: the session is released when the last of them is closed.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        entity_path: str,
        token_provider: TokenProvider | None,
        *,
        ssl: ssl_module.SSLContext | None = None,
        ca_file: str | None = None,
        proxy: str | None = None,
        connect_timeout: float = 70.0,
        keep_alive_interval: float | None = None,
    ) -> None:
        if not entity_path.strip("/"):
            raise ConfigurationError("an entity path is required")
        if connect_timeout <= 0:
            raise ConfigurationError("connect_timeout must be positive")
        if keep_alive_interval is not None and keep_alive_interval <= 0:
            raise ConfigurationError("keep_alive_interval must be positive")
        self._keep_alive_interval = keep_alive_interval
        self._endpoints = EndpointRing(endpoint)
        self._entity_path = entity_path.strip("/")
        self._token_provider = token_provider
        self._connect_timeout = connect_timeout
        self._connector = WebSocketConnector(
            ssl_context=build_ssl_context(ssl_context=ssl, ca_file=ca_file), proxy=proxy
        )

    @classmethod
    def from_connection_string(
        cls, connection_string: str, entity_path: str | None = None, **kwargs: Any
    ) -> HybridConnectionClient:
        """Build a client from ``Endpoint=sb://...;SharedAccessKeyName=..;...``; a cluster's
        other nodes go in ``endpoints=[...]``."""
        endpoint, entity, provider = resolve_connection_string(connection_string, entity_path)
        others: Sequence[str] = kwargs.pop("endpoints", ())
        return cls([endpoint, *others], entity, provider, **kwargs)

    def __repr__(self) -> str:
        return f"<HybridConnectionClient {self._endpoints.current.host}/{self._entity_path}>"

    async def _get_token(self, host: str | None = None) -> str | None:
        return await fetch_token(
            self._token_provider,
            host or self._endpoints.current.host,
            self._entity_path,
            TOKEN_TTL,
        )

    async def _on_endpoints(self, attempt: Callable[[Endpoint, float], Awaitable[T]]) -> T:
        """``attempt(endpoint, seconds left)`` on the endpoints in turn, the sticky one first,
        until one works or fails for a reason another node would share
        (``client/endpoints.py``); all within ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        endpoint, result = await first_that_answers(
            self._endpoints.in_turn(),
            lambda endpoint: attempt(endpoint, deadline - loop.time()),
            give_up=lambda: deadline - loop.time() <= 0,
            on_failure=lambda _, exc: logger.info(
                "%s: %s; trying the next relay endpoint", self, exc
            ),
        )
        self._endpoints.stick(endpoint)
        return result

    async def create_connection(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        subprotocols: Sequence[str] = (),
        path: str = "",
        query: str = "",
    ) -> HybridConnectionStream:
        """Connect to a listener and return the stream.

        Args:
            headers: application headers for the upgrade request; the listener sees them in
                ``AcceptContext.connect_headers``.
            subprotocols: WebSocket sub-protocols to offer, in order of preference.
            path: a suffix after the entity path (``"/a/b"``), raw (already URL-encoded).
            query: the application's own query string (without ``?``), raw.

        Raises:
            ConnectionRejectedError: the listener rejected (status and description as sent);
                a :class:`ListenerRejectedError` where the relay says so (ours does), any
                status, 401 and 403 included.
            AuthorizationError: 401/403 from the relay.  EndpointNotFoundError: 404.
            RelayHttpError: another refusal of the relay.  RelayTimeoutError: not connected
            within ``connect_timeout``.  RelayConnectionError: the relay was not reachable.
        """
        if path and not path.startswith("/"):
            path = "/" + path
        if "?" in path or "#" in path:
            raise ValueError("path must not contain '?' or '#'; give the query separately")
        query = query.removeprefix("?")
        request_headers: dict[str, str] = {}
        for name, value in (headers or {}).items():
            if name.lower() in _RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the SDK")
            request_headers[name] = value
        connection_id = str(uuid.uuid4())

        async def dial(endpoint: Endpoint, seconds: float) -> FrameSocket:
            sent = dict(request_headers)
            token = await self._get_token(endpoint.host)
            if token:
                sent["ServiceBusAuthorization"] = token
            url = build_relay_url(
                endpoint.base_url,
                self._entity_path,
                action="connect",
                suffix=path,
                app_query=query,
                params={"sb-hc-id": connection_id},
            )
            return await self._connector.connect(
                url,
                connect_timeout=seconds,
                headers=sent,
                protocols=subprotocols,
                max_msg_size=STREAM_MAX_MESSAGE,
                stream_keepalive=self._keep_alive_interval,
            )

        try:
            socket = await self._on_endpoints(dial)
        except RelayHttpError as exc:
            raise _as_rejection(exc, self._entity_path) from exc
        return HybridConnectionStream(socket, id=connection_id)

    async def check_access(self) -> None:
        """Ask the relay whether this client's token opens its hybrid connection, without
        reaching a listener: the runtime information request (.NET's
        ``GetRuntimeInformationAsync``, PROTOCOL.md 8.2). A bridge checks its ``-L`` forwards
        so at start, instead of at its first client.

        The relay checks the token's signature and scope and that the hybrid connection
        exists; it takes *any* right, so a key without Send passes here and is refused at the
        first connect (403). Without a token provider there is nothing to check. Bounded by
        ``connect_timeout``.

        Raises:
            AuthorizationError: 401 (wrong key, or rotated) / 403 (a token for another entity).
            EndpointNotFoundError: no such hybrid connection.
            RelayConnectionError: (or RelayTimeoutError, CertificateError) the relay could not
                be reached, the cause named; RelayHttpError: another status.
        """
        if self._token_provider is None:
            return
        path = "/".join(quote(part, safe="") for part in self._entity_path.split("/"))
        entity = self._entity_path

        async def ask(endpoint: Endpoint, seconds: float) -> None:
            token = await self._get_token(endpoint.host)
            assert token is not None
            base = endpoint.base_url.replace("ws", "http", 1)
            head, body = await self._connector.get(
                f"{base}/{path}?api-version={RUNTIME_INFO_API_VERSION}",
                headers={"Authorization": token, "X-PROCESS-AT": "ServiceBus"},
                request_timeout=seconds,
            )
            if head.status != 200:
                error = http_error(head.status, head.reason)
                raise with_hint(error, entity, "Send")
            if b"<entry" not in body:  # an empty feed: the entity does not exist
                raise EndpointNotFoundError(404, UNKNOWN_ENTITY, refusal_hint(404, entity, "Send"))

        await self._on_endpoints(ask)

    async def aclose(self) -> None:
        """No new connections; the HTTP session goes once its streams are closed. Idempotent."""
        await self._connector.aclose()

    async def __aenter__(self) -> HybridConnectionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
