"""protocol/http.py's rules for web apps (issue 14): repeated headers and their extension,
bodiless responses, X-Forwarded-*, the reverse proxy's Location and cookie Path rewrites."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.protocol.http import (
    expand_repeated_headers,
    forwarded_headers,
    response_has_body,
    rewrite_cookie_path,
    rewrite_location,
    split_repeated_headers,
)
from hybridrelay.protocol.messages import Response, encode_message, parse_message

NAMES = st.sampled_from(["Set-Cookie", "set-cookie", "Content-Type", "X-A", "WWW-Authenticate"])
VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


def test_three_cookies_travel_in_the_extension_and_azure_sees_the_first() -> None:
    headers = [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
        ("set-cookie", "c=3"),
    ]
    merged, repeated = split_repeated_headers(headers)
    assert merged == {"Content-Type": "text/plain", "Set-Cookie": "a=1; Path=/"}
    assert repeated == tuple(headers[1:])
    assert expand_repeated_headers(merged, repeated) == headers
    # The message as it goes on the wire, and back.
    message = Response("r1", 200, response_headers=merged, repeated_headers=repeated)
    text = encode_message(message)
    assert '"repeatedResponseHeaders":[["Set-Cookie","a=1; Path=/"]' in text
    assert parse_message(text) == message


def test_one_cookie_sends_no_extension() -> None:
    merged, repeated = split_repeated_headers([("Set-Cookie", "a=1"), ("X", "1"), ("X", "2")])
    assert merged == {"Set-Cookie": "a=1", "X": "1, 2"}
    assert repeated == ()
    assert "repeatedResponseHeaders" not in encode_message(
        Response("r", 200, response_headers=merged)
    )


@pytest.mark.parametrize(
    "value", ['"x"', '[["Set-Cookie"]]', '[["Set-Cookie", 1]]', '{"a": "b"}', "[1]"]
)
def test_a_malformed_extension_is_a_protocol_error(value: str) -> None:
    from hybridrelay.exceptions import ProtocolError

    text = (
        '{"response":{"requestId":"r","statusCode":200,"responseHeaders":{},'
        f'"repeatedResponseHeaders":{value}}}}}'
    )
    with pytest.raises(ProtocolError, match="repeatedResponseHeaders"):
        parse_message(text)


@given(st.lists(st.tuples(NAMES, VALUES), max_size=12))
def test_split_then_expand_keeps_every_unjoinable_value_in_order(
    headers: list[tuple[str, str]],
) -> None:
    merged, repeated = split_repeated_headers(headers)
    expanded = expand_repeated_headers(merged, repeated)
    for name in ("set-cookie", "www-authenticate"):
        original = [v for n, v in headers if n.lower() == name]
        assert [v for n, v in expanded if n.lower() == name] == original
    # What Azure's clients read is one value per name.
    assert len({name.lower() for name in merged}) == len(merged)


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [
        ("GET", 200, True),
        ("HEAD", 200, False),
        ("GET", 204, False),
        ("GET", 304, False),
        ("GET", 101, False),
        ("POST", 404, True),
        ("head", 500, False),
    ],
)
def test_response_has_body(method: str, status: int, expected: bool) -> None:
    assert response_has_body(method, status) is expected


def test_forwarded_headers_append_for_and_replace_the_rest() -> None:
    claimed = [
        ("X-Forwarded-For", "10.0.0.1, 10.0.0.2"),
        ("x-forwarded-proto", "gopher"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Prefix", "/elsewhere"),
        ("Accept", "*/*"),
    ]
    out = forwarded_headers(
        claimed, client="203.0.113.7", proto="https", host="relay.example.com", prefix="/api"
    )
    assert out == [
        ("Accept", "*/*"),
        ("X-Forwarded-For", "10.0.0.1, 10.0.0.2, 203.0.113.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "relay.example.com"),
        ("X-Forwarded-Prefix", "/api"),
    ]
    bare = forwarded_headers([], client=None, proto="http", host="h", prefix="/p")
    assert [name for name, _ in bare] == [
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Forwarded-Prefix",
    ]


UPSTREAM = "http://127.0.0.1:8000"
PUBLIC = "https://relay.example.com/api"


@pytest.mark.parametrize(
    ("upstream", "value", "expected"),
    [
        (UPSTREAM, "/small", "/api/small"),
        (UPSTREAM, "/", "/api/"),
        (UPSTREAM, "/a?b=1#c", "/api/a?b=1#c"),
        (UPSTREAM, "http://127.0.0.1:8000/small", f"{PUBLIC}/small"),
        (UPSTREAM, "HTTP://127.0.0.1:8000/x?q", f"{PUBLIC}/x?q"),
        (UPSTREAM, "http://127.0.0.1:8000", PUBLIC),
        (UPSTREAM, "http://127.0.0.1:8001/small", "http://127.0.0.1:8001/small"),
        (UPSTREAM, "https://127.0.0.1:8000/small", "https://127.0.0.1:8000/small"),
        (UPSTREAM, "https://example.org/", "https://example.org/"),
        (UPSTREAM, "//example.org/x", "//example.org/x"),
        (UPSTREAM, "relative/path", "relative/path"),
        (UPSTREAM, "http://127.0.0.1:bad/x", "http://127.0.0.1:bad/x"),
        ("http://localhost", "http://localhost:80/x", f"{PUBLIC}/x"),
        ("http://up:8000/base", "/base/x", "/api/x"),
        ("http://up:8000/base", "/base", "/api"),
        ("http://up:8000/base", "/based", "/based"),
        ("http://up:8000/base", "/other", "/other"),
        ("http://up:8000/base", "http://up:8000/base/x", f"{PUBLIC}/x"),
        ("http://up:8000/base", "http://up:8000/other", "http://up:8000/other"),
    ],
)
def test_rewrite_location(upstream: str, value: str, expected: str) -> None:
    assert rewrite_location(value, upstream=upstream, public=PUBLIC, public_path="/api") == expected


@given(st.text(max_size=60))
def test_rewrite_location_never_fails_and_only_touches_upstream_references(value: str) -> None:
    out = rewrite_location(value, upstream=UPSTREAM, public=PUBLIC, public_path="/api")
    if out != value:
        assert out.startswith(("/api", PUBLIC))
        assert value.startswith(("/", "http://127.0.0.1:8000", "HTTP://", "http://"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a=1; Path=/", "a=1; Path=/api"),
        ("a=1; path=/x; HttpOnly", "a=1; Path=/api/x; HttpOnly"),
        ("a=1", "a=1"),
        ("a=1; Domain=x; Secure", "a=1; Domain=x; Secure"),
        ("path=/v; Path=/", "path=/v; Path=/api"),  # the cookie's own name is not an attribute
    ],
)
def test_rewrite_cookie_path(value: str, expected: str) -> None:
    assert rewrite_cookie_path(value, prefix="/api") == expected
