"""The Microsoft.Relay resource provider's REST shapes, as Azure Resource Manager serves them.

What ``azure-mgmt-relay`` (``RelayAPIMgmtClient`` 2.x, ``RelayAPI`` 1.x) sends and accepts,
taken from the client's code and run against it: routes, names, request and response bodies,
ARM error bodies and paging. The management listener (a later layer) drives these with the
store's records; everything here is pure: no I/O, no clock (callers pass times), no state.

One self-hosted namespace is mapped onto ARM paths: ``{subscription}`` and ``{resourceGroup}``
are echoed in ids as the request gave them, literal segments and names match
case-insensitively, and each path segment is percent-decoded after the split, so an entity
named ``team/a`` arrives as ``team%2Fa``.
"""

from __future__ import annotations

import base64
import datetime
import enum
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from hybridrelay.auth.sas import Rights

__all__ = [
    "HYBRID_CONNECTION_NAME_PATTERN",
    "PAGE_SIZE",
    "RULE_NAME_PATTERN",
    "ArmError",
    "Kind",
    "KeyType",
    "Route",
    "Scope",
    "access_keys_body",
    "arm_time",
    "check_name_body",
    "connection_string",
    "error_body",
    "hybrid_connection_body",
    "namespace_body",
    "new_key",
    "page_body",
    "parse_check_name",
    "parse_namespace_put",
    "parse_hybrid_connection_put",
    "parse_regenerate_keys",
    "parse_route",
    "parse_rule_put",
    "rule_body",
    "validate_hybrid_connection_name",
    "validate_namespace_name",
    "validate_rule_name",
]

#: Items per list page; the client follows ``nextLink`` for the rest.
PAGE_SIZE = 100
#: Our bound on ``userMetadata`` (Azure documents none; the relay keeps it in memory).
MAX_USER_METADATA = 1024
_PROVIDER = "microsoft.relay"


class ArmError(Exception):
    """An ARM error answer: ``status`` with ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        #: Headers the answer must carry (``Allow`` on a 405).
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class Kind(enum.Enum):
    """What a path names."""

    OPERATIONS = "operations"
    NAMESPACES = "namespaces"
    CHECK_NAME = "checkNameAvailability"
    NAMESPACE = "namespace"
    RULES = "authorizationRules"
    RULE = "authorizationRule"
    LIST_KEYS = "listKeys"
    REGENERATE_KEYS = "regenerateKeys"
    HYBRID_CONNECTIONS = "hybridConnections"
    HYBRID_CONNECTION = "hybridConnection"
    #: WCF relays: listed as empty so that tools that enumerate do not break.
    WCF_RELAYS = "wcfRelays"
    #: Routes of the provider that a self-hosted relay does not have (private endpoints,
    #: network rule sets, one WCF relay): 404 on GET, 400 NotSupported otherwise.
    UNSUPPORTED = "unsupported"

    @property
    def methods(self) -> tuple[str, ...]:
        return _METHODS[self]


_READ = ("GET",)
_METHODS: dict[Kind, tuple[str, ...]] = {
    Kind.OPERATIONS: _READ,
    Kind.NAMESPACES: _READ,
    Kind.CHECK_NAME: ("POST",),
    Kind.NAMESPACE: ("GET", "PUT", "PATCH", "DELETE"),
    Kind.RULES: _READ,
    Kind.RULE: ("GET", "PUT", "DELETE"),
    Kind.LIST_KEYS: ("POST",),
    Kind.REGENERATE_KEYS: ("POST",),
    Kind.HYBRID_CONNECTIONS: _READ,
    Kind.HYBRID_CONNECTION: ("GET", "PUT", "DELETE"),
    Kind.WCF_RELAYS: _READ,
    Kind.UNSUPPORTED: ("GET", "PUT", "PATCH", "DELETE", "POST"),
}


@dataclass(frozen=True)
class Scope:
    """The subscription, resource group and namespace of a request, as its path spelled them
    (ids echo them). ``resource_group`` is empty on subscription-wide routes."""

    subscription: str
    resource_group: str
    namespace: str = ""

    def namespace_id(self, resource_group: str | None = None) -> str:
        group = resource_group or self.resource_group
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{group}"
            f"/providers/Microsoft.Relay/namespaces/{self.namespace}"
        )


@dataclass(frozen=True)
class Route:
    kind: Kind
    scope: Scope
    hybrid_connection: str = ""
    rule: str = ""

    def allows(self, method: str) -> bool:
        return method.upper() in self.kind.methods


_UNSUPPORTED_CHILDREN = ("privateendpointconnections", "privatelinkresources", "networkrulesets")


def parse_route(raw_path: str) -> Route:
    """The route of a raw request path (no query), or :class:`ArmError` 404 ``NotFound``.

    The raw path is split on ``/`` before each segment is percent-decoded, so encoded slashes
    stay inside a name.
    """
    raw = [segment for segment in raw_path.split("/") if segment]
    try:
        segments = [unquote(segment, errors="strict") for segment in raw]
    except UnicodeDecodeError:
        raise ArmError(404, "NotFound", "The path is not valid UTF-8.") from None
    lowered = [segment.lower() for segment in segments]
    not_found = ArmError(404, "NotFound", "No such route in the Microsoft.Relay API.")
    if lowered == ["providers", _PROVIDER, "operations"]:
        return Route(Kind.OPERATIONS, Scope("", ""))
    if len(segments) < 4 or lowered[0] != "subscriptions":
        raise not_found
    subscription = segments[1]
    if lowered[2:4] == ["providers", _PROVIDER]:
        rest, scope = lowered[4:], Scope(subscription, "")
        if rest == ["namespaces"]:
            return Route(Kind.NAMESPACES, scope)
        if rest == ["checknameavailability"]:
            return Route(Kind.CHECK_NAME, scope)
        raise not_found
    if (
        len(segments) < 7
        or lowered[2] != "resourcegroups"
        or lowered[4:7]
        != [
            "providers",
            _PROVIDER,
            "namespaces",
        ]
    ):
        raise not_found
    group = segments[3]
    names, kinds = segments[7:], lowered[7:]
    if not names:
        return Route(Kind.NAMESPACES, Scope(subscription, group))
    scope = Scope(subscription, group, names[0])
    tail_names, tail = names[1:], kinds[1:]
    if not tail:
        return Route(Kind.NAMESPACE, scope)
    hybrid_connection = ""
    if tail[0] == "hybridconnections":
        if len(tail) == 1:
            return Route(Kind.HYBRID_CONNECTIONS, scope)
        hybrid_connection = tail_names[1]
        if len(tail) == 2:
            return Route(Kind.HYBRID_CONNECTION, scope, hybrid_connection)
        tail_names, tail = tail_names[2:], tail[2:]
    elif tail[0] == "wcfrelays":
        return Route(Kind.WCF_RELAYS if len(tail) == 1 else Kind.UNSUPPORTED, scope)
    elif tail[0] in _UNSUPPORTED_CHILDREN:
        return Route(Kind.UNSUPPORTED, scope)
    if tail[0] != "authorizationrules" or len(tail) > 4:
        raise not_found
    if len(tail) == 1:
        return Route(Kind.RULES, scope, hybrid_connection)
    rule = tail_names[1]
    if len(tail) == 2:
        return Route(Kind.RULE, scope, hybrid_connection, rule)
    if len(tail) == 3 and tail[2] == "listkeys":
        return Route(Kind.LIST_KEYS, scope, hybrid_connection, rule)
    if len(tail) == 3 and tail[2] == "regeneratekeys":
        return Route(Kind.REGENERATE_KEYS, scope, hybrid_connection, rule)
    raise not_found


# -- names ----------------------------------------------------------------------------------

_SEGMENT_TEXT = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
#: The names the API accepts, as regular expressions (the OpenAPI document publishes them).
HYBRID_CONNECTION_NAME_PATTERN = rf"^{_SEGMENT_TEXT}(?:/{_SEGMENT_TEXT})*$"
RULE_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,254}[A-Za-z0-9])?$"
_NAMESPACE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{4,48}[A-Za-z0-9]")
_SEGMENT = re.compile(_SEGMENT_TEXT)
_RULE_NAME = re.compile(RULE_NAME_PATTERN.strip("^$"))


def validate_namespace_name(name: str) -> str | None:
    """None when ``name`` is a valid namespace name, else why not (Azure's rule: 6-50
    letters, digits and hyphens, starting with a letter, ending with a letter or digit)."""
    if _NAMESPACE_NAME.fullmatch(name):
        return None
    return (
        "A namespace name has 6 to 50 letters, digits and hyphens, starts with a letter and "
        "ends with a letter or a digit."
    )


def validate_hybrid_connection_name(name: str) -> str | None:
    """None when ``name`` is a valid hybrid connection path, else why not: 1-260 characters;
    segments separated by ``/``, each of letters, digits, ``.``, ``-``, ``_``, starting and
    ending with a letter or digit (so no empty, ``.`` or ``..`` segment)."""
    if not 1 <= len(name) <= 260:
        return "A hybrid connection name has 1 to 260 characters."
    if not all(_SEGMENT.fullmatch(segment) for segment in name.split("/")):
        return (
            "A hybrid connection name is made of segments separated by '/', each of letters, "
            "digits, '.', '-' and '_', starting and ending with a letter or a digit."
        )
    return None


def validate_rule_name(name: str) -> str | None:
    if _RULE_NAME.fullmatch(name):
        return None
    return (
        "An authorization rule name has 1 to 256 letters, digits, '.', '-' and '_', starting "
        "and ending with a letter or a digit."
    )


# -- request bodies -------------------------------------------------------------------------


def _object(document: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(document, Mapping):
        raise ArmError(400, "InvalidRequestContent", f"The {what} must be a JSON object.")
    return document


def _properties(document: Any, what: str) -> Mapping[str, Any]:
    properties = _object(document, what).get("properties")
    return {} if properties is None else _object(properties, f"{what}'s properties")


@dataclass(frozen=True)
class HybridConnectionChange:
    """A hybrid connection PUT: the properties it gives (None: not given, so kept on an
    update and defaulted on a create)."""

    requires_client_authorization: bool | None = None
    user_metadata: str | None = None


def parse_hybrid_connection_put(document: Any) -> HybridConnectionChange:
    """Read-only properties (``createdAt``, ``listenerCount``, ...) and unknown ones are
    ignored, as ARM does."""
    properties = _properties(document, "hybrid connection")
    requires = properties.get("requiresClientAuthorization")
    if requires is not None and not isinstance(requires, bool):
        raise ArmError(400, "BadRequest", "requiresClientAuthorization must be true or false.")
    metadata = properties.get("userMetadata")
    if metadata is not None:
        if not isinstance(metadata, str):
            raise ArmError(400, "BadRequest", "userMetadata must be a string.")
        if len(metadata) > MAX_USER_METADATA:
            raise ArmError(
                400, "BadRequest", f"userMetadata has at most {MAX_USER_METADATA} characters."
            )
    return HybridConnectionChange(requires, metadata)


def parse_rule_put(document: Any) -> Rights:
    """The rights of an authorization rule PUT: a non-empty list of Listen, Send, Manage
    (any case); Manage requires Listen and Send, as Azure says."""
    rights = _properties(document, "authorization rule").get("rights")
    if not isinstance(rights, list) or not rights or not all(isinstance(r, str) for r in rights):
        raise ArmError(
            400, "BadRequest", "rights must be a non-empty list of Listen, Send, Manage."
        )
    try:
        parsed = Rights.parse(rights)
    except ValueError as exc:
        raise ArmError(400, "BadRequest", str(exc)) from None
    if Rights.MANAGE in parsed and (Rights.LISTEN | Rights.SEND) not in parsed:
        raise ArmError(
            400, "BadRequest", "Assigning 'Manage' to rights requires 'Listen' and 'Send'."
        )
    return parsed


class KeyType(enum.Enum):
    PRIMARY = "PrimaryKey"
    SECONDARY = "SecondaryKey"


_GIVEN_KEY = re.compile(r"[\x21-\x7e]{32,256}")


def parse_regenerate_keys(document: Any) -> tuple[KeyType, str | None]:
    """``{"keyType": "PrimaryKey"|"SecondaryKey", "key"?: "..."}``: which key, and the new
    key's text when the caller gives one (32-256 printable ASCII characters)."""
    body = _object(document, "request")
    try:
        which = KeyType(body.get("keyType"))
    except ValueError:
        raise ArmError(400, "BadRequest", "keyType must be PrimaryKey or SecondaryKey.") from None
    key = body.get("key")
    if key is not None and (not isinstance(key, str) or not _GIVEN_KEY.fullmatch(key)):
        raise ArmError(400, "BadRequest", "key must be 32 to 256 printable ASCII characters.")
    return which, key


def parse_namespace_put(document: Any) -> dict[str, str] | None:
    """The tags of a namespace PUT or PATCH (None: keep them). ``location``, ``sku`` and the
    properties are checked for their types and otherwise ignored: a self-hosted relay has one
    namespace, wherever it runs."""
    body = _object(document, "namespace")
    for name in ("location",):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ArmError(400, "BadRequest", f"{name} must be a string.")
    for name in ("sku", "properties"):
        if body.get(name) is not None:
            _object(body[name], name)
    sku = body.get("sku") or {}
    if any(
        sku.get(field) is not None and not isinstance(sku[field], str) for field in ("name", "tier")
    ):
        raise ArmError(400, "BadRequest", "sku's name and tier must be strings.")
    tags = body.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in tags.items()
    ):
        raise ArmError(400, "BadRequest", "tags must map strings to strings.")
    return dict(tags)


def parse_check_name(document: Any) -> str:
    name = _object(document, "request").get("name")
    if not isinstance(name, str):
        raise ArmError(400, "BadRequest", "name must be a string.")
    return name


def new_key() -> str:
    """A new SAS key: the base64 text of 32 bytes from the operating system's CSPRNG (the
    text itself is the HMAC key, as every client uses it)."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


# -- response bodies ------------------------------------------------------------------------


def arm_time(when: datetime.datetime) -> str:
    """RFC 3339 in UTC with microseconds and ``Z``, as ARM writes times."""
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _name_in_id(name: str) -> str:
    # A name with "/" is written with %2F inside an id, so that the id stays one path.
    return quote(name, safe="")


def namespace_body(
    scope: Scope,
    *,
    created_at: datetime.datetime,
    updated_at: datetime.datetime,
    service_bus_endpoint: str,
    tags: Mapping[str, str],
    resource_group: str | None = None,
) -> dict[str, Any]:
    return {
        "id": scope.namespace_id(resource_group),
        "name": scope.namespace,
        "type": "Microsoft.Relay/Namespaces",
        "location": "self-hosted",
        "tags": dict(tags),
        "sku": {"name": "Standard", "tier": "Standard"},
        "properties": {
            # Succeeded, always: anything else makes the client poll every 30 s.
            "provisioningState": "Succeeded",
            "status": "Active",
            "createdAt": arm_time(created_at),
            "updatedAt": arm_time(updated_at),
            "serviceBusEndpoint": service_bus_endpoint,
            "metricId": f"{scope.subscription}:{scope.namespace}",
        },
    }


def hybrid_connection_body(
    scope: Scope,
    name: str,
    *,
    created_at: datetime.datetime,
    updated_at: datetime.datetime,
    listener_count: int,
    requires_client_authorization: bool,
    user_metadata: str | None,
) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "createdAt": arm_time(created_at),
        "updatedAt": arm_time(updated_at),
        "listenerCount": listener_count,
        "requiresClientAuthorization": requires_client_authorization,
    }
    if user_metadata is not None:
        properties["userMetadata"] = user_metadata
    return {
        "id": f"{scope.namespace_id()}/hybridConnections/{_name_in_id(name)}",
        "name": name,
        "type": "Microsoft.Relay/Namespaces/HybridConnections",
        "properties": properties,
    }


def rule_body(
    scope: Scope, name: str, rights: Rights, *, hybrid_connection: str = ""
) -> dict[str, Any]:
    if hybrid_connection:
        parent = f"{scope.namespace_id()}/hybridConnections/{_name_in_id(hybrid_connection)}"
        kind = "Microsoft.Relay/Namespaces/HybridConnections/AuthorizationRules"
    else:
        parent, kind = scope.namespace_id(), "Microsoft.Relay/Namespaces/AuthorizationRules"
    return {
        "id": f"{parent}/authorizationRules/{_name_in_id(name)}",
        "name": name,
        "type": kind,
        "properties": {"rights": rights.names()},
    }


def connection_string(endpoint: str, rule: str, key: str, hybrid_connection: str = "") -> str:
    """``Endpoint=sb://host[:port]/;SharedAccessKeyName=...;SharedAccessKey=...[;EntityPath=]``"""
    text = f"Endpoint={endpoint};SharedAccessKeyName={rule};SharedAccessKey={key}"
    return text + (f";EntityPath={hybrid_connection}" if hybrid_connection else "")


def access_keys_body(
    endpoint: str,
    rule: str,
    primary_key: str,
    secondary_key: str | None,
    *,
    hybrid_connection: str = "",
) -> dict[str, Any]:
    secondary = secondary_key or ""
    return {
        "keyName": rule,
        "primaryKey": primary_key,
        "secondaryKey": secondary,
        "primaryConnectionString": connection_string(
            endpoint, rule, primary_key, hybrid_connection
        ),
        "secondaryConnectionString": connection_string(endpoint, rule, secondary, hybrid_connection)
        if secondary
        else "",
    }


def check_name_body(name: str, taken: bool) -> dict[str, Any]:
    why = validate_namespace_name(name)
    if why is not None:
        return {"nameAvailable": False, "reason": "InvalidName", "message": why}
    if taken:
        return {
            "nameAvailable": False,
            "reason": "NameInUse",
            "message": f"The namespace name {name!r} is already in use.",
        }
    return {"nameAvailable": True, "reason": "None", "message": ""}


def page_body(
    items: Sequence[dict[str, Any]], skip_token: str | None, next_link_base: str
) -> dict[str, Any]:
    """One page of a list, from ``$skipToken`` (an offset, opaque to the client).

    ``next_link_base`` is the absolute URL of the list as the client dialled it, without a
    query; the client keeps ``nextLink``'s query and replaces ``api-version`` with its own.
    """
    try:
        start = int(skip_token) if skip_token else 0
    except ValueError:
        raise ArmError(400, "BadRequest", "$skipToken is not valid.") from None
    if start < 0:
        raise ArmError(400, "BadRequest", "$skipToken is not valid.")
    chunk = list(items[start : start + PAGE_SIZE])
    body: dict[str, Any] = {"value": chunk}
    if start + PAGE_SIZE < len(items):
        body["nextLink"] = f"{next_link_base}?api-version=2017-04-01&$skipToken={start + PAGE_SIZE}"
    return body
