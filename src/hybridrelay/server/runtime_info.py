"""Runtime information of a hybrid connection (PROTOCOL.md 2, E7 and 8.2).

``GET /{path}?api-version=2016-07`` with ``X-PROCESS-AT: ServiceBus`` and a SAS token for the
entity (any right) is what .NET's ``HybridConnectionClient.GetRuntimeInformationAsync`` and
``HybridConnectionListener.GetRuntimeInformationAsync`` send. The URL is also a valid HTTP
relaying target, so it is taken as a management request only when both markers are present.

The answer is an Atom entry holding a ``HybridConnectionDescription`` with the elements in
DataContract order; an unknown path gets an empty Atom feed, which the .NET client maps to
"endpoint not found", as Azure does. ``CreatedAt``/``UpdatedAt`` of entities from the
configuration file are the time the relay loaded it (the file has no such field).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from urllib.parse import unquote
from xml.sax.saxutils import escape

from aiohttp import web

from hybridrelay.auth.sas import Rights
from hybridrelay.server.access import AUTH_HEADER
from hybridrelay.server.config import HybridConnectionConfig
from hybridrelay.server.context import RelayContext
from hybridrelay.server.responses import reason_phrase, tracking_id

__all__ = [
    "error_xml",
    "is_runtime_info",
    "is_runtime_info_request",
    "runtime_info",
    "runtime_info_response",
]

_ATOM = "http://www.w3.org/2005/Atom"
_SB = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"


def is_runtime_info_request(request: web.BaseRequest, raw_query: str) -> bool:
    return is_runtime_info(request.method, raw_query, request.headers)


def is_runtime_info(method: str, raw_query: str, headers: Mapping[str, str]) -> bool:
    """Whether a request (not under ``/$hc/``) asks for an entity's runtime information
    rather than being relayed (PROTOCOL.md 8.2)."""
    return (
        method == "GET"
        and "api-version=" in raw_query
        and headers.get("X-PROCESS-AT", "").lower() == "servicebus"
    )


async def runtime_info(
    request: web.BaseRequest,
    raw_path: str,
    relay: RelayContext,
    *,
    secure: bool,
    loaded_at: datetime.datetime,
) -> web.Response:
    """The answer to a runtime-information request for ``raw_path``; entities from the
    configuration report ``loaded_at`` as their creation and update time."""
    try:
        path = unquote(raw_path.lstrip("/"), errors="strict").strip("/")
    except UnicodeDecodeError:
        path = ""
    entity = relay.store.get(path)
    track = tracking_id()
    # Any right on the entity will do; for an unknown path the namespace's rules decide,
    # so that existence is not revealed to a caller without a valid token.
    subject = entity or HybridConnectionConfig(name=path or "-")
    token = request.headers.get("Authorization") or request.headers.get(AUTH_HEADER)
    decision = relay.access.authorize(token, subject, Rights.NONE, host=request.host)
    if not decision.allowed:
        return error_xml(decision.status, f"{decision.reason} TrackingId:{track}")
    url = f"{'https' if secure else 'http'}://{request.host}/{path}"
    if entity is None:
        return runtime_info_response(url=url, path=None, created_at=loaded_at)
    return runtime_info_response(
        url=url,
        path=entity.name,
        requires_client_authorization=entity.requires_client_authorization,
        user_metadata=entity.user_metadata,
        listener_count=(await relay.broker.listener_totals([entity.name]))[entity.name],
        created_at=loaded_at,
    )


def _timestamp(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def runtime_info_response(
    *,
    url: str,
    path: str | None,
    requires_client_authorization: bool = True,
    user_metadata: str = "",
    listener_count: int = 0,
    created_at: datetime.datetime,
) -> web.Response:
    """The Atom document for ``path``; ``path is None`` means the entity does not exist."""
    now = _timestamp(datetime.datetime.now(datetime.UTC))
    if path is None:
        body = (
            f'<feed xmlns="{_ATOM}"><title type="text">Publicly Listed Services</title>'
            f'<subtitle type="text">This is the list of publicly-listed services currently '
            f"available.</subtitle><id>{escape(url)}</id><updated>{now}</updated></feed>"
        )
    else:
        created = _timestamp(created_at)
        description = (
            f'<HybridConnectionDescription xmlns="{_SB}" '
            'xmlns:i="http://www.w3.org/2001/XMLSchema-instance">'
            f"<CreatedAt>{created}</CreatedAt><UpdatedAt>{created}</UpdatedAt>"
            "<RequiresClientAuthorization>"
            f"{'true' if requires_client_authorization else 'false'}"
            "</RequiresClientAuthorization>"
            f"<UserMetadata>{escape(user_metadata)}</UserMetadata>"
            f"<ListenerCount>{listener_count}</ListenerCount>"
            "</HybridConnectionDescription>"
        )
        body = (
            f'<entry xmlns="{_ATOM}"><id>{escape(url)}</id>'
            f'<title type="text">{escape(path)}</title><updated>{now}</updated>'
            f'<link rel="self" href="{escape(url)}"/>'
            f'<content type="application/xml">{description}</content></entry>'
        )
    return web.Response(
        status=200, body=body.encode("utf-8"), content_type="application/atom+xml", charset="utf-8"
    )


def error_xml(status: int, detail: str) -> web.Response:
    """A management error as .NET parses it: ``<Error><Code/><Detail/></Error>``."""
    body = f"<Error><Code>{status}</Code><Detail>{escape(detail)}</Detail></Error>"
    return web.Response(
        status=status,
        reason=reason_phrase(detail) or None,
        body=body.encode("utf-8"),
        content_type="application/xml",
        charset="utf-8",
    )
