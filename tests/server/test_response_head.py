"""The response head's one-pass header rule (http_relay._plain_response_headers) against the
general one it stands in for: the same pairs, in the same order, or the general path taken."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.protocol.http import expand_repeated_headers
from hybridrelay.protocol.messages import Response
from hybridrelay.server.config import RelayConfig, ServerSettings
from hybridrelay.server.context import RelayContext
from hybridrelay.server.http_relay import (
    HttpRelay,
    ResponseHead,
    _plain_response_headers,
    forwarded_response_headers,
)

_names = st.sampled_from(
    [
        "Content-Type",
        "content-length",
        "Connection",
        "Keep-Alive",
        "Via",
        "X-Drop",
        "x-drop",
        "Set-Cookie",
        "Transfer-Encoding",
        "TE",
        "Upgrade",
        "Bad Name",
        "Bad:Name",
        "",
    ]
) | st.text(max_size=8)
_values = st.sampled_from(["x", "close", "X-Drop, keep-alive", "a\r\nb", "1.1 up", "12", ""]) | (
    st.text(max_size=12)
)


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(_names, _values, max_size=6),
    st.lists(st.tuples(st.sampled_from(["Set-Cookie", "set-cookie", "X-A"]), _values), max_size=3),
)
def test_one_pass_is_the_general_rule(
    headers: dict[str, str], repeated: list[tuple[str, str]]
) -> None:
    response = Response("id", 200, None, headers, False, tuple(repeated))
    general = forwarded_response_headers(expand_repeated_headers(headers, tuple(repeated)))
    fast = _plain_response_headers(response)
    if fast is not None:
        assert fast == general
    else:  # only where the general path is needed
        assert repeated or any(name.lower() == "connection" for name in headers)


def test_the_common_response_takes_the_one_pass() -> None:
    response = Response("id", 200, "OK", {"Content-Type": "text/plain", "Content-Length": "5"})
    assert _plain_response_headers(response) == [
        ("Content-Type", "text/plain"),
        ("Content-Length", "5"),
    ]


_POOL = [
    Response("a", 200, "OK", {"Content-Type": "text/plain", "Content-Length": "5"}),
    Response("b", 200, "OK", {"Content-Length": "5", "Content-Type": "text/plain"}),
    Response("c", 200, "Fine", {"Content-Type": "text/plain", "Content-Length": "5"}),
    Response("d", 404, "OK", {"Content-Type": "text/plain", "Content-Length": "5"}),
    Response("e", 200, None, {"Content-Type": "text/plain", "Content-Length": "7"}),
    Response("f", 200, "OK", {"Content-Type": "text/plain"}, False, (("Set-Cookie", "a=1"),)),
    Response("g", 204, "OK", {"Via": "1.1 up"}),
    Response("h", 101, "OK", {}),
    Response("i", 200, "OK", {"Content-Type": "text/html", "Content-Length": "5"}),
    Response("j", 200, "OK", {"X-A": "1", "X-B": "2"}),
    Response("k", 200, "OK", {"X-B": "2", "X-A": "1"}),
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(_POOL),
            st.sampled_from(["GET", "HEAD"]),
            st.sampled_from(["relay.example", "other.example"]),
            st.sampled_from([None, "ns.example"]),
        ),
        max_size=12,
    )
)
def test_a_repeated_response_head_is_the_head_made_anew(
    responses: list[tuple[Response, str, str, str | None]],
) -> None:
    """``response_head`` gives its last head again only for a response that would make the
    same head: any sequence of responses (same headers in another order, another status,
    reason, method, Host, configuration) gets what a relay that never saw the others makes."""
    server = ServerSettings(plaintext=True)
    configs = {h: RelayConfig(server=server, namespace_host=h) for h in (None, "ns.example")}
    context = SimpleNamespace(config=configs[None])
    relay = HttpRelay(cast(RelayContext, context))
    for response, method, host, namespace_host in responses:
        context.config = configs[namespace_host]
        fresh = HttpRelay(cast(RelayContext, SimpleNamespace(config=context.config)))
        got, want = (
            relay.response_head(method, host, response),
            fresh.response_head(method, host, response),
        )
        if isinstance(want, ResponseHead):
            assert got == want
        else:
            assert not isinstance(got, ResponseHead) and got.status == want.status
