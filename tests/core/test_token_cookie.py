"""protocol/cookies.py: the relay's ``sb-hc-token`` cookie (PROTOCOL.md 3.4), read and removed
from a ``Cookie`` header; properties fuzzed with hypothesis."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.protocol.cookies import TOKEN_COOKIE, cookie_value, without_cookie

TOKEN = "SharedAccessSignature sr=http%3A%2F%2Fr%2Fhc&sig=a%2Bb%3D&se=1&skn=root"
# Cookie names and values as browsers send them (RFC 6265 cookie-octets, no ; or =).
NAME = st.text(st.sampled_from("abcXYZ-_.0189"), min_size=1, max_size=8).filter(
    lambda name: name != TOKEN_COOKIE
)
VALUE = st.text(st.sampled_from("abcXYZ%-_.0189!#$&'()*+/:<>?@[]^`{|}~"), max_size=12)
OTHERS = st.lists(st.tuples(NAME, VALUE), max_size=5)


def header(pairs: list[tuple[str, str]]) -> str:
    return "; ".join(f"{name}={value}" for name, value in pairs)


def test_the_token_is_percent_decoded_among_other_cookies() -> None:
    sent = f"theme=dark; {TOKEN_COOKIE}={quote(TOKEN, safe='')}; lang=en"
    assert cookie_value(sent) == TOKEN
    assert without_cookie(sent) == "theme=dark; lang=en"


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (None, None),
        ("", None),
        ("theme=dark", None),
        (f"{TOKEN_COOKIE}=", None),  # empty: no credential
        (f'{TOKEN_COOKIE}="abc"', "abc"),  # a quoted value (RFC 6265 allows DQUOTEs)
        (f"{TOKEN_COOKIE}=first; {TOKEN_COOKIE}=second", "first"),  # the first wins
        (f"x{TOKEN_COOKIE}=no; {TOKEN_COOKIE.upper()}=no", None),  # names are exact
        (f"  {TOKEN_COOKIE} = spaced ;", "spaced"),
    ],
)
def test_cookie_value(sent: str | None, expected: str | None) -> None:
    assert cookie_value(sent) == expected


def test_only_the_token_cookie_goes() -> None:
    assert without_cookie(f"{TOKEN_COOKIE}=x") == ""
    assert without_cookie(f"a=1;{TOKEN_COOKIE}=x;{TOKEN_COOKIE}=y;b") == "a=1; b"
    assert without_cookie("a=1; b=2") == "a=1; b=2"


@given(before=OTHERS, after=OTHERS, token=st.text(max_size=60))
def test_any_token_round_trips_and_leaves_the_others(
    before: list[tuple[str, str]], after: list[tuple[str, str]], token: str
) -> None:
    sent = header([*before, (TOKEN_COOKIE, quote(token, safe="")), *after])
    assert cookie_value(sent) == (token or None)
    assert without_cookie(sent) == header([*before, *after])
    assert cookie_value(without_cookie(sent)) is None


@given(st.text(max_size=80))
def test_any_header_is_handled(sent: str) -> None:
    # Never raises; what is left has no token cookie and is stable.
    cookie_value(sent)
    rest = without_cookie(sent)
    assert cookie_value(rest) is None
    assert without_cookie(rest) == rest
