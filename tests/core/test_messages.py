"""Control messages (PROTOCOL.md 4.2, 5.2, 6.2, 6.4, 4.6) and addressing (section 2)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.exceptions import ConfigurationError, ProtocolError
from hybridrelay.protocol import messages
from hybridrelay.protocol.addressing import (
    build_relay_url,
    filter_query,
    protocol_params,
    resolve_entity,
)
from hybridrelay.protocol.connection_string import ConnectionString
from hybridrelay.protocol.messages import (
    Accept,
    RemoteEndpoint,
    RenewToken,
    Request,
    Response,
    encode_message,
    encode_request,
    encode_response,
    header_text,
    parse_message,
)


def test_round_trips() -> None:
    messages: list[Accept | Request | Response | RenewToken] = [
        Accept(
            "wss://r/$hc/x?sb-hc-action=accept",
            "id1",
            {"Sec-WebSocket-Key": "k"},
            RemoteEndpoint("10.0.0.1", 1234),
        ),
        Request(
            "wss://r/a", "id2", "/hc/x?y=1", "POST", {"A": "b"}, RemoteEndpoint("::1", 1), True
        ),
        Request("wss://r/a", "id3"),
        Response("id2", 201, "Created", {"x": "y"}, True),
        RenewToken("SharedAccessSignature sr=..."),
    ]
    for message in messages:
        assert parse_message(encode_message(message)) == message


@pytest.mark.parametrize(
    "response",
    [
        Response("id2", 201, "Created", {"x": "y"}, True),
        Response("id3", 200, None, {}, False),
        Response("id4", 200, None, {"Set-Cookie": "a=1"}, True, (("Set-Cookie", "a=1"),)),
    ],
    ids=["reason", "no-reason-no-body", "repeated-headers"],
)
def test_encode_response_writes_what_encode_message_writes(response: Response) -> None:
    """The listener's fast path (no Response object) is the same JSON, byte for byte."""
    text = encode_response(
        response.request_id,
        response.status_code,
        response.status_description,
        response.response_headers,
        body=response.body,
        repeated_headers=response.repeated_headers,
    )
    assert text == encode_message(response)
    assert parse_message(text) == response


def _request_text_as_it_was(message: Request) -> str:
    """encode_message's text of a full request before encode_request (the reference)."""
    body: dict[str, object] = {"address": message.address, "id": message.id}
    body["requestTarget"] = message.request_target or "/"
    body["method"] = message.method
    if message.remote_endpoint is not None:
        body["remoteEndpoint"] = message.remote_endpoint.to_json()
    body["requestHeaders"] = messages._wire_headers(message.request_headers or {})
    body["body"] = bool(message.body)
    return messages._dumps({"request": body})


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=30),
    st.text(max_size=30),
    st.none() | st.text(max_size=30),
    st.text(min_size=1, max_size=10),
    st.none() | st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
    st.none() | st.builds(RemoteEndpoint, st.text(max_size=15), st.integers(0, 65535)),
    st.booleans(),
)
def test_encode_request_writes_what_encode_message_wrote(
    address: str,
    request_id: str,
    target: str | None,
    method: str,
    headers: dict[str, str] | None,
    remote: RemoteEndpoint | None,
    body: bool,
) -> None:
    """The relay's fast path (no Request object) is the same JSON, byte for byte, as
    encode_message of the Request, and as that wrote before it used encode_request."""
    text = encode_request(address, request_id, target, method, headers, remote, body=body)
    request = Request(address, request_id, target, method, headers, remote, body)
    assert text == encode_message(request) == _request_text_as_it_was(request)


def test_address_only_request_omits_method_and_body() -> None:
    text = encode_message(Request("wss://r/a", "id3"))
    assert json.loads(text) == {"request": {"address": "wss://r/a", "id": "id3"}}
    parsed = parse_message(text)
    assert isinstance(parsed, Request) and parsed.address_only


def test_lenient_parsing_of_microsoft_clients() -> None:
    # statusCode as a string (doc example) and as a number (Node/.NET).
    for code in ('"200"', "200"):
        text = '{"response":{"requestId":"r","statusCode":' + code + ',"body":false}}'
        parsed = parse_message(text)
        assert isinstance(parsed, Response) and parsed.status_code == 200
    # hyco-https sends lower-case header names, no description.
    parsed = parse_message(
        '{"response":{"requestId":"r","statusCode":204,"responseHeaders":{"x-a":"1"},"body":false}}'
    )
    assert isinstance(parsed, Response) and parsed.response_headers == {"x-a": "1"}
    assert parse_message('{"unknownFuture":{"a":1}}') is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        "{}",
        "{bad",
        '{"accept":1}',
        '{"accept":{"address":1,"id":"x"}}',
        '{"response":{"requestId":"r","statusCode":true}}',
        '{"response":{"requestId":"r","statusCode":"abc"}}',
        '{"response":{"requestId":"r","statusCode":42}}',
        '{"accept":{"address":"a","id":"i","remoteEndpoint":{"address":1}}}',
        '{"request":{"address":"a","id":"i","body":"yes"}}',
        "[" * 100000,
    ],
)
def test_malformed_messages_are_protocol_errors(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_message(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.sampled_from(["accept", "request", "response", "renewToken", "other"]), json_values)
def test_parse_message_fuzz_structured(kind: str, body: object) -> None:
    try:
        parse_message(json.dumps({kind: body}))
    except ProtocolError:
        pass


@given(st.text(max_size=500) | st.binary(max_size=500))
def test_parse_message_fuzz_raw(text: str | bytes) -> None:
    try:
        parse_message(text)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    ("raw", "expected"),
    [  # The [dotnet] test table of PROTOCOL.md 6.2.
        ("a=1&a=2", "a=1&a=2"),
        ("a=1&a=2&", "a=1&a=2&"),
        ("&&&", "&&&"),
        ("sb-hc-id=1", ""),
        ("sb-hc-id=1&custom=value", "custom=value"),
        ("custom=value&sb-hc-id=1", "custom=value"),
        ("sb-hc-undefined", "sb-hc-undefined"),
        ("sb-hc-whatever=&foo=bar", "foo=bar"),
        ("+", "+"),
        ("%2B", "%2B"),
        ("%2f%3a%3d%26", "%2f%3a%3d%26"),
        ("key='value'", "key='value'"),
    ],
)
def test_filter_query(raw: str, expected: str) -> None:
    assert filter_query(raw) == expected


def test_protocol_params_and_urls() -> None:
    assert protocol_params("a=1&sb-hc-action=listen&sb-hc-token=Shared%20x%2By&sb-hc-id=") == {
        "sb-hc-action": "listen",
        "sb-hc-token": "Shared x+y",
        "sb-hc-id": "",
    }
    assert protocol_params("sb-hc-token=a+b") == {"sb-hc-token": "a b"}
    url = build_relay_url(
        "wss://h:1/",
        "a/b c",
        action="connect",
        suffix="/s",
        app_query="q=1",
        params={"sb-hc-id": "x y"},
    )
    assert url == "wss://h:1/$hc/a/b%20c/s?q=1&sb-hc-action=connect&sb-hc-id=x%20y"
    entities = {"a": "A", "a/b": "AB"}
    assert resolve_entity("a/b/c", entities.get) == ("AB", "/c")
    assert resolve_entity("/a/b/", entities.get) == ("AB", "")
    assert resolve_entity("a/bc", entities.get) == ("A", "/bc")
    assert resolve_entity("a//b", entities.get) == ("A", "//b")
    assert resolve_entity("A/B", lambda p: entities.get(p.lower())) == ("AB", "")
    assert resolve_entity("ab", entities.get) is None
    assert resolve_entity("", entities.get) is None
    nothing: dict[str, str] = {}
    assert resolve_entity("x", nothing.get) is None


def test_connection_strings() -> None:
    cs = ConnectionString.parse(
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=abc=;EntityPath=hc"
    )
    assert (cs.host, cs.key_name, cs.key, cs.entity_path) == (
        "ns.servicebus.windows.net",
        "k",
        "abc=",
        "hc",
    )
    assert cs.base_url() == "wss://ns.servicebus.windows.net"
    assert "abc=" not in repr(cs)
    assert ConnectionString.parse(str(cs)) == cs
    plain = ConnectionString.parse(
        "endpoint=ws://127.0.0.1:9400/;sharedaccesssignature=SharedAccessSignature sr=x"
    )
    assert plain.base_url() == "ws://127.0.0.1:9400" and plain.token
    for bad in (
        "",
        "Endpoint=ftp://x/",
        "Endpoint=sb://x/;Bogus=1",
        "Endpoint=sb://x/;SharedAccessKeyName=k",
        "Endpoint=sb://x/;SharedAccessKeyName=k;SharedAccessKey=v;SharedAccessSignature=t",
        "Endpoint",
    ):
        with pytest.raises(ConfigurationError):
            ConnectionString.parse(bad)


@given(st.text(max_size=200))
def test_connection_string_fuzz(text: str) -> None:
    try:
        ConnectionString.parse(text)
    except ConfigurationError:
        pass


def test_failure_limiter() -> None:
    from hybridrelay.server.ratelimit import FailureLimiter

    limiter = FailureLimiter(limit=3, window=10.0, max_sources=2)
    for t in range(3):
        assert not limiter.blocked("a", float(t))
        limiter.record_failure("a", float(t))
    assert limiter.blocked("a", 5.0)
    assert not limiter.blocked("a", 10.5)  # the window passed
    limiter.record_failure("b", 0.0)
    limiter.record_failure("c", 0.0)
    limiter.record_failure("d", 0.0)  # bounded: the oldest source is forgotten
    assert len(limiter._failures) == 2


def test_tls_read_buffer_setting_reaches_asyncio() -> None:
    import asyncio.sslproto

    from hybridrelay.transport.tuning import set_tls_read_buffer

    # The setting replaces asyncio's class process-wide: put it back, so that the tests after
    # this one run on the class they would run on without it.
    before = asyncio.sslproto.SSLProtocol
    try:
        set_tls_read_buffer(64 * 1024)
        assert asyncio.sslproto.SSLProtocol.max_size == 64 * 1024
        with pytest.raises(ValueError, match="16 KiB"):
            set_tls_read_buffer(4096)
    finally:
        asyncio.sslproto.SSLProtocol = before  # type: ignore[misc]


@given(st.binary(max_size=64))
def test_header_text_never_leaves_a_lone_surrogate(raw: bytes) -> None:
    """What a server decoded with surrogateescape reaches the listener as valid text: the
    UTF-8 reading where the bytes are UTF-8, else ISO-8859-1's (byte for byte)."""
    text = header_text(raw.decode("utf-8", "surrogateescape"))
    text.encode("utf-8")  # no lone surrogates
    try:
        expected = raw.decode("utf-8")
    except UnicodeDecodeError:
        expected = raw.decode("latin-1")
    assert text == expected


def test_non_utf8_header_bytes_reach_the_listener_as_latin1() -> None:
    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    text = encode_message(Accept(address="wss://r/$hc/x", id="1", connect_headers={"X": value}))
    assert "\\ud" not in text
    assert json.loads(text)["accept"]["connectHeaders"] == {"X": "café"}


T = TypeVar("T")


def _with_stdlib_json(call: Callable[[], T]) -> T:
    """``call()`` with the stdlib's json in place of orjson (as where orjson is missing)."""
    fast = messages.__dict__["orjson"]
    setattr(messages, "orjson", None)  # noqa: B010 (not an attribute messages exports)
    try:
        return call()
    finally:
        setattr(messages, "orjson", fast)  # noqa: B010


def _outcome(text: str) -> object:
    try:
        return parse_message(text)
    except ProtocolError:
        return ProtocolError


def test_orjson_is_what_writes_and_reads_here() -> None:
    # This machine has it (a dependency): the tests below compare it with the stdlib's path.
    assert messages.__dict__["orjson"] is not None


_texts = st.text(st.characters(exclude_categories=["Cs"])) | st.text(
    '\udc80\udcff\u00e9\u2028\U0001f600\x00\x7f"\\a'
)


@settings(max_examples=80, deadline=None)
@given(_texts, _texts, st.dictionaries(_texts, _texts, max_size=4), st.integers(0, 65535))
def test_orjson_and_the_stdlib_write_the_same_messages(
    address: str, text: str, headers: dict[str, str], port: int
) -> None:
    sent: list[Accept | Request | Response | RenewToken] = [
        Accept(address, text, headers, RemoteEndpoint(text, port)),
        Request(address, text, text, text, headers, RemoteEndpoint(text, port), True),
        Response(text, 200, text, headers, False, ((text, address),)),
        RenewToken(text),
    ]
    for message in sent:
        fast = encode_message(message)
        slow = _with_stdlib_json(functools.partial(encode_message, message))
        assert json.loads(fast) == json.loads(slow)
        if fast.isascii() and fast.isprintable():
            assert fast == slow  # byte for byte where nothing needs escaping (DEL does)


_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=8,
)
_members = st.sampled_from(["accept", "request", "response", "renewToken", "other"])
_fields = st.sampled_from(
    ["address", "id", "requestId", "statusCode", "responseHeaders", "remoteEndpoint", "token"]
)


@settings(max_examples=150, deadline=None)
@given(_members, st.dictionaries(_fields, _documents, max_size=5), st.booleans())
def test_orjson_and_the_stdlib_read_the_same_messages(
    member: str, body: dict[str, object], ascii_only: bool
) -> None:
    text = json.dumps({member: body}, ensure_ascii=ascii_only)
    assert _outcome(text) == _with_stdlib_json(functools.partial(_outcome, text))


@pytest.mark.parametrize(
    "text",
    [
        '{"response": {"requestId": "\\ud800", "statusCode": 200}}',  # a lone surrogate escape
        '{"response": {"requestId": "a", "statusCode": NaN}}',
        '{"renewToken": {"token": "t"}, "x": Infinity}',
        "not json",
        '{"response": ',
    ],
)
def test_what_orjson_refuses_the_stdlib_decides(text: str) -> None:
    assert _outcome(text) == _with_stdlib_json(functools.partial(_outcome, text))


def _headers_as_the_loop_made_them(value: dict[str, object]) -> dict[str, str] | str:
    """messages._headers' loop alone (before its all-strings shortcut): the reference."""
    headers: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, list):
            item = ", ".join(str(v) for v in item)
        if not isinstance(item, str | int | float):
            return "ProtocolError"
        headers[str(name)] = str(item)
    return headers


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=5)
    | st.dictionaries(st.text(max_size=8), json_values, max_size=5)
)
def test_headers_shortcut_reads_what_the_loop_read(value: dict[str, object]) -> None:
    try:
        got: dict[str, str] | str | None = messages._headers({"h": value}, "h")
    except ProtocolError:
        got = "ProtocolError"
    assert got == _headers_as_the_loop_made_them(value)
    if isinstance(got, dict):
        assert got is not value  # a dict of its own, as the loop made


_VALID_RESPONSE = {
    "requestId": st.text(max_size=8),
    "statusCode": st.integers(100, 999),
    "statusDescription": st.none() | st.text(max_size=8),
    "responseHeaders": st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    "body": st.booleans(),
}
_ODD_VALUES = {
    "requestId": json_values,
    "statusCode": st.integers(-5, 1200) | st.sampled_from(["200", " 404 ", True, 200.0, None]),
    "statusDescription": json_values,
    "responseHeaders": st.dictionaries(st.text(max_size=6), json_values, max_size=3) | json_values,
    "body": json_values,
    "repeatedResponseHeaders": st.just([["Set-Cookie", "a=1"]]) | json_values,
}


@st.composite
def _response_fields(draw: st.DrawFn) -> dict[str, object]:
    """A valid ``response`` body with none, one or two of its fields made odd or left out."""
    body = {key: draw(value) for key, value in _VALID_RESPONSE.items()}
    for key in draw(st.lists(st.sampled_from(sorted(_ODD_VALUES)), max_size=2)):
        if draw(st.booleans()):
            body[key] = draw(_ODD_VALUES[key])
        else:
            body.pop(key, None)
    return body


@settings(max_examples=300)
@given(_response_fields())
def test_the_common_response_is_read_as_the_checked_parse_reads_it(body: dict[str, object]) -> None:
    """``_parse_response``'s shortcut for the common response gives what the checked parse
    gives, or the same ProtocolError, for any ``response`` body."""

    def parsed(parse: Callable[[dict[str, object]], object]) -> object:
        try:
            return parse(json.loads(json.dumps(body)))
        except ProtocolError as exc:
            return ("error", str(exc))

    assert parsed(messages._parse_response) == parsed(messages._parse_response_checked)
