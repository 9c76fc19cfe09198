"""Rules of relayed HTTP (PROTOCOL.md section 6) that the relay, the SDK and the bridge share.

Pure: no I/O, no clock. Each rule lives here once:

* which headers never cross the relay (:data:`HOP_BY_HOP_HEADERS`, :func:`without_hop_by_hop`);
* how repeated headers fold into the one-value-per-name JSON object of a ``request`` or
  ``response`` message (:func:`merge_repeated_headers`);
* whether the relay sends a request inline on the control channel or announces it for a
  rendezvous (:func:`sends_inline`, :func:`header_json_size`);
* the headers ``responseHeaders`` cannot repeat and hybridrelay's extension that carries them
  (:func:`split_repeated_headers`, :func:`expand_repeated_headers`, PROTOCOL.md 6.4);
* which responses have no body (:func:`response_has_body`);
* the ``X-Forwarded-*`` headers a listener gives its application (:func:`forwarded_headers`);
* a reverse proxy's rewriting of ``Location`` (:func:`rewrite_location`) and, when asked, of a
  cookie's ``Path`` (:func:`rewrite_cookie_path`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence, Set
from urllib.parse import urlsplit

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "INLINE_BODY_LIMIT",
    "INLINE_HEADER_LIMIT",
    "UNJOINABLE_HEADERS",
    "expand_repeated_headers",
    "forwarded_headers",
    "header_json_size",
    "merge_repeated_headers",
    "response_has_body",
    "rewrite_cookie_path",
    "rewrite_location",
    "sends_inline",
    "split_repeated_headers",
    "without_hop_by_hop",
]

#: Bodies up to this size (known in advance) travel inline on the control channel (6.2).
INLINE_BODY_LIMIT = 64 * 1024
#: Request header metadata (the ``requestHeaders`` JSON) up to this size travels inline (6.2).
INLINE_HEADER_LIMIT = 32 * 1024

#: Lower-case names of the headers that belong to one connection and are never relayed in
#: either direction (6.2, 6.5): RFC 9110 7.6.1's connection options, plus ``Content-Length``
#: and ``Host``, because every hop of the relay frames the body itself (a WebSocket message)
#: and names its own host, and ``Close``, which Azure's relay lists with them (6.2).
HOP_BY_HOP_HEADERS = frozenset(
    {
        "close",
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_EMPTY: frozenset[str] = frozenset()


def without_hop_by_hop(
    headers: Iterable[tuple[str, str]],
    *,
    also: Set[str] = _EMPTY,
    keep: Set[str] = _EMPTY,
) -> list[tuple[str, str]]:
    """The headers that may be relayed: ``headers`` minus :data:`HOP_BY_HOP_HEADERS` and
    minus every name a ``Connection`` header lists (RFC 9110 7.6.1), order kept.

    Args:
        headers: (name, value) pairs, names in any case.
        also: further lower-case names this caller drops (its own credentials, say).
        keep: lower-case names of :data:`HOP_BY_HOP_HEADERS` this caller passes on (the relay
            reads a listener's ``Content-Length`` for a HEAD response); a ``Connection``
            header that lists one still drops it.
    """
    pairs = headers if isinstance(headers, (list, tuple)) else list(headers)
    dropped: Set[str] = HOP_BY_HOP_HEADERS
    if keep:
        dropped = dropped - keep
    if also:
        dropped = dropped | also
    listed: set[str] | None = None
    for name, value in pairs:
        if name.lower() == "connection":
            if listed is None:
                listed = set()
            listed.update(token.strip().lower() for token in value.split(","))
    if listed:
        listed.discard("")
        dropped = dropped | listed
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


def merge_repeated_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Fold (name, value) pairs into one value per name, as ``requestHeaders`` and
    ``responseHeaders`` need (a JSON object, 6.2, 6.4).

    Names compare case-insensitively and keep the spelling of their first occurrence; repeated
    values are joined with ``", "`` (RFC 9110 5.3), except ``Set-Cookie``, which cannot be
    joined (its dates hold commas) and keeps only its first value, as hyco-https does.
    """
    merged: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        first = spelling.get(key)
        if first is None:
            spelling[key] = name
            merged[name] = value
        elif key != "set-cookie":
            merged[first] += ", " + value
    return merged


def sends_inline(*, chunked: bool, content_length: int | None, header_bytes: int) -> bool:
    """Whether the relay sends a request inline on the control channel (6.2) rather than
    announcing it address-only for the listener to fetch over a rendezvous (6.3).

    Inline means: the body's length is known in advance (not chunked) and at most
    :data:`INLINE_BODY_LIMIT` (no ``Content-Length`` counts as no body), and the JSON of the
    request headers takes at most :data:`INLINE_HEADER_LIMIT` bytes.
    """
    return (
        not chunked
        and (content_length or 0) <= INLINE_BODY_LIMIT
        and header_bytes <= INLINE_HEADER_LIMIT
    )


def header_json_size(headers: Mapping[str, str]) -> int:
    """What :func:`sends_inline` compares with :data:`INLINE_HEADER_LIMIT` for ``headers``:
    the size in bytes of their compact JSON object, exact whenever it is above the limit.

    Below it the answer may be an upper bound instead (each character counted as its longest
    JSON form, a 12-byte surrogate pair escape), which decides the same and spares the relay a
    ``json.dumps`` per request for the common small head.
    """
    bound = 2 + sum(12 * (len(name) + len(value)) + 6 for name, value in headers.items())
    if bound <= INLINE_HEADER_LIMIT:
        return bound
    return len(json.dumps(headers, separators=(",", ":")).encode("utf-8"))


#: Lower-case names of response headers whose repeats cannot be joined with ", " (a cookie's
#: date holds a comma; challenges have commas of their own): :func:`split_repeated_headers`
#: carries them in hybridrelay's ``repeatedResponseHeaders`` extension.
UNJOINABLE_HEADERS = frozenset({"set-cookie", "www-authenticate"})


def split_repeated_headers(
    headers: Iterable[tuple[str, str]],
) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """A response's headers as ``responseHeaders`` plus hybridrelay's extension (6.4).

    The first part is :func:`merge_repeated_headers` (what Azure and Microsoft's clients
    read: one value per name, the first ``Set-Cookie`` only). The second holds, in order,
    every value of each :data:`UNJOINABLE_HEADERS` name that occurs more than once; it is
    empty when there is none (the message is then exactly Azure's).
    """
    pairs = list(headers)
    counts: dict[str, int] = {}
    for name, _ in pairs:
        key = name.lower()
        if key in UNJOINABLE_HEADERS:
            counts[key] = counts.get(key, 0) + 1
    repeated = tuple((name, value) for name, value in pairs if counts.get(name.lower(), 0) > 1)
    return merge_repeated_headers(pairs), repeated


def expand_repeated_headers(
    headers: Mapping[str, str], repeated: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The (name, value) pairs a ``response`` stands for: ``headers`` with every name that
    ``repeated`` (the extension) holds replaced by all of its values there, in their order,
    where the name first was. Names compare case-insensitively."""
    if not repeated:
        return list(headers.items())
    by_name: dict[str, list[tuple[str, str]]] = {}
    for name, value in repeated:
        by_name.setdefault(name.lower(), []).append((name, value))
    out: list[tuple[str, str]] = []
    expanded: set[str] = set()
    for name, value in headers.items():
        key = name.lower()
        if key in expanded:
            continue  # a second spelling of a name already expanded from the extension
        values = by_name.pop(key, None)
        if values is None:
            out.append((name, value))
        else:
            out.extend(values)
            expanded.add(key)
    for values in by_name.values():  # names only the extension has
        out.extend(values)
    return out


def response_has_body(method: str, status: int) -> bool:
    """Whether a response to ``method`` with ``status`` carries a body (RFC 9110 6.4.1):
    never for HEAD, 1xx, 204 or 304."""
    return method.upper() != "HEAD" and status >= 200 and status not in (204, 304)


def forwarded_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client: str | None,
    proto: str,
    host: str,
    prefix: str,
) -> list[tuple[str, str]]:
    """``headers`` as a listener hands them to its application (as nginx's
    ``$proxy_add_x_forwarded_for`` and friends): ``X-Forwarded-For`` appended to with
    ``client``; ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and ``X-Forwarded-Prefix`` (the
    hybrid connection's path, ``/name``) set from what the listener knows, replacing
    whatever the sender claimed."""
    chain: list[str] = []
    out: list[tuple[str, str]] = []
    for name, value in headers:
        key = name.lower()
        if key == "x-forwarded-for":
            chain.extend(part.strip() for part in value.split(",") if part.strip())
        elif key not in _FORWARDED_SET:
            out.append((name, value))
    if client:
        chain.append(client)
    if chain:
        out.append(("X-Forwarded-For", ", ".join(chain)))
    out.append(("X-Forwarded-Proto", proto))
    out.append(("X-Forwarded-Host", host))
    out.append(("X-Forwarded-Prefix", prefix))
    return out


_FORWARDED_SET = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix"})


def rewrite_location(value: str, *, upstream: str, public: str, public_path: str) -> str:
    """A reverse proxy's ``Location``/``Content-Location`` rewrite (nginx's
    ``proxy_redirect default``).

    Args:
        value: the upstream's header value.
        upstream: the upstream base URL requests are forwarded to (``http://host:port`` or
            with a base path, ``http://host:port/base``), no trailing slash.
        public: the public base URL that maps onto it (``https://relay/name``), no trailing
            slash.
        public_path: the path of ``public`` (``/name``).

    An absolute URL under ``upstream`` becomes the same place under ``public``; a path-absolute
    reference (``/x``, the upstream's root) under the upstream's base path becomes the same
    place under ``public_path``. Anything else (another site, a relative reference, a
    network-path ``//host/x``) is left as it is.
    """
    base_path = urlsplit(upstream).path.rstrip("/")
    if value.startswith("/") and not value.startswith("//"):
        if not base_path:
            return public_path + value
        if value == base_path or value.startswith((base_path + "/", base_path + "?")):
            return public_path + value[len(base_path) :]
        return value
    try:
        parts = urlsplit(value)
        origin = urlsplit(upstream)
        same = (
            parts.scheme.lower() == origin.scheme.lower()
            and parts.hostname is not None
            and parts.hostname.lower() == (origin.hostname or "").lower()
            and _port(parts.scheme, parts.port) == _port(origin.scheme, origin.port)
        )
    except ValueError:  # a malformed port: not ours to touch
        return value
    if not same:
        return value
    rest = value[len(parts.scheme) + 3 + len(parts.netloc) :]
    if base_path:
        if not (rest == base_path or rest.startswith((base_path + "/", base_path + "?"))):
            return value
        rest = rest[len(base_path) :]
    return public + rest


def _port(scheme: str, port: int | None) -> int:
    if port is not None:
        return port
    return 443 if scheme.lower() == "https" else 80


def rewrite_cookie_path(value: str, *, prefix: str) -> str:
    """A ``Set-Cookie`` value with its ``Path`` attribute put under ``prefix`` (``/name``):
    ``Path=/x`` becomes ``Path=/name/x`` and ``Path=/`` becomes ``Path=/name``; a cookie
    without a Path is left as it is (the browser defaults it from the request's public
    path)."""
    pieces = value.split(";")
    for index, piece in enumerate(pieces[1:], start=1):
        name, sep, path = piece.partition("=")
        if sep and name.strip().lower() == "path":
            path = path.strip()
            if path.startswith("/"):
                lead = piece[: len(piece) - len(piece.lstrip())]
                pieces[index] = f"{lead}Path={prefix}{'' if path == '/' else path}"
    return ";".join(pieces)
