"""Shared Access Signature tokens: create, parse, verify (PROTOCOL.md section 3).

Pure functions: no I/O and no clock. Callers pass ``now`` (seconds since the epoch) so that
expiry checks are deterministic in tests.

The subtle part (PROTOCOL.md 3.2): the string to sign is the ``sr`` field *exactly as it appears
in the token*, still URL-encoded, a newline, and ``se`` as it appears. Signers differ in how they
encode (upper- or lower-case hex), so a verifier must never decode and re-encode ``sr``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from hybridrelay.exceptions import TokenError

__all__ = [
    "TOKEN_PREFIX",
    "AuthDecision",
    "AuthorizationRule",
    "Rights",
    "SasToken",
    "Verifier",
    "VerifiedToken",
    "audience_scope",
    "authorize",
    "create_token",
    "normalize_path",
    "parse_token",
    "path_covers",
    "request_path",
    "token_audience",
    "verify_token",
]

TOKEN_PREFIX = "SharedAccessSignature "


class Rights(enum.Flag):
    """The rights an authorization rule grants."""

    NONE = 0
    LISTEN = enum.auto()
    SEND = enum.auto()
    MANAGE = enum.auto()

    @classmethod
    def parse(cls, names: Iterable[str]) -> Rights:
        """Parse ``["Listen", "Send", "Manage"]`` (case-insensitive); unknown names are errors."""
        rights = cls.NONE
        for name in names:
            member = _RIGHT_NAMES.get(str(name).strip().lower())
            if member is None:
                raise ValueError(f"unknown right {name!r} (expected Listen, Send or Manage)")
            rights |= member
        return rights

    def effective(self) -> Rights:
        """Manage implies Listen and Send (Azure refuses a Manage rule without them)."""
        if Rights.MANAGE in self:
            return self | Rights.LISTEN | Rights.SEND
        return self

    def names(self) -> list[str]:
        return [name.capitalize() for name, member in _RIGHT_NAMES.items() if member in self]


_RIGHT_NAMES = {"listen": Rights.LISTEN, "send": Rights.SEND, "manage": Rights.MANAGE}


@dataclass(frozen=True)
class AuthorizationRule:
    """A named SAS rule: a key pair and the rights that tokens signed with it carry.

    The keys are used as the UTF-8 bytes of their text (not base64-decoded), as every Microsoft
    client does. They never appear in ``repr``.
    """

    name: str
    primary_key: str = field(repr=False)
    secondary_key: str | None = field(default=None, repr=False)
    rights: Rights = Rights.NONE

    def keys(self) -> list[str]:
        return [k for k in (self.primary_key, self.secondary_key) if k]


@dataclass(frozen=True)
class SasToken:
    """A parsed token. ``raw_sr``/``raw_se`` are kept exactly as they were signed."""

    raw_sr: str
    raw_se: str
    signature: bytes = field(repr=False)
    key_name: str
    expiry: int

    @property
    def audience(self) -> str:
        """The decoded resource URI the token is scoped to."""
        return unquote(self.raw_sr)


def _sign(key: str, string_to_sign: str) -> bytes:
    return hmac.new(key.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha256).digest()


def create_token(resource_uri: str, key_name: str, key: str, *, expiry: int) -> str:
    """Create a token for ``resource_uri`` that expires at ``expiry`` (epoch seconds).

    The URI is URL-encoded once with upper-case hex (like Node's ``encodeURIComponent``) and that
    text is what gets signed.
    """
    if not key_name:
        raise TokenError("a key name is required to create a SAS token")
    if not key:
        raise TokenError("a key is required to create a SAS token")
    sr = quote(resource_uri, safe="")
    se = str(int(expiry))
    sig = base64.b64encode(_sign(key, f"{sr}\n{se}")).decode("ascii")
    return f"{TOKEN_PREFIX}sr={sr}&sig={quote(sig, safe='')}&se={se}&skn={quote(key_name, safe='')}"


def token_audience(host: str, entity_path: str = "") -> str:
    """The resource URI our SDK signs, the form .NET uses: ``http://{host}/{entity}/``.

    The port is dropped (every form of section 3.2 is accepted by Azure and by our relay).
    """
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    path = entity_path.strip("/")
    return f"http://{hostname}/{path}/" if path else f"http://{hostname}/"


def parse_token(token: str) -> SasToken:
    """Parse a token string; raise :class:`TokenError` if it is not well formed."""
    if len(token) > 4096:
        raise TokenError("SAS token is too long")
    if token[: len(TOKEN_PREFIX)].lower() != TOKEN_PREFIX.lower():
        raise TokenError("SAS token must start with 'SharedAccessSignature '")
    fields: dict[str, str] = {}
    for item in token[len(TOKEN_PREFIX) :].split("&"):
        name, sep, value = item.partition("=")
        if not sep:
            continue
        fields.setdefault(name.strip().lower(), value.strip())
    missing = [name for name in ("sr", "sig", "se", "skn") if not fields.get(name)]
    if missing:
        raise TokenError(f"SAS token lacks field(s) {', '.join(missing)}")
    raw_se = fields["se"]
    try:
        expiry = int(raw_se)
    except ValueError:
        raise TokenError("SAS token expiry 'se' is not an integer") from None
    if not -(2**63) <= expiry < 2**63:
        raise TokenError("SAS token expiry 'se' is out of range")
    try:
        signature = base64.b64decode(unquote(fields["sig"]), validate=True)
    except (binascii.Error, ValueError):
        raise TokenError("SAS token signature 'sig' is not base64") from None
    return SasToken(
        raw_sr=fields["sr"],
        raw_se=raw_se,
        signature=signature,
        key_name=unquote(fields["skn"]),
        expiry=expiry,
    )


@dataclass(frozen=True)
class AuthDecision:
    """The outcome of :func:`authorize`: ``status`` 200 means allowed, else 401 or 403."""

    status: int
    reason: str
    rule_name: str | None = None
    expiry: int | None = None

    @property
    def allowed(self) -> bool:
        return self.status == 200


def normalize_path(path: str) -> str:
    """The canonical form of a *decoded* URL path, for scope checks (PROTOCOL.md 3.5).

    Segments are split on ``/``; empty segments (repeated, leading and trailing slashes) and
    ``.`` are dropped; ``..`` removes the segment before it and never climbs above the root
    (RFC 3986 5.2.4); the result is lower-cased (entity paths are case-insensitive).

    >>> normalize_path("/Plant//line-1/./plc/../")
    'plant/line-1'
    """
    segments: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment.lower())
    return "/".join(segments)


def request_path(entity_path: str, suffix: str = "") -> str:
    """The path a request asks for: the entity's, then the request's suffix (the part after the
    entity in ``/$hc/{entity}{suffix}`` or ``/{entity}{suffix}``), both normalised.

    The suffix is normalised on its own, so its ``..`` segments stop at the entity: a request
    never names a path outside the entity it was routed to.
    """
    entity = normalize_path(entity_path)
    below = normalize_path(suffix)
    if not below:
        return entity
    return f"{entity}/{below}" if entity else below


def path_covers(token_path: str, requested: str) -> bool:
    """Whether a token scoped to ``token_path`` covers a request for ``requested``.

    Both are normalised first. The token's path must be a segment-wise prefix of the request's
    path: a namespace token (empty path) covers everything, an entity's token covers the entity
    and every path below it, and a token for a path *below* the request never covers it (its
    bearer does not hold the key that signed it, and must not reach the parent).

    >>> path_covers("plant", "plant/line-1/plc"), path_covers("plant/line-1", "plant")
    (True, False)
    """
    return _segments(requested)[: len(token_segments := _segments(token_path))] == token_segments


def _segments(path: str) -> list[str]:
    normal = normalize_path(path)
    return normal.split("/") if normal else []


def audience_scope(audience: str) -> tuple[str, str]:
    """(lower-case host, normalised path) of a token's decoded audience URI.

    The path is percent-decoded once more (an audience is a URI: ``%2F`` inside it is a
    slash), normalised, and a leading ``$hc`` segment is dropped (some signers keep it).
    """
    parts = urlsplit(audience)
    host = (parts.hostname or "").lower()
    path = normalize_path(unquote(parts.path))
    if path == "$hc" or path.startswith("$hc/"):
        path = path[4:]
    return host, path


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature checked out against ``rule``: what the scope check needs.

    Verifying is the costly part (a parse and an HMAC per candidate key) and depends only on
    the token text and the rules, so :class:`hybridrelay.auth.cache.AuthCache` keeps these;
    :func:`authorize` decides the rest on every request.
    """

    rule: AuthorizationRule
    expiry: int
    host: str
    path: str


def verify_token(
    token: str | None, rules: Sequence[AuthorizationRule]
) -> VerifiedToken | AuthDecision:
    """Check a token's form and signature against ``rules``: a :class:`VerifiedToken`, or the
    401 :class:`AuthDecision` that refuses it. Expiry and scope are :func:`authorize`'s."""
    if not token:
        return AuthDecision(401, "Unauthorized: no SAS token was provided")
    try:
        parsed = parse_token(token)
    except TokenError as exc:
        return AuthDecision(401, f"Unauthorized: {exc}")
    candidates = [rule for rule in rules if rule.name == parsed.key_name]
    if not candidates:
        return AuthDecision(401, "Unauthorized: unknown SAS key name")
    string_to_sign = f"{parsed.raw_sr}\n{parsed.raw_se}"
    matched: AuthorizationRule | None = None
    for rule in candidates:
        # Compare against every key without short-circuit so timing does not reveal which key.
        ok = False
        for key in rule.keys():
            ok |= hmac.compare_digest(_sign(key, string_to_sign), parsed.signature)
        if ok and matched is None:
            matched = rule
    if matched is None:
        return AuthDecision(401, "Unauthorized: invalid SAS signature")
    host, path = audience_scope(parsed.audience)
    return VerifiedToken(matched, parsed.expiry, host, path)


#: What :func:`authorize` checks a token's signature with: :func:`verify_token`, or a cache
#: of its results (:meth:`hybridrelay.auth.cache.AuthCache.verify`).
Verifier = Callable[[str | None, Sequence[AuthorizationRule]], "VerifiedToken | AuthDecision"]


def authorize(
    token: str | None,
    *,
    rules: Sequence[AuthorizationRule],
    entity_path: str,
    required: Rights,
    now: float,
    suffix: str = "",
    namespace_host: str | None = None,
    audience_hosts: Collection[str] = (),
    grace_seconds: float = 0.0,
    verify: Verifier = verify_token,
) -> AuthDecision:
    """Decide whether ``token`` grants ``required`` on ``entity_path`` + ``suffix``.

    Args:
        token: the token text after transport decoding, or None when the request had none.
        rules: the rules that apply to the entity: its own and the namespace-wide ones.
        entity_path: the hybrid connection's path.
        required: the right needed (``Rights.LISTEN`` or ``Rights.SEND``; ``NONE`` for any).
        now: current time in epoch seconds.
        suffix: the request's path below the entity (decoded), empty for listeners; the token
            must cover the whole request path (:func:`path_covers`).
        namespace_host: when given, the token's audience host must match it.
        audience_hosts: else, when not empty, the (lower-case) hosts it may name: the ones
            the relay is reached by.
        grace_seconds: accept tokens that expired at most this long ago (renewal races).
        verify: the signature check; only its outcome is cached, so expiry, audience host,
            scope and rights are decided on every call.

    Returns:
        An :class:`AuthDecision` with status 200, 401 or 403 and a reason that never contains
        the token or a key.
    """
    verified = verify(token, rules)
    if isinstance(verified, AuthDecision):
        return verified
    if verified.expiry + grace_seconds < now:
        return AuthDecision(401, "Unauthorized: SAS token has expired")
    if verified.host and (
        verified.host != namespace_host.lower()
        if namespace_host is not None
        else bool(audience_hosts) and verified.host not in audience_hosts
    ):
        return AuthDecision(403, "Forbidden: token audience is another namespace")
    if not path_covers(verified.path, request_path(entity_path, suffix)):
        return AuthDecision(403, "Forbidden: token is not valid for this hybrid connection")
    if required and required not in verified.rule.rights.effective():
        return AuthDecision(403, f"Forbidden: rule lacks the {'/'.join(required.names())} right")
    return AuthDecision(200, "OK", rule_name=verified.rule.name, expiry=verified.expiry)
