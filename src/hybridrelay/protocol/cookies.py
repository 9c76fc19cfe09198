"""The relay's token cookie (PROTOCOL.md 3.4, 6.9): how a browser, which cannot set headers on
a WebSocket or an ``EventSource``, carries a SAS token to ``/{hc}/{path}``.

The cookie is ``sb-hc-token=<token, percent-encoded>`` (JavaScript's ``encodeURIComponent``;
a SAS token has spaces, ``=`` and ``&``, which a cookie value cannot hold as they are). It is
the relay's, like the ``sb-hc-*`` query parameters: the relay removes it from the ``Cookie``
header before the request reaches the listener. Pure: no I/O.
"""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["TOKEN_COOKIE", "cookie_value", "without_cookie"]

TOKEN_COOKIE = "sb-hc-token"


def _pairs(header: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a ``Cookie`` header (RFC 6265 5.4), names and values stripped;
    a piece without ``=`` is a name with an empty value."""
    pairs: list[tuple[str, str]] = []
    for piece in header.split(";"):
        name, _, value = piece.partition("=")
        name = name.strip()
        if name:
            pairs.append((name, value.strip()))
    return pairs


def cookie_value(header: str | None, name: str = TOKEN_COOKIE) -> str | None:
    """The percent-decoded value of the first cookie called ``name`` (exactly, case kept, as
    browsers send it), surrounding double quotes removed; None when there is none or it is
    empty.

    >>> cookie_value('a=1; sb-hc-token=SharedAccessSignature%20sr%3Dx; b=2')
    'SharedAccessSignature sr=x'
    """
    if not header:
        return None
    for key, value in _pairs(header):
        if key == name:
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            decoded = unquote(value)
            return decoded or None
    return None


def without_cookie(header: str, name: str = TOKEN_COOKIE) -> str:
    """``header`` without any cookie called ``name``, the others kept in order (``""`` when
    none is left: the caller then drops the header).

    >>> without_cookie('a=1; sb-hc-token=x; b=2')
    'a=1; b=2'
    """
    kept = [piece.strip() for piece in header.split(";")]
    return "; ".join(piece for piece in kept if piece and piece.partition("=")[0].strip() != name)
