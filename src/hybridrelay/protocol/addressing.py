"""URL forms of Hybrid Connections (PROTOCOL.md section 2): building and taking apart.

Pure: no I/O. Query strings are handled as raw text so that everything that is not an
``sb-hc-*=`` parameter reaches the listener byte for byte (PROTOCOL.md 6.2).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from hybridrelay.exceptions import ConfigurationError

__all__ = [
    "HC_PREFIX",
    "ID_PARAM",
    "RENDEZVOUS_PARAM",
    "STATUS_CODE_PARAM",
    "STATUS_DESCRIPTION_PARAM",
    "UNDESCRIBED_REJECTION",
    "AcceptParams",
    "Endpoint",
    "build_relay_url",
    "filter_query",
    "parse_accept_params",
    "parse_endpoint",
    "protocol_params",
    "reject_url",
    "rendezvous_url",
    "resolve_entity",
    "split_rendezvous_address",
    "target_suffix",
]

HC_PREFIX = "/$hc/"
_PROTOCOL_PARAM_PREFIX = "sb-hc-"

#: The connection (or request) id in a rendezvous address (5.2, 6.2).
ID_PARAM = "sb-hc-id"
#: The relay's one-time secret in a rendezvous address: whoever holds the URL may use it.
RENDEZVOUS_PARAM = "sb-hc-rendezvous"
#: Added to a rendezvous address by a listener that rejects the sender (5.4) ...
STATUS_CODE_PARAM = "sb-hc-statusCode"
#: ... with this reason phrase.
STATUS_DESCRIPTION_PARAM = "sb-hc-statusDescription"
#: What the relay tells the sender when a rejecting listener gives no description (the SDK's
#: listener always gives one).
UNDESCRIBED_REJECTION = "Rejected by listener"
#: hybridrelay's extension, beyond Azure (PROTOCOL.md 5.4): on the answer to a sender's
#: refused upgrade, this header with the value ``listener`` says the listener refused it (its
#: status and reason as it sent them), not the relay; clients that do not know it ignore it.
REJECTED_BY_HEADER = "X-Hybridrelay-Rejected-By"
REJECTED_BY_LISTENER = "listener"

_STATUS_CODE = re.compile(r"[1-9][0-9][0-9]")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A relay endpoint: ``base_url`` is ``ws[s]://host[:port]``; ``host`` is ``host[:port]``
    (what an HTTP listener reports as the relay's host); ``secure`` means TLS."""

    base_url: str
    host: str
    secure: bool


def parse_endpoint(endpoint: str) -> Endpoint:
    """Parse ``sb://host[:port]``, ``wss://...`` or ``ws://...`` (``sb`` means ``wss``;
    ``https://`` and ``http://`` are taken too). Credentials in the URL are dropped.

    Raises:
        ConfigurationError: any other scheme, or no host.
    """
    try:
        parts = urlsplit(endpoint.strip())
        hostname = parts.hostname
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigurationError(f"invalid endpoint {endpoint!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("sb", "wss", "ws", "https", "http") or not hostname:
        raise ConfigurationError(
            f"endpoint must look like sb://host[:port], wss://host[:port] or ws://host[:port], "
            f"not {endpoint!r}"
        )
    secure = scheme not in ("ws", "http")
    host = parts.netloc.rpartition("@")[2]
    return Endpoint(base_url=f"{'wss' if secure else 'ws'}://{host}", host=host, secure=secure)


def _is_protocol_param(pair: str) -> bool:
    # Only a parameter with a name starting with "sb-hc-" AND an "=" is the relay's:
    # "?sb-hc-undefined" (no "=") is passed on (PROTOCOL.md 6.2, [dotnet] tests).
    name, sep, _ = pair.partition("=")
    return bool(sep) and name.startswith(_PROTOCOL_PARAM_PREFIX)


def filter_query(raw_query: str) -> str:
    """Remove every ``sb-hc-*=`` parameter from a raw query string; keep the rest verbatim.

    >>> filter_query("custom=value&sb-hc-id=1")
    'custom=value'
    >>> filter_query("a=1&a=2&")
    'a=1&a=2&'
    """
    if _PROTOCOL_PARAM_PREFIX not in raw_query:
        return raw_query
    return "&".join(pair for pair in raw_query.split("&") if not _is_protocol_param(pair))


def protocol_params(raw_query: str) -> dict[str, str]:
    """The ``sb-hc-*`` parameters of a raw query, form-decoded (first occurrence wins)."""
    params: dict[str, str] = {}
    for pair in raw_query.split("&"):
        if not _is_protocol_param(pair):
            continue
        for name, value in parse_qsl(pair, keep_blank_values=True):
            params.setdefault(name, value)
    return params


def resolve_entity(path: str, lookup: Callable[[str], T | None]) -> tuple[T, str] | None:
    """Split a decoded request path into (entity, suffix).

    The entity is the longest prefix of ``path`` at a segment boundary that ``lookup`` knows
    (entity names may contain ``/``; ``lookup`` decides about case). Prefixes are tried longest
    first, one lookup per segment, so the cost does not grow with the number of entities. The
    suffix keeps its leading ``/`` (or is empty). Returns None when no prefix is known.

    >>> resolve_entity("a/b/c", {"a": "A", "a/b": "AB"}.get)
    ('AB', '/c')
    """
    stripped = path.strip("/")
    end = len(stripped)
    while end > 0:
        prefix = stripped[:end]
        if not prefix.endswith("/"):
            found = lookup(prefix)
            if found is not None:
                return found, stripped[end:]
        end = stripped.rfind("/", 0, end)
    return None


def target_suffix(path: str, entity_path: str) -> str:
    """The part of a relayed request's raw path after the hybrid connection's name (6.2).

    A listener gets the sender's path with the entity in front (``/{entity}{suffix}``); the
    name compares case-insensitively, as the relay resolved it. Returns the suffix with its
    leading ``/``, ``""`` for the bare entity, and ``path`` itself if it does not start with
    the name.

    >>> target_suffix("/API/items/1", "api")
    '/items/1'
    """
    prefix = "/" + entity_path.strip("/")
    if path.lower() == prefix.lower():
        return ""
    if path[: len(prefix) + 1].lower() == prefix.lower() + "/":
        return path[len(prefix) :]
    return path


def build_relay_url(
    base_url: str,
    entity_path: str,
    *,
    action: str,
    suffix: str = "",
    app_query: str = "",
    params: dict[str, str] | None = None,
) -> str:
    """``{base_url}/$hc/{entity}{suffix}?{app_query&}sb-hc-action={action}[&params]``.

    ``base_url`` is ``scheme://host[:port]`` with no trailing slash. The entity path is
    URL-encoded segment by segment; the suffix and app query are passed as given (raw).
    """
    path = _quoted_path(entity_path)
    query = [app_query] if app_query else []
    query.append(f"sb-hc-action={action}")
    for name, value in (params or {}).items():
        query.append(f"{name}={_query_value(value)}")
    return f"{base_url.rstrip('/')}{HC_PREFIX}{path}{suffix}?{'&'.join(query)}"


#: Characters ``quote(..., safe="")`` leaves as they are.
_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")


@functools.lru_cache(maxsize=1024)
def _quoted_path(entity_path: str) -> str:
    """An entity path URL-encoded segment by segment: made once per entity (a rendezvous
    address is built for every relayed request), a bounded cache."""
    return "/".join(quote(segment, safe="") for segment in entity_path.strip("/").split("/"))


def rendezvous_url(
    base_url: str,
    entity_path: str,
    *,
    action: str,
    connection_id: str,
    secret: str,
    suffix: str = "",
    app_query: str = "",
) -> str:
    """The rendezvous address the relay hands a listener (5.2, 6.2): :func:`build_relay_url` with
    the connection's id and the one-time secret. The result is a credential: never log it."""
    if not suffix and not app_query:
        # An HTTP request's address (one per relayed request): the same text, from a prefix
        # made once per listener base, entity and action.
        return (
            f"{_rendezvous_prefix(base_url, entity_path, action)}{_query_value(connection_id)}"
            f"&{RENDEZVOUS_PARAM}={_query_value(secret)}"
        )
    return build_relay_url(
        base_url,
        entity_path,
        action=action,
        suffix=suffix,
        app_query=app_query,
        params={ID_PARAM: connection_id, RENDEZVOUS_PARAM: secret},
    )


@functools.lru_cache(maxsize=1024)
def _rendezvous_prefix(base_url: str, entity_path: str, action: str) -> str:
    """:func:`build_relay_url`'s text up to the id's value, for an address without suffix or
    app query (a bounded cache: a few listener bases and entities)."""
    return build_relay_url(base_url, entity_path, action=action, params={ID_PARAM: ""})


def _query_value(value: str) -> str:
    """``value`` as :func:`build_relay_url` writes a parameter's value."""
    return value if _URL_SAFE.fullmatch(value) else quote(value, safe="")


def split_rendezvous_address(address: str, entity_path: str) -> tuple[str, str]:
    """(path suffix, app query) of a rendezvous address ``.../$hc/{entity}{suffix}?{query}``.

    The suffix is raw (as the sender encoded it) with its leading ``/``, or empty; the app
    query is the query without the relay's ``sb-hc-*=`` parameters.

    >>> split_rendezvous_address("wss://r/$hc/a/b/c?x=1&sb-hc-id=7", "a/b")
    ('/c', 'x=1')
    """
    parts = urlsplit(address)
    segments = parts.path.split("/")  # ["", "$hc", *entity segments, *suffix segments]
    entity_segments = len(entity_path.strip("/").split("/"))
    suffix_segments = segments[2 + entity_segments :]
    suffix = "/" + "/".join(suffix_segments) if suffix_segments else ""
    return suffix, filter_query(parts.query)


def reject_url(address: str, status: int, description: str) -> str:
    """The URL a listener opens to reject a sender (5.4): the rendezvous address it was given
    (which already has a query) plus the status and the form-encoded description."""
    return (
        f"{address}&{STATUS_CODE_PARAM}={status}"
        f"&{STATUS_DESCRIPTION_PARAM}={quote(description, safe='')}"
    )


@dataclass(frozen=True, slots=True)
class AcceptParams:
    """What a listener's accept or reject URL says (5.3, 5.4), from its ``sb-hc-*`` params.

    Attributes:
        connection_id: ``sb-hc-id`` (``""`` if absent).
        secret: ``sb-hc-rendezvous`` (``""`` if absent). Never log it.
        rejects: the listener rejects the sender (``sb-hc-statusCode`` is present).
        status_code: the rejection's status, 400-599; None when not rejecting or when the
            parameter is not an error status (``rejects`` tells the two apart): a rejection
            that answered the sender 101 or 2xx would leave it with no connection and no error.
        status_description: the rejection's reason (:data:`UNDESCRIBED_REJECTION` if
            none was given).
    """

    connection_id: str
    secret: str = ""
    rejects: bool = False
    status_code: int | None = None
    status_description: str = UNDESCRIBED_REJECTION

    def __repr__(self) -> str:
        return (
            f"AcceptParams(connection_id={self.connection_id!r}, rejects={self.rejects!r}, "
            f"status_code={self.status_code!r})"
        )


def parse_accept_params(params: Mapping[str, str]) -> AcceptParams:
    """Read an accept or reject URL's parameters (as :func:`protocol_params` returns them).

    A status code is three ASCII digits, 400-599 (a client or server error: 5.4); anything
    else (``101``, ``200``, a sign, spaces, ``4_04``, ``0404``) leaves ``status_code`` None
    while ``rejects`` stays true.
    """
    status = params.get(STATUS_CODE_PARAM)
    code: int | None = None
    if status is not None and _STATUS_CODE.fullmatch(status) and 400 <= int(status) <= 599:
        code = int(status)
    return AcceptParams(
        connection_id=params.get(ID_PARAM, ""),
        secret=params.get(RENDEZVOUS_PARAM, ""),
        rejects=status is not None,
        status_code=code,
        status_description=params.get(STATUS_DESCRIPTION_PARAM) or UNDESCRIBED_REJECTION,
    )
