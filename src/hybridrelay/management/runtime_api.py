"""Runtime information beyond ARM, under ``/runtime``: live listeners and relayed connections,
and closing them (docs/MANAGEMENT.md, "Runtime").

The relay answers through a :class:`RuntimeView` (``server/runtime_view.py``); this module only
routes, authorizes (the same Manage token as the ARM routes) and writes JSON. The routes are in
the management listener's OpenAPI document (:func:`runtime_paths`).

| route | what |
|---|---|
| ``GET /runtime/listeners[?hybridConnection=NAME]`` | listeners online |
| ``DELETE /runtime/listeners?hybridConnection=NAME`` | close every listener of NAME |
| ``DELETE /runtime/listeners/{listenerId}`` | close one (404 if unknown) |
| ``GET /runtime/connections[?hybridConnection=NAME]`` | relayed connections open now |
| ``DELETE /runtime/connections?hybridConnection=NAME`` | close every connection of NAME |
| ``DELETE /runtime/connections/{trackingId}`` | close one (404 if unknown) |
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from hybridrelay.protocol.arm import ArmError

__all__ = ["ConnectionInfo", "ListenerInfo", "RuntimeApi", "RuntimeView", "runtime_paths"]

PREFIX = "/runtime"
#: The longest hybrid connection name or id a query or path may carry.
_MAX_NAME = 260


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    """A listener's control channel."""

    listener_id: str
    hybrid_connection: str
    remote_address: str
    connected_at: float
    #: Epoch seconds when its token expires (a renewToken moves it).
    token_expires_at: float

    def body(self) -> dict[str, Any]:
        return {
            "id": self.listener_id,
            "hybridConnection": self.hybrid_connection,
            "remoteAddress": self.remote_address,
            "connectedAt": _iso(self.connected_at),
            "tokenExpiresAt": _iso(self.token_expires_at),
        }


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A relayed connection: a sender spliced to a listener's rendezvous."""

    tracking_id: str
    hybrid_connection: str
    kind: str
    sender_address: str | None
    listener_address: str | None
    since: float
    bytes_to_listener: int
    bytes_to_sender: int

    def body(self) -> dict[str, Any]:
        return {
            "trackingId": self.tracking_id,
            "hybridConnection": self.hybrid_connection,
            "kind": self.kind,
            "senderAddress": self.sender_address,
            "listenerAddress": self.listener_address,
            "since": _iso(self.since),
            "bytesToListener": self.bytes_to_listener,
            "bytesToSender": self.bytes_to_sender,
        }


class RuntimeView(Protocol):
    """What the relay answers about its live state."""

    def listeners(self, hybrid_connection: str | None = None) -> Sequence[ListenerInfo]: ...

    def connections(self, hybrid_connection: str | None = None) -> Sequence[ConnectionInfo]: ...

    async def close_listeners(
        self, *, listener_id: str | None = None, hybrid_connection: str | None = None
    ) -> int:
        """Close the listeners with that id or of that hybrid connection; how many."""
        ...

    def close_connections(
        self, *, tracking_id: str | None = None, hybrid_connection: str | None = None
    ) -> int:
        """Close the relayed connections with that id or of that hybrid connection."""
        ...


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


Authorize = Callable[[web.Request], None]


@dataclass
class RuntimeApi:
    """The ``/runtime`` routes over ``view``; ``authorize`` raises :class:`ArmError` (401/403)
    unless the request carries a Manage token (the ARM routes' check)."""

    view: RuntimeView
    authorize: Authorize

    def routes(self) -> list[web.AbstractRouteDef]:
        return [
            web.route("*", PREFIX + r"/{tail:[\s\S]*}", self.handle),
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self.authorize(request)
            return await self._route(request)
        except ArmError as exc:
            response = _json(exc.status, exc.body())
            response.headers.update(exc.headers)
            return response

    async def _route(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        collection, _, item = tail.partition("/")
        if collection not in ("listeners", "connections") or "/" in item:
            raise ArmError(404, "NotFound", "No such runtime route.")
        if len(item) > _MAX_NAME:
            raise ArmError(404, "NotFound", "No such listener or connection.")
        methods = ("DELETE",) if item else ("GET", "DELETE")
        if request.method not in methods:
            refusal = ArmError(405, "MethodNotAllowed", f"{request.method} is not allowed here.")
            refusal.headers["Allow"] = ", ".join(methods)
            raise refusal
        name = request.query.get("hybridConnection")
        if name is not None and not 0 < len(name) <= _MAX_NAME:
            raise ArmError(400, "BadRequest", "hybridConnection must be 1 to 260 characters.")
        listeners = collection == "listeners"
        if request.method == "GET":
            infos = self.view.listeners(name) if listeners else self.view.connections(name)
            return _json(200, {"value": [info.body() for info in infos]})
        if not item and name is None:
            raise ArmError(400, "BadRequest", "Name one (…/{id}) or give ?hybridConnection=NAME.")
        if listeners:
            closed = await self.view.close_listeners(
                listener_id=item or None, hybrid_connection=name
            )
        else:
            closed = self.view.close_connections(tracking_id=item or None, hybrid_connection=name)
        if item and not closed:
            raise ArmError(404, "NotFound", "No such listener or connection.")
        return _json(200, {"closed": closed})


def _runtime_operation(
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    schema: dict[str, Any],
) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "parameters": parameters,
        "responses": {
            "200": {"description": "Success", "content": {"application/json": {"schema": schema}}},
            "default": {
                "description": "An ARM error body (400, 401, 403, 404, 405)",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                },
            },
        },
    }


_NAME_FILTER = {
    "name": "hybridConnection",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": _MAX_NAME},
}
_NAME_REQUIRED = {**_NAME_FILTER, "required": True}
_CLOSED = {
    "type": "object",
    "required": ["closed"],
    "properties": {"closed": {"type": "integer", "minimum": 0}},
}
_NULLABLE_TEXT = {"type": ["string", "null"]}


def runtime_paths() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``/runtime`` paths and their schemas, for the management OpenAPI document."""

    def item(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": _MAX_NAME},
        }

    def listing(schema: str) -> dict[str, Any]:
        return {
            "type": "object",
            "required": ["value"],
            "properties": {
                "value": {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}}
            },
        }

    paths: dict[str, Any] = {}
    for collection, title, key, schema, listed, noun in (
        ("listeners", "Listener", "listenerId", "Listener", "Listeners online", "listener"),
        (
            "connections",
            "Connection",
            "trackingId",
            "RelayedConnection",
            "Relayed connections open now",
            "relayed connection",
        ),
    ):
        paths[f"{PREFIX}/{collection}"] = {
            "get": _runtime_operation(
                f"Runtime_List{title}s", listed, [_NAME_FILTER], listing(schema)
            ),
            "delete": _runtime_operation(
                f"Runtime_Close{title}s",
                f"Close every {noun} of a hybrid connection",
                [_NAME_REQUIRED],
                _CLOSED,
            ),
        }
        paths[f"{PREFIX}/{collection}/{{{key}}}"] = {
            "delete": _runtime_operation(
                f"Runtime_Close{title}", f"Close a {noun}", [item(key)], _CLOSED
            )
        }
    schemas = {
        "Listener": {
            "type": "object",
            "required": ["id", "hybridConnection", "remoteAddress", "connectedAt"],
            "properties": {
                "id": {"type": "string"},
                "hybridConnection": {"type": "string"},
                "remoteAddress": {"type": "string"},
                "connectedAt": {"type": "string", "format": "date-time"},
                "tokenExpiresAt": {"type": "string", "format": "date-time"},
            },
        },
        "RelayedConnection": {
            "type": "object",
            "required": ["trackingId", "hybridConnection", "kind", "since"],
            "properties": {
                "trackingId": {"type": "string"},
                "hybridConnection": {"type": "string"},
                "kind": {"type": "string", "enum": ["websocket", "ingress"]},
                "senderAddress": _NULLABLE_TEXT,
                "listenerAddress": _NULLABLE_TEXT,
                "since": {"type": "string", "format": "date-time"},
                "bytesToListener": {"type": "integer", "minimum": 0},
                "bytesToSender": {"type": "integer", "minimum": 0},
            },
        },
    }
    return paths, schemas
