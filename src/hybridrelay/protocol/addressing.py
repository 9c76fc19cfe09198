"""URL forms of Hybrid Connections (PROTOCOL.md section 2): building and taking apart.

Pure: no I/O. Query strings are handled as raw text so that everything that is not an
``sb-hc-*=`` parameter reaches the listener byte for byte (PROTOCOL.md 6.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl, quote

__all__ = [
    "HC_PREFIX",
    "build_relay_url",
    "filter_query",
    "protocol_params",
    "resolve_entity",
]

HC_PREFIX = "/$hc/"
_PROTOCOL_PARAM_PREFIX = "sb-hc-"

T = TypeVar("T")


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
    path = "/".join(quote(segment, safe="") for segment in entity_path.strip("/").split("/"))
    query = [app_query] if app_query else []
    query.append(f"sb-hc-action={action}")
    for name, value in (params or {}).items():
        query.append(f"{name}={quote(value, safe='')}")
    return f"{base_url.rstrip('/')}{HC_PREFIX}{path}{suffix}?{'&'.join(query)}"
