"""Fuzzing the parsers of network input that had no fuzzer of their own (issue 17, "Proof").

Each parser gets arbitrary input and may only answer with a value or its one documented error
(the caller turns that into a clear refusal); anything else would be a 500 or a dead task.
The others are fuzzed beside their unit tests; docs/RELIABILITY.md lists every parser with its
fuzzer. The raw HTTP requests are in tests/reliability/test_fuzz_http_requests.py (they drive
a real relay); the atheris harnesses of the same parsers are in fuzz/.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.exceptions import ConfigurationError, ProtocolError
from hybridrelay.protocol.addressing import filter_query, parse_endpoint
from hybridrelay.protocol.allowlist import parse_network
from hybridrelay.protocol.arm import (
    ArmError,
    parse_check_name,
    parse_hybrid_connection_put,
    parse_namespace_put,
    parse_regenerate_keys,
    parse_route,
    parse_rule_put,
)
from hybridrelay.protocol.azbridge import Reply, ReplyDecoder
from hybridrelay.protocol.connection_string import ConnectionString

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=10,
)

#: Documents shaped like ARM bodies (the keys the parsers look for, any values), so that the
#: fuzzer gets past "must be a JSON object" into the field checks.
arm_keys = st.sampled_from(
    [
        "properties",
        "requiresClientAuthorization",
        "userMetadata",
        "rights",
        "keyType",
        "key",
        "name",
        "type",
        "sku",
        "tier",
        "tags",
        "location",
    ]
)
arm_documents = st.recursive(
    json_values,
    lambda children: st.dictionaries(arm_keys, children, max_size=6),
    max_leaves=10,
)

ARM_BODY_PARSERS = [
    parse_hybrid_connection_put,
    parse_rule_put,
    parse_regenerate_keys,
    parse_namespace_put,
    parse_check_name,
]


def _parse_arm_body(document: Any) -> None:
    for parse in ARM_BODY_PARSERS:
        try:
            parse(document)
        except ArmError as error:
            assert 400 <= error.status < 500


@settings(max_examples=40)
@given(st.one_of(json_values, arm_documents))
def test_management_bodies_get_an_arm_error_or_a_value(document: Any) -> None:
    _parse_arm_body(document)


@given(st.binary(max_size=200))
def test_management_bodies_as_bytes(raw: bytes) -> None:
    """The management API decodes a body as arm_api._body does, then parses it."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return  # answered 400 InvalidRequestContent
    _parse_arm_body(document)


@given(st.text(max_size=300))
def test_management_routes(path: str) -> None:
    try:
        parse_route(path)
    except ArmError as error:
        assert error.status in (400, 404, 405)


@settings(max_examples=50)
@given(st.one_of(st.text(max_size=120), st.from_regex(r"(sb|wss?|https?)://[^/]{0,30}/?.{0,20}")))
def test_endpoints(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except ConfigurationError:
        return
    assert endpoint.base_url.startswith(("ws://", "wss://"))
    assert endpoint.host and endpoint.host in endpoint.base_url


@given(st.text(max_size=200))
def test_query_filter_keeps_everything_but_the_relays_parameters(raw: str) -> None:
    kept = filter_query(raw)
    assert all(not (p.startswith("sb-hc-") and "=" in p) for p in kept.split("&"))
    assert len(kept) <= len(raw)


@settings(max_examples=50)
@given(st.text(max_size=60))
def test_allow_list_entries(text: str) -> None:
    try:
        parse_network(text)
    except ValueError:
        pass


@given(st.binary(max_size=12), st.lists(st.integers(1, 12), max_size=4))
def test_preamble_replies_in_any_split(raw: bytes, cuts: list[int]) -> None:
    """The ingress's decoder of the edge's three-byte reply: a Reply, or ProtocolError; the
    bytes behind it are kept, whatever the reads' boundaries."""
    decoder = ReplyDecoder()
    pos = 0
    reply: Reply | None = None
    try:
        for cut in [*sorted(set(cuts)), len(raw)]:
            if cut > pos and reply is None:
                reply = decoder.feed(raw[pos:cut])
                pos = cut
    except ProtocolError:
        assert len(raw) >= 3
        return
    if len(raw) < 3:
        assert reply is None
    else:
        assert reply is not None and reply.value == raw[:3]
        assert decoder.rest == raw[3:pos]


@pytest.mark.parametrize(
    "endpoint", ["sb://[abc/", "sb://[::1/", "sb://h:99999/", "sb://h:port/", "ws://h:-1/"]
)
def test_connection_string_with_a_malformed_endpoint_is_a_configuration_error(
    endpoint: str,
) -> None:
    """Found by fuzz/fuzz_parsers.py connection_string: urlsplit's ValueError (an unclosed
    IPv6 bracket) escaped as a traceback; a bad port passed and failed later."""
    with pytest.raises(ConfigurationError, match="Endpoint must look like"):
        ConnectionString.parse(f"Endpoint={endpoint};SharedAccessKeyName=a;SharedAccessKey=b")


@given(
    st.builds(
        "Endpoint={}://{}{};SharedAccessKeyName=k;SharedAccessKey=v".format,
        st.sampled_from(["sb", "ws", "wss", "https"]),
        st.text(st.sampled_from("[]:.%@/0123456789abc"), max_size=16),
        st.sampled_from(["", "/", ":1/", ":65536/", ":x/"]),
    )
)
def test_connection_string_endpoints_near_the_url_rules(text: str) -> None:
    try:
        ConnectionString.parse(text)
    except ConfigurationError:
        pass
