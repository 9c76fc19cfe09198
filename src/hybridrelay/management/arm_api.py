"""Azure's management API for Microsoft.Relay, served by the relay (docs/MANAGEMENT.md).

An aiohttp sub-application on the management listener. Every request needs a token with the
Manage right on the whole namespace: ``Authorization: Bearer <SAS token>`` (what
``azure-mgmt-relay`` sends, its credential returning the SAS token as the access token) or
``Authorization: SharedAccessSignature ...``. Reads come from the namespace as the relay serves
it (the file laid over the store); writes go to the store, which tells the relay at once.

The shapes are :mod:`hybridrelay.protocol.arm`'s; this module only routes, authorizes and turns
store outcomes into ARM answers. No answer is a 5xx after a change was applied (the client
retries 5xx, and a retried ``regenerateKeys`` would rotate twice).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from hybridrelay.auth.cache import AuthCache
from hybridrelay.auth.sas import AuthDecision, Rights, authorize
from hybridrelay.management.openapi import openapi_document
from hybridrelay.protocol.arm import (
    ArmError,
    KeyType,
    Kind,
    Route,
    Scope,
    access_keys_body,
    check_name_body,
    hybrid_connection_body,
    namespace_body,
    page_body,
    parse_check_name,
    parse_hybrid_connection_put,
    parse_namespace_put,
    parse_regenerate_keys,
    parse_route,
    parse_rule_put,
    rule_body,
    validate_hybrid_connection_name,
    validate_rule_name,
)
from hybridrelay.store.base import (
    KEEP,
    KeySlot,
    NotFoundError,
    Store,
    StoreQuotaError,
    StoreUnavailableError,
)
from hybridrelay.store.layers import FileLayer, layered
from hybridrelay.store.records import HybridConnectionRecord, NamespaceState, RuleRecord

__all__ = ["ArmApi", "ListenerCount"]

logger = logging.getLogger("hybridrelay.management")

#: The live number of listeners of each hybrid connection named, by name (the relay's broker
#: answers it: on every node of a cluster).
ListenerCount = Callable[[Sequence[str]], Awaitable[Mapping[str, int]]]
#: Largest request body; the client's bodies are a few hundred bytes.
MAX_BODY = 1024 * 1024

_OPERATIONS = [
    ("Microsoft.Relay/namespaces/read", "Namespace", "Get the namespace"),
    ("Microsoft.Relay/namespaces/write", "Namespace", "Update the namespace's tags"),
    ("Microsoft.Relay/namespaces/hybridConnections/read", "HybridConnection", "Get or list"),
    ("Microsoft.Relay/namespaces/hybridConnections/write", "HybridConnection", "Create or update"),
    ("Microsoft.Relay/namespaces/hybridConnections/delete", "HybridConnection", "Delete"),
    ("Microsoft.Relay/namespaces/authorizationRules/read", "AuthorizationRule", "Get or list"),
    ("Microsoft.Relay/namespaces/authorizationRules/write", "AuthorizationRule", "Create"),
    ("Microsoft.Relay/namespaces/authorizationRules/delete", "AuthorizationRule", "Delete"),
    ("Microsoft.Relay/namespaces/authorizationRules/listkeys/action", "AuthorizationRule", "Keys"),
    (
        "Microsoft.Relay/namespaces/authorizationRules/regenerateKeys/action",
        "AuthorizationRule",
        "Regenerate a key",
    ),
]


def _when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


def _service_bus_endpoint(public_endpoint: str) -> str:
    host = public_endpoint.split("://", 1)[-1].strip("/")
    return f"https://{host}/"


@dataclass
class ArmApi:
    """The ARM routes over ``store``.

    Args:
        store: where changes go.
        file_layer: what the configuration file defines (read-only here).
        listener_count: live listeners of hybrid connections (:data:`ListenerCount`).
        public_endpoint: ``sb://host[:port]/`` that data-plane clients dial, for connection
            strings and ``serviceBusEndpoint``.
        clock: epoch seconds, for token expiry.
    """

    store: Store
    file_layer: FileLayer
    listener_count: ListenerCount
    public_endpoint: str
    clock: Callable[[], float] = time.time
    _auth: AuthCache = field(default_factory=lambda: AuthCache(max_entries=1000), repr=False)

    def application(self) -> web.Application:
        """A stand-alone application serving only these routes (the management listener adds
        them to its own)."""
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes(
            [
                *self.routes(),
                web.get("/openapi.json", self.openapi),
                # Anything else gets ARM's 404, as JSON, after authorization.
                web.route("*", r"/{tail:[\s\S]*}", self.handle),
            ]
        )
        return app

    # -- entry ----------------------------------------------------------------------------------

    def routes(self) -> list[web.AbstractRouteDef]:
        """Routes for the management application: the ARM paths, under any method."""
        return [
            # [\s\S]: a decoded name may hold a newline, which "." would not match.
            web.route("*", r"/subscriptions/{tail:[\s\S]*}", self.handle),
            web.route("*", r"/providers/{tail:[\s\S]*}", self.handle),
        ]

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of these routes (no token needed: it holds no secret)."""
        return _json(200, openapi_document(self.store.state.namespace.name))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._handle(request)
        except ArmError as exc:
            response = _json(exc.status, exc.body())
            response.headers.update(exc.headers)
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = (
                    'Bearer realm="hybridrelay", error="invalid_token"'
                )
        response.headers["x-ms-request-id"] = str(uuid.uuid4())
        client_request = request.headers.get("x-ms-client-request-id")
        if client_request and len(client_request) <= 128 and client_request.isprintable():
            response.headers["x-ms-client-request-id"] = client_request
        return response

    async def _handle(self, request: web.Request) -> web.Response:
        state = self._state()
        self._authorize(request, state)
        route = parse_route(request.raw_path.partition("?")[0])
        if not route.allows(request.method):
            refusal = ArmError(405, "MethodNotAllowed", f"{request.method} is not allowed here.")
            refusal.headers["Allow"] = ", ".join(route.kind.methods)
            raise refusal
        if not request.query.get("api-version"):
            raise ArmError(
                400, "MissingApiVersionParameter", "The api-version query parameter is required."
            )
        handler = self._handlers[route.kind]
        return await handler(request, route, state)

    def authorize_request(self, request: web.Request) -> None:
        """Raise :class:`ArmError` (401, 403) unless ``request`` carries a Manage token on the
        namespace; the other routes of the management listener use it too."""
        self._authorize(request, self._state())

    def manage_token_refusal(self, token: str) -> str | None:
        """Why ``token`` does not grant Manage on the namespace, or None if it does (the
        dashboard's sign-in)."""
        decision = self._manage_decision(token, self._state())
        return None if decision.allowed else decision.reason

    def _state(self) -> NamespaceState:
        """The namespace as the relay serves it: the file laid over the store, now."""
        return layered(self.file_layer, self.store.state)

    def _authorize(self, request: web.Request, state: NamespaceState) -> None:
        header = request.headers.get("Authorization", "")
        if not header:
            raise ArmError(401, "AuthenticationFailed", "The Authorization header is missing.")
        scheme, _, rest = header.partition(" ")
        token = rest.strip() if scheme.lower() == "bearer" else header
        decision = self._manage_decision(token, state)
        if decision.status == 401:
            raise ArmError(401, "InvalidAuthenticationToken", decision.reason)
        if not decision.allowed:
            raise ArmError(403, "AuthorizationFailed", decision.reason)

    def _manage_decision(self, token: str, state: NamespaceState) -> AuthDecision:
        """Whether ``token`` grants Manage on the namespace (its rules in ``state``)."""
        return authorize(
            token,
            rules=[rule.to_rule() for rule in state.namespace.rules],
            entity_path="",
            required=Rights.MANAGE,
            now=self.clock(),
            verify=self._auth.verify,
        )

    @functools.cached_property
    def _handlers(
        self,
    ) -> dict[Kind, Callable[[web.Request, Route, NamespaceState], Awaitable[web.Response]]]:
        return {
            Kind.OPERATIONS: self._operations,
            Kind.NAMESPACES: self._namespaces,
            Kind.CHECK_NAME: self._check_name,
            Kind.NAMESPACE: self._namespace,
            Kind.HYBRID_CONNECTIONS: self._hybrid_connections,
            Kind.HYBRID_CONNECTION: self._hybrid_connection,
            Kind.RULES: self._rules,
            Kind.RULE: self._rule,
            Kind.LIST_KEYS: self._list_keys,
            Kind.REGENERATE_KEYS: self._regenerate_keys,
            Kind.WCF_RELAYS: self._wcf_relays,
            Kind.UNSUPPORTED: self._unsupported,
        }

    # -- namespace ------------------------------------------------------------------------------

    async def _operations(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        items = [
            {
                "name": name,
                "isDataAction": False,
                "display": {
                    "provider": "Microsoft Relay",
                    "resource": resource,
                    "operation": name.rsplit("/", 1)[-1],
                    "description": description,
                },
            }
            for name, resource, description in _OPERATIONS
        ]
        return _json(200, {"value": items})

    def _namespace_body(self, scope: Scope, state: NamespaceState) -> dict[str, Any]:
        namespace = state.namespace
        return namespace_body(
            Scope(scope.subscription, scope.resource_group, namespace.name),
            created_at=_when(namespace.created_at),
            updated_at=_when(namespace.updated_at),
            service_bus_endpoint=_service_bus_endpoint(self.public_endpoint),
            tags=namespace.tags,
            # Subscription-wide lists have no group in their path: name one.
            resource_group=scope.resource_group or "hybridrelay",
        )

    async def _namespaces(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        return _json(200, {"value": [self._namespace_body(route.scope, state)]})

    async def _check_name(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        name = parse_check_name(await _body(request))
        return _json(200, check_name_body(name, name.lower() == state.namespace.name.lower()))

    def _ours(self, route: Route, state: NamespaceState) -> bool:
        return route.scope.namespace.lower() == state.namespace.name.lower()

    def _parent(self, route: Route, state: NamespaceState) -> None:
        if not self._ours(route, state):
            raise ArmError(
                404,
                "ParentResourceNotFound",
                f"The namespace {route.scope.namespace!r} does not exist on this relay.",
            )

    async def _namespace(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        ours = self._ours(route, state)
        if request.method == "DELETE" and ours:  # 409: it conflicts with the relay serving it
            raise ArmError(409, "Conflict", "The relay's own namespace cannot be deleted.")
        if not ours:
            if request.method in ("GET", "DELETE"):
                raise ArmError(
                    404, "ResourceNotFound", f"The namespace {route.scope.namespace!r} is not here."
                )
            raise ArmError(
                400,
                "NamespaceCreationNotSupported",
                "This relay serves one namespace; it cannot create another.",
            )
        if request.method in ("PUT", "PATCH"):
            tags = parse_namespace_put(await _body(request))
            if tags is not None:
                await self._store_call(self.store.update_namespace(tags=tags))
                state = self._state()
        return _json(200, self._namespace_body(route.scope, state))

    # -- hybrid connections ---------------------------------------------------------------------

    async def _hybrid_connection_body(self, scope: Scope, state: NamespaceState, name: str) -> Any:
        record = state.get(name)
        if record is None:
            raise ArmError(404, "ResourceNotFound", f"No hybrid connection {name!r}.")
        counts = await self.listener_count([record.name])
        return self._body_of(scope, record, counts[record.name])

    def _body_of(self, scope: Scope, record: HybridConnectionRecord, listeners: int) -> Any:
        return hybrid_connection_body(
            scope,
            record.name,
            created_at=_when(record.created_at),
            updated_at=_when(record.updated_at),
            listener_count=listeners,
            requires_client_authorization=record.requires_client_authorization,
            user_metadata=record.user_metadata,
        )

    async def _hybrid_connections(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        self._parent(route, state)
        records = state.sorted_hybrid_connections()
        counts = await self.listener_count([record.name for record in records])  # one read
        items = [self._body_of(route.scope, record, counts[record.name]) for record in records]
        return _json(200, page_body(items, request.query.get("$skipToken"), _list_url(request)))

    async def _hybrid_connection(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        self._parent(route, state)
        name = route.hybrid_connection
        if request.method == "GET":
            return _json(200, await self._hybrid_connection_body(route.scope, state, name))
        self._writable(name)
        why = validate_hybrid_connection_name(name)
        if why is not None:
            raise ArmError(400, "BadRequest", why)
        if request.method == "DELETE":
            deleted = await self._store_call(self.store.delete_hybrid_connection(name))
            return web.Response(status=200 if deleted else 204)
        change = parse_hybrid_connection_put(await _body(request))
        await self._store_call(
            self.store.put_hybrid_connection(
                name,
                requires_client_authorization=change.requires_client_authorization,
                # Omitted (or null) is kept, as ARM's PUT does here; "" clears it.
                user_metadata=KEEP if change.user_metadata is None else change.user_metadata,
            )
        )
        state = self._state()
        return _json(200, await self._hybrid_connection_body(route.scope, state, name))

    def _writable(self, entity: str, rule: str = "") -> None:
        owned = (
            self.file_layer.names_rule(rule, entity)
            if rule
            else self.file_layer.names_entity(entity)
        )
        if owned:
            what = f"rule {rule!r}" if rule else f"hybrid connection {entity!r}"
            raise ArmError(
                400,
                "ReadOnlyResource",
                f"The {what} is defined in the relay's configuration file: change it there "
                "and reload the relay.",
            )

    # -- rules ----------------------------------------------------------------------------------

    def _rules_of(self, route: Route, state: NamespaceState) -> tuple[RuleRecord, ...]:
        self._parent(route, state)
        if not route.hybrid_connection:
            return state.namespace.rules
        record = state.get(route.hybrid_connection)
        if record is None:
            raise ArmError(
                404,
                "ParentResourceNotFound",
                f"No hybrid connection {route.hybrid_connection!r}.",
            )
        return record.rules

    def _find_rule(self, route: Route, state: NamespaceState) -> RuleRecord:
        for rule in self._rules_of(route, state):
            if rule.name.lower() == route.rule.lower():
                return rule
        raise ArmError(404, "ResourceNotFound", f"No authorization rule {route.rule!r}.")

    def _rule_body(self, route: Route, rule: RuleRecord, state: NamespaceState) -> Any:
        return rule_body(
            route.scope, rule.name, rule.rights, hybrid_connection=_entity_name(route, state)
        )

    async def _rules(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        items = [self._rule_body(route, rule, state) for rule in self._rules_of(route, state)]
        return _json(200, page_body(items, request.query.get("$skipToken"), _list_url(request)))

    async def _rule(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        if request.method == "GET":
            return _json(200, self._rule_body(route, self._find_rule(route, state), state))
        self._rules_of(route, state)  # the parent must exist
        self._writable(route.hybrid_connection, route.rule)
        why = validate_rule_name(route.rule)
        if why is not None:
            raise ArmError(400, "BadRequest", why)
        if request.method == "DELETE":
            deleted = await self._store_call(
                self.store.delete_rule(route.rule, entity=route.hybrid_connection)
            )
            return web.Response(status=200 if deleted else 204)
        rights = parse_rule_put(await _body(request))
        rule, _ = await self._store_call(
            self.store.put_rule(route.rule, rights, entity=route.hybrid_connection)
        )
        return _json(200, self._rule_body(route, rule, self._state()))

    def _keys_body(self, route: Route, rule: RuleRecord, state: NamespaceState) -> Any:
        return access_keys_body(
            self.public_endpoint,
            rule.name,
            rule.primary_key,
            rule.secondary_key,
            hybrid_connection=_entity_name(route, state),
        )

    async def _list_keys(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        return _json(200, self._keys_body(route, self._find_rule(route, state), state))

    async def _regenerate_keys(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        self._find_rule(route, state)
        self._writable(route.hybrid_connection, route.rule)
        which, key = parse_regenerate_keys(await _body(request))
        slot: KeySlot = "primary" if which is KeyType.PRIMARY else "secondary"
        rule = await self._store_call(
            self.store.regenerate_key(route.rule, slot, entity=route.hybrid_connection, key=key)
        )
        logger.info(
            "regenerated the %s key of rule %r%s",
            slot,
            rule.name,
            f" of {route.hybrid_connection!r}" if route.hybrid_connection else "",
        )
        return _json(200, self._keys_body(route, rule, self._state()))

    # -- what a self-hosted relay does not have -------------------------------------------------

    async def _wcf_relays(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        self._parent(route, state)
        return _json(200, {"value": []})

    async def _unsupported(
        self, request: web.Request, route: Route, state: NamespaceState
    ) -> web.Response:
        if request.method == "GET":
            raise ArmError(404, "ResourceNotFound", "This relay has no such resource.")
        raise ArmError(400, "NotSupported", "This relay does not support this resource.")

    async def _store_call(self, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except NotFoundError as exc:
            raise ArmError(404, "ParentResourceNotFound", str(exc)) from None
        except StoreQuotaError as exc:
            # 409: the request conflicts with what exists (the bound is reached); not 429,
            # which the client would retry.
            raise ArmError(409, "QuotaExceeded", str(exc)) from None
        except StoreUnavailableError as exc:
            logger.warning("management store unavailable: %s", exc)
            raise ArmError(
                503, "ServiceUnavailable", "The management store is not available; retry later."
            ) from None


def _json(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        charset="utf-8",
    )


async def _body(request: web.Request) -> Any:
    try:
        raw = await request.read()  # bounded by the application's client_max_size
    except web.HTTPRequestEntityTooLarge:
        raise ArmError(
            413, "RequestEntityTooLarge", f"The body exceeds {MAX_BODY} bytes."
        ) from None
    if not raw.strip():
        raise ArmError(400, "InvalidRequestContent", "A JSON body is required.")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ArmError(400, "InvalidRequestContent", "The body is not valid JSON.") from None


def _entity_name(route: Route, state: NamespaceState) -> str:
    """The route's hybrid connection as the store spells it ("" for the namespace's rules)."""
    entity = state.get(route.hybrid_connection) if route.hybrid_connection else None
    return entity.name if entity else ""


def _list_url(request: web.Request) -> str:
    """The list's absolute URL as the client dialled it (the client follows ``nextLink``)."""
    return f"{request.scheme}://{request.host}{request.raw_path.partition('?')[0]}"
