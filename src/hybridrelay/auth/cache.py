"""A bounded cache of verified SAS tokens.

Verifying a token costs a parse and one HMAC per candidate key; with HTTP relaying every request
carries the same token, and that was ~10 % of the relay's CPU (docs/PERFORMANCE.md). Only the
*signature check* is cached, keyed by what it depends on (the token text and the rules as they
are now); the rest of the decision (expiry, audience host, path scope, rights) runs on every
request, so a cached token expires exactly when an uncached one would and a token never covers
a path it would not cover uncached. Changing a rule's keys or rights changes the key, so nothing
stale is served. Failed checks are not cached (a flood of bad tokens cannot evict good ones);
an expired token stays until it is the least recently used, bounded by ``max_entries``.
Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from hybridrelay.auth.sas import AuthDecision, AuthorizationRule, VerifiedToken, verify_token

__all__ = ["AuthCache"]

_Key = tuple[str, tuple[AuthorizationRule, ...]]


class AuthCache:
    """Use as ``authorize(..., verify=cache.verify)``."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[_Key, VerifiedToken] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def verify(
        self, token: str | None, rules: Sequence[AuthorizationRule]
    ) -> VerifiedToken | AuthDecision:
        """:func:`~hybridrelay.auth.sas.verify_token`, remembering the tokens that passed."""
        if not token:
            return verify_token(token, rules)
        key: _Key = (token, tuple(rules))
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        verified = verify_token(token, rules)
        if isinstance(verified, VerifiedToken):
            self._entries[key] = verified
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return verified
