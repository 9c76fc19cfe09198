"""Token providers: where the SDK gets the SAS token for a listen or connect (PROTOCOL.md 3).

A provider is anything with ``async get_token(audience, ttl) -> str``. Two are built in: one that
signs tokens locally with a rule's key (and caches them), one that hands out a ready-made token.
Neither ever shows a key or a token in ``repr``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from hybridrelay.auth.sas import create_token, parse_token, token_audience
from hybridrelay.exceptions import RelayError, RelayTimeoutError, TokenError

__all__ = [
    "SharedAccessKeyTokenProvider",
    "SharedAccessSignatureTokenProvider",
    "TokenProvider",
    "fetch_token",
    "token_expiry",
]

#: How long a token provider may take (it may call out to a secret store).
TOKEN_TIMEOUT = 30.0

#: A cached token is reused only while it has at least this long left (capped at half the
#: requested ttl, so that short-lived tokens, as used in tests, are still cached sensibly).
REFRESH_MARGIN = 300.0


@runtime_checkable
class TokenProvider(Protocol):
    """Source of Shared Access Signature tokens."""

    async def get_token(self, audience: str, ttl: float) -> str:
        """Return a full ``SharedAccessSignature sr=...&sig=...&se=...&skn=...`` string.

        Args:
            audience: the resource URI the token must be valid for
                (:func:`hybridrelay.auth.sas.token_audience`).
            ttl: the lifetime wanted, in seconds (a hint: a provider may return a cached token
                that lives shorter, but not one that is about to expire).
        """
        ...


class SharedAccessKeyTokenProvider:
    """Signs tokens locally with the key of an authorization rule.

    Tokens are cached per audience and re-signed when less than five minutes (or half the
    requested ttl, whichever is shorter) are left.

    Args:
        key_name: the rule's name (``skn``).
        key: the rule's primary or secondary key, used as the UTF-8 bytes of its text.
        clock: seconds since the epoch; injectable for tests.
    """

    def __init__(self, key_name: str, key: str, *, clock: Callable[[], float] = time.time) -> None:
        if not key_name:
            raise TokenError("a key name is required")
        if not key:
            raise TokenError("a key is required")
        self._key_name = key_name
        self._key = key
        self._clock = clock
        self._cache: dict[str, tuple[str, int]] = {}

    @property
    def key_name(self) -> str:
        return self._key_name

    def __repr__(self) -> str:
        return f"SharedAccessKeyTokenProvider(key_name={self._key_name!r})"

    async def get_token(self, audience: str, ttl: float) -> str:
        if ttl <= 0:
            raise TokenError("token ttl must be positive")
        now = self._clock()
        cached = self._cache.get(audience)
        if cached is not None and cached[1] - now >= min(REFRESH_MARGIN, ttl / 2):
            return cached[0]
        expiry = int(now + ttl)
        token = create_token(audience, self._key_name, self._key, expiry=expiry)
        # One entry per audience: a client talks to a handful of entities, so this stays small.
        self._cache[audience] = (token, expiry)
        return token


class SharedAccessSignatureTokenProvider:
    """Hands out one ready-made token (for example from a connection string).

    The token cannot be renewed: a listener using it goes offline when it expires.
    """

    def __init__(self, token: str) -> None:
        parse_token(token)  # fail early (TokenError) on a malformed token
        self._token = token

    def __repr__(self) -> str:
        return "SharedAccessSignatureTokenProvider(<token>)"

    async def get_token(self, audience: str, ttl: float) -> str:
        return self._token


def token_expiry(token: str) -> int | None:
    """The ``se`` (epoch seconds) of a token, or None when it cannot be parsed."""
    try:
        return parse_token(token).expiry
    except TokenError:
        return None


async def fetch_token(
    provider: TokenProvider | None, host: str, entity_path: str, ttl: float
) -> str | None:
    """A token for ``entity_path`` on ``host`` from ``provider`` (None without a provider).

    Bounded by ``TOKEN_TIMEOUT``; whatever the provider raises becomes a hybridrelay error.
    """
    if provider is None:
        return None
    audience = token_audience(host, entity_path)
    try:
        async with asyncio.timeout(TOKEN_TIMEOUT):
            return await provider.get_token(audience, ttl)
    except RelayError:
        raise
    except TimeoutError as exc:
        raise RelayTimeoutError("the token provider did not answer in time") from exc
    except Exception as exc:
        raise TokenError(f"the token provider failed: {type(exc).__name__}") from exc
