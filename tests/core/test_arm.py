"""The Microsoft.Relay REST shapes (protocol/arm.py): pure, no sockets."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.auth.sas import Rights
from hybridrelay.protocol.arm import (
    PAGE_SIZE,
    ArmError,
    KeyType,
    Kind,
    Route,
    Scope,
    access_keys_body,
    arm_time,
    check_name_body,
    hybrid_connection_body,
    namespace_body,
    new_key,
    page_body,
    parse_hybrid_connection_put,
    parse_regenerate_keys,
    parse_route,
    parse_rule_put,
    rule_body,
    validate_hybrid_connection_name,
    validate_namespace_name,
)

ARM = "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.Relay"
NS = f"{ARM}/namespaces/contoso"
SCOPE = Scope("sub-1", "rg-1", "contoso")
WHEN = datetime.datetime(2026, 12, 2, 7, 33, 19, 478280, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/providers/Microsoft.Relay/operations", Route(Kind.OPERATIONS, Scope("", ""))),
        (
            "/subscriptions/s/providers/Microsoft.Relay/namespaces",
            Route(Kind.NAMESPACES, Scope("s", "")),
        ),
        (
            "/subscriptions/s/providers/microsoft.relay/checkNameAvailability",
            Route(Kind.CHECK_NAME, Scope("s", "")),
        ),
        (f"{ARM}/namespaces", Route(Kind.NAMESPACES, Scope("sub-1", "rg-1"))),
        (NS, Route(Kind.NAMESPACE, SCOPE)),
        (f"{NS}/authorizationRules", Route(Kind.RULES, SCOPE)),
        (f"{NS}/authorizationRules/root", Route(Kind.RULE, SCOPE, rule="root")),
        (f"{NS}/authorizationRules/root/listKeys", Route(Kind.LIST_KEYS, SCOPE, rule="root")),
        (
            f"{NS}/AUTHORIZATIONRULES/root/RegenerateKeys",
            Route(Kind.REGENERATE_KEYS, SCOPE, rule="root"),
        ),
        (f"{NS}/hybridConnections", Route(Kind.HYBRID_CONNECTIONS, SCOPE)),
        (f"{NS}/hybridConnections/hc", Route(Kind.HYBRID_CONNECTION, SCOPE, "hc")),
        # An encoded slash stays inside the name; other escapes are decoded.
        (f"{NS}/hybridConnections/team%2Fa", Route(Kind.HYBRID_CONNECTION, SCOPE, "team/a")),
        (f"{NS}/hybridConnections/a%20b/", Route(Kind.HYBRID_CONNECTION, SCOPE, "a b")),
        (f"{NS}/hybridConnections/hc/authorizationRules", Route(Kind.RULES, SCOPE, "hc")),
        (
            f"{NS}/hybridConnections/hc/authorizationRules/edge/listKeys",
            Route(Kind.LIST_KEYS, SCOPE, "hc", "edge"),
        ),
        (f"{NS}/wcfRelays", Route(Kind.WCF_RELAYS, SCOPE)),
        (f"{NS}/wcfRelays/x", Route(Kind.UNSUPPORTED, SCOPE)),
        (f"{NS}/networkRuleSets/default", Route(Kind.UNSUPPORTED, SCOPE)),
        (f"{NS}/privateEndpointConnections", Route(Kind.UNSUPPORTED, SCOPE)),
    ],
)
def test_routes(path: str, expected: Route) -> None:
    assert parse_route(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/subscriptions",
        "/subscriptions/s",
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Other/namespaces",
        f"{NS}/hybridConnections/hc/authorizationRules/edge/listKeys/more",
        f"{NS}/hybridConnections/hc/elsewhere",
        f"{NS}/authorizationRules/root/rotate",
        f"{NS}/queues",
        f"{NS}/hybridConnections/%ff",
    ],
)
def test_unknown_routes_are_404(path: str) -> None:
    with pytest.raises(ArmError) as caught:
        parse_route(path)
    assert caught.value.status == 404
    assert caught.value.body()["error"]["code"] == "NotFound"


def test_methods() -> None:
    assert parse_route(NS).allows("patch")
    assert not parse_route(f"{NS}/hybridConnections").allows("PUT")
    assert parse_route(f"{NS}/authorizationRules/r/listKeys").allows("POST")
    assert not parse_route(f"{NS}/hybridConnections/hc").allows("PATCH")


@given(st.text(max_size=200))
def test_parse_route_never_raises_anything_else(path: str) -> None:
    try:
        route = parse_route(path)
    except ArmError as exc:
        assert exc.status == 404
    else:
        assert isinstance(route.kind, Kind)


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6))
def test_any_percent_encoded_name_round_trips(names: list[str]) -> None:
    from urllib.parse import quote

    name = "/".join(names)
    route = parse_route(f"{NS}/hybridConnections/{quote(name, safe='')}")
    assert route.kind is Kind.HYBRID_CONNECTION and route.hybrid_connection == name


def test_names() -> None:
    assert validate_namespace_name("contoso") is None
    assert validate_namespace_name("a-12345") is None
    for bad in ("short", "1starts", "ends-", "x" * 51, "under_score"):
        assert validate_namespace_name(bad), bad
    for good in ("hc", "plant/line-1/plc", "a.b_c-d", "x" * 260):
        assert validate_hybrid_connection_name(good) is None, good
    for bad in ("", "x" * 261, "a//b", "/a", "a/", "a/../b", "a/./b", "-a", "a b", "é"):
        assert validate_hybrid_connection_name(bad), bad


def test_request_bodies() -> None:
    change = parse_hybrid_connection_put(
        {"properties": {"requiresClientAuthorization": False, "userMetadata": "m", "x": 1}}
    )
    assert change.requires_client_authorization is False and change.user_metadata == "m"
    assert parse_hybrid_connection_put({}).requires_client_authorization is None
    assert parse_hybrid_connection_put({"properties": None}).user_metadata is None
    bad_bodies: list[Any] = [
        [],
        {"properties": []},
        {"properties": {"requiresClientAuthorization": "yes"}},
        {"properties": {"userMetadata": 5}},
        {"properties": {"userMetadata": "x" * 1025}},
    ]
    for bad in bad_bodies:
        with pytest.raises(ArmError) as caught:
            parse_hybrid_connection_put(bad)
        assert caught.value.status == 400

    assert parse_rule_put({"properties": {"rights": ["listen", "Send"]}}) == (
        Rights.LISTEN | Rights.SEND
    )
    every = Rights.LISTEN | Rights.SEND | Rights.MANAGE
    assert parse_rule_put({"properties": {"rights": ["Manage", "Listen", "Send", "send"]}}) == every
    for rights in ([], ["Manage"], ["Manage", "Listen"], ["Fly"], "Listen", [1]):
        with pytest.raises(ArmError) as caught:
            parse_rule_put({"properties": {"rights": rights}})
        assert caught.value.status == 400, rights

    assert parse_regenerate_keys({"keyType": "PrimaryKey"}) == (KeyType.PRIMARY, None)
    given_key = "k" * 32
    assert parse_regenerate_keys({"keyType": "SecondaryKey", "key": given_key}) == (
        KeyType.SECONDARY,
        given_key,
    )
    for bad in ({"keyType": "Primary"}, {}, {"keyType": "PrimaryKey", "key": "short"}, None):
        with pytest.raises(ArmError):
            parse_regenerate_keys(bad)


def test_keys_are_random_base64_of_32_bytes() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(base64.b64decode(key, validate=True)) == 32 for key in keys)


def test_response_bodies() -> None:
    assert arm_time(WHEN) == "2026-12-02T07:33:19.478280Z"
    namespace = namespace_body(
        SCOPE, created_at=WHEN, updated_at=WHEN, service_bus_endpoint="https://h:1/", tags={}
    )
    assert namespace["id"] == NS
    assert namespace["properties"]["provisioningState"] == "Succeeded"
    hc = hybrid_connection_body(
        SCOPE,
        "team/a",
        created_at=WHEN,
        updated_at=WHEN,
        listener_count=2,
        requires_client_authorization=True,
        user_metadata=None,
    )
    assert hc["id"] == f"{NS}/hybridConnections/team%2Fa"
    assert hc["properties"]["listenerCount"] == 2 and "userMetadata" not in hc["properties"]
    rule = rule_body(SCOPE, "edge", Rights.SEND | Rights.LISTEN, hybrid_connection="hc")
    assert rule["id"] == f"{NS}/hybridConnections/hc/authorizationRules/edge"
    assert rule["type"] == "Microsoft.Relay/Namespaces/HybridConnections/AuthorizationRules"
    assert rule["properties"]["rights"] == ["Listen", "Send"]
    keys = access_keys_body("sb://h:1/", "edge", "p" * 44, "s" * 44, hybrid_connection="hc")
    assert keys["primaryConnectionString"] == (
        f"Endpoint=sb://h:1/;SharedAccessKeyName=edge;SharedAccessKey={'p' * 44};EntityPath=hc"
    )
    assert (
        "EntityPath"
        not in access_keys_body("sb://h/", "root", "p", "s")["secondaryConnectionString"]
    )
    assert check_name_body("contoso", taken=True)["reason"] == "NameInUse"
    assert check_name_body("no", taken=False)["reason"] == "InvalidName"
    assert check_name_body("fresh-name", taken=False)["nameAvailable"] is True


def test_paging() -> None:
    items = [{"n": i} for i in range(PAGE_SIZE * 2 + 5)]
    base = "https://h:1/x/hybridConnections"
    first = page_body(items, None, base)
    assert len(first["value"]) == PAGE_SIZE
    assert first["nextLink"] == f"{base}?api-version=2017-04-01&$skipToken={PAGE_SIZE}"
    second = page_body(items, str(PAGE_SIZE), base)
    assert second["value"][0] == {"n": PAGE_SIZE}
    last = page_body(items, str(PAGE_SIZE * 2), base)
    assert len(last["value"]) == 5 and "nextLink" not in last
    assert page_body([], None, base) == {"value": []}
    for bad in ("x", "-1"):
        with pytest.raises(ArmError):
            page_body(items, bad, base)
