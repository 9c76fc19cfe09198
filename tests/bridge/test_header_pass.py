"""`-H`'s one-pass header rules give what the rules one after the other give.

``HttpReverseProxy.upstream_headers_for`` and ``.downstream_response`` look at each header
once (the bridge's CPU per relayed request); the protocol module's rules applied in turn
(``without_hop_by_hop``, ``forwarded_headers``, ``Via``, ``Location``/cookie rewriting,
``split_repeated_headers``) stay the reference, and here they are compared on drawn headers:
names from the ones the rules treat specially (in any case), and others.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.bridge.http_forward import HttpReverseProxy

_SPECIAL = [
    "Connection",
    "Keep-Alive",
    "Transfer-Encoding",
    "Content-Length",
    "Host",
    "TE",
    "Trailer",
    "Upgrade",
    "Close",
    "Proxy-Connection",
    "Proxy-Authorization",
    "Proxy-Authenticate",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Forwarded-Prefix",
    "Via",
    "Location",
    "Content-Location",
    "Set-Cookie",
    "WWW-Authenticate",
    "Accept",
    "X-Custom",
    "Date",
]


def _cased(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


_NAMES = st.one_of(
    st.sampled_from(_SPECIAL).flatmap(_cased),
    st.text(alphabet="abcxyz-", min_size=1, max_size=6),
)
# Values that matter to the rules: lists of names (Connection), addresses (X-Forwarded-For),
# hops (Via), URLs on and off the upstream (Location), cookies with paths, numbers.
_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "close",
            "keep-alive, x-custom",
            "Set-Cookie, via",
            " , X-Forwarded-For",
            "203.0.113.7, 198.51.100.2",
            " , 10.0.0.1,",
            "1.0 proxy",
            "http://127.0.0.1:8000/next?x=1",
            "http://127.0.0.1:8000",
            "https://elsewhere.example/x",
            "/base/page",
            "/other",
            "//host/x",
            "a=1; Path=/x; HttpOnly",
            "b=2; path=/",
            "13",
            "x",
            "Basic realm=a, Bearer",
        ]
    ),
    st.text(alphabet="ab ,;=/:0123456789", max_size=12),
)
_HEADERS = st.lists(st.tuples(_NAMES, _VALUES), max_size=10)


def _proxy(target: str, rewrite_cookies: bool) -> HttpReverseProxy:
    return HttpReverseProxy(
        target,
        entity_path="hc",
        relay_host="relay.example:8443",
        secure=True,
        rewrite_cookie_path=rewrite_cookies,
    )


@pytest.mark.parametrize("target", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/base"])
@given(headers=_HEADERS, client=st.sampled_from([None, "", "192.0.2.1"]))
def test_upstream_headers_in_one_pass(
    target: str, headers: list[tuple[str, str]], client: str | None
) -> None:
    proxy = _proxy(target, False)
    assert proxy.upstream_headers_for(headers, client) == proxy._upstream_headers_by_rule(
        headers, client
    )


@pytest.mark.parametrize("target", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/base"])
@pytest.mark.parametrize("rewrite_cookies", [False, True])
@given(headers=_HEADERS)
def test_downstream_response_in_one_pass(
    target: str, rewrite_cookies: bool, headers: list[tuple[str, str]]
) -> None:
    proxy = _proxy(target, rewrite_cookies)
    merged, repeated, length = proxy.downstream_response(headers)
    reference = proxy._downstream_response_by_rule(headers)
    assert (merged, repeated, length) == reference
    assert list(merged) == list(reference[0])  # the order of responseHeaders too


def test_the_one_pass_rules_on_a_typical_exchange() -> None:
    proxy = _proxy("http://127.0.0.1:8000", True)
    assert proxy.upstream_headers_for(
        [("Accept", "*/*"), ("X-Forwarded-For", "203.0.113.7"), ("Via", "1.0 edge")], "192.0.2.1"
    ) == [
        ("Host", "relay.example:8443"),
        ("Accept", "*/*"),
        ("X-Forwarded-For", "203.0.113.7, 192.0.2.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "relay.example:8443"),
        ("X-Forwarded-Prefix", "/hc"),
        ("Via", "1.0 edge, 1.1 hybridrelay"),
    ]
    merged, repeated, length = proxy.downstream_response(
        [
            ("content-length", "13"),
            ("location", "http://127.0.0.1:8000/next"),
            ("set-cookie", "a=1; Path=/x"),
            ("Set-Cookie", "b=2; Path=/"),
            ("keep-alive", "timeout=5"),
        ]
    )
    assert merged == {
        "content-length": "13",
        "location": "https://relay.example:8443/hc/next",
        "set-cookie": "a=1; Path=/hc/x",
        "Via": "1.1 hybridrelay",
    }
    assert repeated == (("set-cookie", "a=1; Path=/hc/x"), ("Set-Cookie", "b=2; Path=/hc"))
    assert length == 13
