"""The OpenAPI 3 document of the management listener, served at ``/openapi.json``.

Written from the same shapes that :mod:`hybridrelay.protocol.arm` builds, and checked against
the running API by schemathesis in the tests (every answer must match its schema, and none may
be a 5xx), so the document and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

import re
from typing import Any

from hybridrelay.management.runtime_api import runtime_paths
from hybridrelay.protocol.arm import HYBRID_CONNECTION_NAME_PATTERN, RULE_NAME_PATTERN

__all__ = ["openapi_document"]

_ARM = (
    "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}"
    "/providers/Microsoft.Relay/namespaces/{namespaceName}"
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, where: str = "path", **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "required": True, "schema": {"type": "string", **schema}}


_API_VERSION = _param("api-version", "query", minLength=1)
_HC = _param("hybridConnectionName", pattern=HYBRID_CONNECTION_NAME_PATTERN, maxLength=260)
_RULE = _param("authorizationRuleName", pattern=RULE_NAME_PATTERN)


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _responses(*codes: int, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for code in codes:
        if code in (200, 201) and schema is not None:
            answers[str(code)] = {
                "description": "Success",
                "content": {"application/json": {"schema": schema}},
            }
        else:
            answers[str(code)] = {"description": "Success, no body"}
    answers["default"] = {
        "description": "An ARM error (400, 401, 403, 404, 405, 413, 503)",
        "content": {"application/json": {"schema": _ref("ErrorResponse")}},
    }
    return answers


def _operation(
    operation_id: str,
    summary: str,
    parameters: list[dict[str, Any]],
    responses: dict[str, Any],
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "parameters": [*parameters, _API_VERSION],
        "responses": responses,
    }
    if body is not None:
        operation["requestBody"] = body
    return operation


def _list_of(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["value"],
        "properties": {
            "value": {"type": "array", "items": _ref(item)},
            "nextLink": {"type": "string"},
        },
    }


def _rule_routes(prefix: str, parameters: list[dict[str, Any]], tag: str) -> dict[str, Any]:
    rule_parameters = [*parameters, _RULE]
    return {
        f"{prefix}/authorizationRules": {
            "get": _operation(
                f"{tag}_ListAuthorizationRules",
                "List the SAS rules",
                parameters,
                _responses(200, schema=_list_of("AuthorizationRule")),
            )
        },
        f"{prefix}/authorizationRules/{{authorizationRuleName}}": {
            "get": _operation(
                f"{tag}_GetAuthorizationRule",
                "Get a SAS rule",
                rule_parameters,
                _responses(200, schema=_ref("AuthorizationRule")),
            ),
            "put": _operation(
                f"{tag}_CreateOrUpdateAuthorizationRule",
                "Create a SAS rule with new keys, or change its rights",
                rule_parameters,
                _responses(200, schema=_ref("AuthorizationRule")),
                _json_body(_ref("AuthorizationRule")),
            ),
            "delete": _operation(
                f"{tag}_DeleteAuthorizationRule",
                "Delete a SAS rule (204 when it did not exist)",
                rule_parameters,
                _responses(200, 204),
            ),
        },
        f"{prefix}/authorizationRules/{{authorizationRuleName}}/listKeys": {
            "post": _operation(
                f"{tag}_ListKeys",
                "The rule's keys and connection strings",
                rule_parameters,
                _responses(200, schema=_ref("AccessKeys")),
            )
        },
        f"{prefix}/authorizationRules/{{authorizationRuleName}}/regenerateKeys": {
            "post": _operation(
                f"{tag}_RegenerateKeys",
                "Replace the primary or the secondary key",
                rule_parameters,
                _responses(200, schema=_ref("AccessKeys")),
                _json_body(_ref("RegenerateAccessKeyParameters")),
            )
        },
    }


_READ_ONLY = {"type": "string", "readOnly": True}
#: What every ARM resource has: read-only, named by the path.
_RESOURCE = {"id": _READ_ONLY, "name": _READ_ONLY, "type": _READ_ONLY}
_TIMES = {
    "createdAt": {"type": "string", "format": "date-time", "readOnly": True},
    "updatedAt": {"type": "string", "format": "date-time", "readOnly": True},
}
_TAGS = {"type": ["object", "null"], "additionalProperties": {"type": "string"}}

_SCHEMAS: dict[str, Any] = {
    "ErrorResponse": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Namespace": {  # properties may be null or absent in requests: they are read-only
        "type": "object",
        "required": ["id", "name", "type"],
        "properties": {
            **_RESOURCE,
            # In a request, null is the same as absent throughout.
            "location": {"type": ["string", "null"]},
            "tags": _TAGS,
            "sku": {
                "type": ["object", "null"],
                "properties": {
                    "name": {"type": ["string", "null"]},
                    "tier": {"type": ["string", "null"]},
                },
            },
            "properties": {
                "type": ["object", "null"],
                "properties": {
                    "provisioningState": _READ_ONLY,
                    "status": _READ_ONLY,
                    **_TIMES,
                    "serviceBusEndpoint": _READ_ONLY,
                    "metricId": _READ_ONLY,
                },
            },
        },
    },
    "NamespaceUpdate": {
        "type": "object",
        "properties": {"tags": _TAGS},
    },
    "HybridConnection": {
        "type": "object",
        "properties": {
            **_RESOURCE,
            "properties": {
                "type": ["object", "null"],
                "properties": {
                    **_TIMES,
                    "listenerCount": {"type": "integer", "minimum": 0, "readOnly": True},
                    # null: not given (kept on an update, defaulted on a create).
                    "requiresClientAuthorization": {"type": ["boolean", "null"]},
                    "userMetadata": {"type": ["string", "null"], "maxLength": 1024},
                },
            },
        },
    },
    "AuthorizationRule": {
        "type": "object",
        "required": ["properties"],
        "properties": {
            **_RESOURCE,
            "properties": {
                "type": "object",
                "required": ["rights"],
                "properties": {
                    "rights": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "enum": ["Listen", "Send", "Manage"]},
                        # Manage needs Listen and Send, as Azure says.
                        "if": {"contains": {"const": "Manage"}},
                        "then": {
                            "allOf": [
                                {"contains": {"const": "Listen"}},
                                {"contains": {"const": "Send"}},
                            ]
                        },
                    }
                },
            },
        },
    },
    "AccessKeys": {
        "type": "object",
        "required": ["keyName", "primaryKey", "secondaryKey"],
        "properties": {
            "keyName": {"type": "string"},
            "primaryKey": {"type": "string"},
            "secondaryKey": {"type": "string"},
            "primaryConnectionString": {"type": "string"},
            "secondaryConnectionString": {"type": "string"},
        },
    },
    "RegenerateAccessKeyParameters": {
        "type": "object",
        "required": ["keyType"],
        "properties": {
            "keyType": {"type": "string", "enum": ["PrimaryKey", "SecondaryKey"]},
            "key": {"type": "string", "pattern": "^[\\x21-\\x7e]{32,256}$"},
        },
    },
    "CheckNameAvailability": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}},
    },
    "CheckNameAvailabilityResult": {
        "type": "object",
        "required": ["nameAvailable", "reason"],
        "properties": {
            "nameAvailable": {"type": "boolean"},
            "reason": {"type": "string", "enum": ["None", "InvalidName", "NameInUse"]},
            "message": {"type": "string"},
        },
    },
    "Operation": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "isDataAction": {"type": "boolean"},
            "display": {"type": "object"},
        },
    },
}


def _text(description: str, *codes: int, content_type: str = "text/plain") -> dict[str, Any]:
    return {
        str(code): {
            "description": description,
            "content": {content_type: {"schema": {"type": "string"}}},
        }
        for code in codes
    }


#: The routes that need no token (they hold no secret), and the dashboard's, which take its
#: session cookie instead (docs/DASHBOARD.md).
def _unsigned(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "security": [],
            "responses": responses,
        }
    }


_UNSIGNED_PATHS: dict[str, Any] = {
    "/metrics": _unsigned(
        "Metrics", "Prometheus text exposition (docs/METRICS.md)", _text("The metrics", 200)
    ),
    "/healthz": _unsigned("Health", "200 while the process runs", _text("Alive", 200)),
    "/readyz": _unsigned(
        "Readiness",
        "200 when the store answers and the relay accepts; 503 with the reason",
        _text("Ready, or why not", 200, 503),
    ),
    "/openapi.json": _unsigned(
        "OpenApi",
        "This document",
        {
            "200": {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    ),
    "/dashboard": _unsigned(
        "Dashboard",
        "The dashboard page, or its sign-in form without a session",
        _text("HTML", 200, content_type="text/html"),
    ),
    "/dashboard/events": _unsigned(
        "DashboardEvents",
        "Server-sent snapshots, once a second (needs the session cookie)",
        {
            **_text("An endless event stream", 200, content_type="text/event-stream"),
            "401": {"description": "No session"},
            "503": {"description": "Too many streams"},
        },
    ),
}


def openapi_document(namespace: str) -> dict[str, Any]:
    """The whole document for a relay serving ``namespace`` (the only namespace name its
    routes accept; any casing of it works, the document names it as created)."""
    scope = [
        _param("subscriptionId"),
        _param("resourceGroupName"),
        _param("namespaceName", pattern=f"^{re.escape(namespace)}$"),
    ]
    hc_parameters = [*scope, _HC]
    paths: dict[str, Any] = {
        "/providers/Microsoft.Relay/operations": {
            "get": _operation(
                "Operations_List",
                "The operations of the provider",
                [],
                _responses(200, schema=_list_of("Operation")),
            )
        },
        "/subscriptions/{subscriptionId}/providers/Microsoft.Relay/namespaces": {
            "get": _operation(
                "Namespaces_List",
                "The relay's namespace, subscription-wide",
                [_param("subscriptionId")],
                _responses(200, schema=_list_of("Namespace")),
            )
        },
        "/subscriptions/{subscriptionId}/providers/Microsoft.Relay/checkNameAvailability": {
            "post": _operation(
                "Namespaces_CheckNameAvailability",
                "Whether a namespace name is free",
                [_param("subscriptionId")],
                _responses(200, schema=_ref("CheckNameAvailabilityResult")),
                _json_body(_ref("CheckNameAvailability")),
            )
        },
        "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroupName}"
        "/providers/Microsoft.Relay/namespaces": {
            "get": _operation(
                "Namespaces_ListByResourceGroup",
                "The relay's namespace",
                scope[:2],
                _responses(200, schema=_list_of("Namespace")),
            )
        },
        _ARM: {
            "get": _operation(
                "Namespaces_Get", "The namespace", scope, _responses(200, schema=_ref("Namespace"))
            ),
            "put": _operation(
                "Namespaces_CreateOrUpdate",
                "Update the relay's namespace (its tags); no other namespace can be created",
                scope,
                _responses(200, schema=_ref("Namespace")),
                _json_body(_ref("Namespace")),
            ),
            "patch": _operation(
                "Namespaces_Update",
                "Update the namespace's tags",
                scope,
                _responses(200, schema=_ref("Namespace")),
                _json_body(_ref("NamespaceUpdate")),
            ),
            "delete": _operation(
                "Namespaces_Delete",
                "409 for the relay's own namespace, 404 for any other",
                scope,
                _responses(204),
            ),
        },
        f"{_ARM}/hybridConnections": {
            "get": _operation(
                "HybridConnections_ListByNamespace",
                "The hybrid connections, a page at a time",
                scope,
                _responses(200, schema=_list_of("HybridConnection")),
            )
        },
        f"{_ARM}/hybridConnections/{{hybridConnectionName}}": {
            "get": _operation(
                "HybridConnections_Get",
                "A hybrid connection with its live listener count",
                hc_parameters,
                _responses(200, schema=_ref("HybridConnection")),
            ),
            "put": _operation(
                "HybridConnections_CreateOrUpdate",
                "Create a hybrid connection, or update it (omitted properties are kept)",
                hc_parameters,
                _responses(200, schema=_ref("HybridConnection")),
                _json_body(_ref("HybridConnection")),
            ),
            "delete": _operation(
                "HybridConnections_Delete",
                "Delete a hybrid connection and its rules (204 when it did not exist)",
                hc_parameters,
                _responses(200, 204),
            ),
        },
        f"{_ARM}/wcfRelays": {
            "get": _operation(
                "WCFRelays_ListByNamespace",
                "Always empty: this relay has no WCF relays",
                scope,
                _responses(200, schema=_list_of("Namespace")),
            )
        },
        **_rule_routes(_ARM, scope, "Namespaces"),
        **_rule_routes(f"{_ARM}/hybridConnections/{{hybridConnectionName}}", hc_parameters, "HC"),
    }
    runtime, runtime_schemas = runtime_paths()
    paths.update(runtime)
    paths.update(_UNSIGNED_PATHS)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hybridrelay management API",
            "version": "1",
            "description": (
                "Azure's Microsoft.Relay management API as the relay serves it "
                "(docs/MANAGEMENT.md), and the relay's runtime information under /runtime. "
                "Every request needs a SAS token with the Manage right on "
                "the namespace, as 'Bearer <token>' or as the token itself."
            ),
        },
        "security": [{"bearer": []}, {"sas": []}],
        "paths": paths,
        "components": {
            "schemas": {**_SCHEMAS, **runtime_schemas},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "sas": {"type": "apiKey", "in": "header", "name": "Authorization"},
            },
        },
    }
