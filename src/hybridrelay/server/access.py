"""Who may use the relay: the token a request carries (PROTOCOL.md 3.4) and the check of that
token against the rules of the entity and the namespace (3.5), which every endpoint uses."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from hybridrelay.auth.cache import AuthCache
from hybridrelay.auth.sas import AuthDecision, AuthorizationRule, Rights, authorize
from hybridrelay.server.config import HybridConnectionConfig, RelayConfig
from hybridrelay.server.store import EntityStore

__all__ = ["AUTH_HEADER", "Access", "request_token", "sender_token", "served_hosts"]

AUTH_HEADER = "ServiceBusAuthorization"


class Access:
    """The relay's authorization check: the rules come from ``store`` and the namespace host
    from the configuration of the moment (``settings()``); signature checks are cached."""

    def __init__(self, store: EntityStore, settings: Callable[[], RelayConfig]) -> None:
        self._store = store
        self._settings = settings
        self._cache = AuthCache()

    def rules_for(self, entity: HybridConnectionConfig) -> Sequence[AuthorizationRule]:
        return (*entity.authorization_rules, *self._store.namespace_rules())

    def authorize(
        self,
        token: str | None,
        entity: HybridConnectionConfig,
        required: Rights,
        grace: float = 0,
        *,
        suffix: str = "",
        host: str | None = None,
    ) -> AuthDecision:
        """The token must cover the request's whole path: ``entity`` and the request's
        ``suffix`` below it (PROTOCOL.md 3.5); listeners and renewals have no suffix.

        ``host`` is the request's ``Host`` (a renewal's: the one its control channel was
        opened by): unless ``namespace.host`` names the one host, the token's audience must
        name this one or ``public_base_url``'s (``namespace.check_audience_host`` turns the
        check off), so a token made for another namespace with the same key is refused.
        """
        settings = self._settings()
        hosts: frozenset[str] = frozenset()
        if settings.namespace_host is None and settings.check_audience_host and host:
            hosts = served_hosts(host, settings.server.public_base_url)
        return authorize(
            token,
            verify=self._cache.verify,
            rules=self.rules_for(entity),
            entity_path=entity.name,
            suffix=suffix,
            required=required,
            now=time.time(),
            namespace_host=settings.namespace_host,
            audience_hosts=hosts,
            grace_seconds=grace,
        )


@functools.lru_cache(maxsize=1024)  # once per relayed request, with the same few hosts
def served_hosts(host: str, public_base_url: str | None) -> frozenset[str]:
    """The lower-case host names a token's audience may give: the ``Host`` a request came by
    (``name:port``, ``[v6]:port``; the port never counts, as in Azure) and the public base's."""
    names = {urlsplit("//" + host).hostname or ""}
    if public_base_url:
        names.add(urlsplit(public_base_url).hostname or "")
    names.discard("")
    return frozenset(name.lower() for name in names)


def request_token(headers: Mapping[str, str], params: Mapping[str, str]) -> str | None:
    """The token of a WebSocket request: the ``sb-hc-token`` query parameter, else the
    ``ServiceBusAuthorization`` header."""
    return params.get("sb-hc-token") or headers.get(AUTH_HEADER)


def sender_token(
    headers: Mapping[str, str], params: Mapping[str, str], entity: HybridConnectionConfig
) -> tuple[str | None, bool]:
    """The token of a relayed HTTP request and whether ``Authorization`` was used (and must be
    stripped before the request reaches the listener).

    Order: the ``sb-hc-token`` query parameter, the ``ServiceBusAuthorization`` header, and the
    ``Authorization`` header only when authorization is on and neither of the others is present.
    """
    if "sb-hc-token" in params:
        return params["sb-hc-token"], False
    header = headers.get(AUTH_HEADER)
    if header is not None:
        return header, False
    if entity.requires_client_authorization and "Authorization" in headers:
        return headers["Authorization"], True
    return None, False
