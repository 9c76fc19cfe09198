"""Who may use the relay: the token a request carries (PROTOCOL.md 3.4) and the check of that
token against the rules of the entity and the namespace (3.5), which every endpoint uses."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from hybridrelay.auth.cache import AuthCache
from hybridrelay.auth.sas import AuthDecision, Rights, authorize
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
        #: Decisions that allowed, by everything they were made from but the clock: the same
        #: sender's token on its next request is allowed again without the work (a relayed
        #: HTTP request is authorized each time). Used only while the rules and the
        #: configuration are the very objects it was made with (a change replaces them: the
        #: store's rules are tuples, the configuration is replaced whole) and the token has
        #: not expired, so it decides exactly as a fresh check would.
        self._decided: dict[tuple[object, ...], tuple[object, object, object, AuthDecision]] = {}

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
        namespace_rules = self._store.namespace_rules()
        now = time.time()
        key = (token, entity.name, suffix, required, grace, host)
        memo = self._decided.get(key)
        if (
            memo is not None
            and memo[0] is entity.authorization_rules
            and memo[1] is namespace_rules
            and memo[2] is settings
            and memo[3].expiry is not None
            and memo[3].expiry + grace >= now
        ):
            return memo[3]
        hosts: frozenset[str] = frozenset()
        if settings.namespace_host is None and settings.check_audience_host and host:
            hosts = served_hosts(host, settings.server.public_base_url)
        decision = authorize(
            token,
            verify=self._cache.verify,
            rules=(*entity.authorization_rules, *namespace_rules),
            entity_path=entity.name,
            suffix=suffix,
            required=required,
            now=now,
            namespace_host=settings.namespace_host,
            audience_hosts=hosts,
            grace_seconds=grace,
        )
        if decision.allowed and decision.expiry is not None:
            if len(self._decided) >= _DECIDED_LIMIT:
                self._decided.clear()
            self._decided[key] = (entity.authorization_rules, namespace_rules, settings, decision)
        return decision


#: At most this many remembered decisions (all forgotten at once beyond it).
_DECIDED_LIMIT = 4096


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
