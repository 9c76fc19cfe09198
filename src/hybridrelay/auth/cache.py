"""A bounded cache of successful SAS authorizations.

Verifying a token costs a parse and one HMAC per candidate key; with HTTP relaying every request
carries the same token, and that was ~10 % of the relay's CPU (docs/PERFORMANCE.md). Only
*successful* decisions are cached, keyed by everything the decision depends on (the token text,
the entity, the right asked for, the rules as they are now, the namespace host), and a hit is
still checked against the token's expiry at the time of use, so a cached token expires exactly
when an uncached one would. Changing a rule's keys or rights changes the key, so nothing stale
is served. Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from hybridrelay.auth.sas import AuthDecision, AuthorizationRule, Rights, authorize

__all__ = ["AuthCache"]

_Key = tuple[str, str, Rights, tuple[AuthorizationRule, ...], str | None]


class AuthCache:
    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[_Key, AuthDecision] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def authorize(
        self,
        token: str | None,
        *,
        rules: Sequence[AuthorizationRule],
        entity_path: str,
        required: Rights,
        now: float,
        namespace_host: str | None = None,
        grace_seconds: float = 0.0,
    ) -> AuthDecision:
        """Like :func:`hybridrelay.auth.sas.authorize`, remembering successes."""
        if not token:
            return authorize(
                token,
                rules=rules,
                entity_path=entity_path,
                required=required,
                now=now,
                namespace_host=namespace_host,
                grace_seconds=grace_seconds,
            )
        key: _Key = (token, entity_path.lower(), required, tuple(rules), namespace_host)
        hit = self._entries.get(key)
        if hit is not None and hit.expiry is not None and hit.expiry + grace_seconds >= now:
            self._entries.move_to_end(key)
            return hit
        decision = authorize(
            token,
            rules=rules,
            entity_path=entity_path,
            required=required,
            now=now,
            namespace_host=namespace_host,
            grace_seconds=grace_seconds,
        )
        if decision.allowed:
            self._entries[key] = decision
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.pop(key, None)
        return decision
