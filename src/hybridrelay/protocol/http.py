"""Rules of relayed HTTP (PROTOCOL.md section 6) that the relay, the SDK and the bridge share.

Pure: no I/O, no clock. Each rule lives here once:

* which headers never cross the relay (:data:`HOP_BY_HOP_HEADERS`, :func:`without_hop_by_hop`);
* how repeated headers fold into the one-value-per-name JSON object of a ``request`` or
  ``response`` message (:func:`merge_repeated_headers`);
* whether the relay sends a request inline on the control channel or announces it for a
  rendezvous (:func:`sends_inline`).
"""

from __future__ import annotations

from collections.abc import Iterable, Set

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "INLINE_BODY_LIMIT",
    "INLINE_HEADER_LIMIT",
    "merge_repeated_headers",
    "sends_inline",
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
    pairs = headers if isinstance(headers, list | tuple) else list(headers)
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
