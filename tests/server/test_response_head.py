"""The response head's one-pass header rule (http_relay._plain_response_headers) against the
general one it stands in for: the same pairs, in the same order, or the general path taken."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.protocol.http import expand_repeated_headers
from hybridrelay.protocol.messages import Response
from hybridrelay.server.http_relay import _plain_response_headers, forwarded_response_headers

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
