"""The rules of relayed HTTP shared by the relay, the SDK and the bridge (protocol/http.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.protocol.http import (
    HOP_BY_HOP_HEADERS,
    INLINE_BODY_LIMIT,
    INLINE_HEADER_LIMIT,
    header_json_size,
    merge_repeated_headers,
    sends_inline,
    without_hop_by_hop,
)

# Header names as they occur, with the hop-by-hop ones and case variants well represented.
_names = st.one_of(
    st.sampled_from(sorted(HOP_BY_HOP_HEADERS)).map(str.title),
    st.sampled_from(["Set-Cookie", "set-cookie", "X-A", "x-a", "Accept", "Cookie"]),
    st.text("abcdefghijklmnopqrstuvwxyz-ABC", min_size=1, max_size=12),
)
_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
_headers = st.lists(st.tuples(_names, _values), max_size=12)


def test_hop_by_hop_headers_are_dropped_and_the_rest_keep_their_order() -> None:
    headers = [
        ("Connection", "keep-alive"),
        ("Accept", "*/*"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "3"),
        ("Host", "relay"),
        ("X-B", "2"),
        ("Upgrade", "h2c"),
        ("X-A", "1"),
    ]
    assert without_hop_by_hop(headers) == [("Accept", "*/*"), ("X-B", "2"), ("X-A", "1")]


def test_names_a_connection_header_lists_are_dropped_too() -> None:
    headers = [
        ("connection", "X-Private , , Keep-Alive"),
        ("X-Private", "secret"),
        ("CONNECTION", "x-other"),
        ("X-Other", "o"),
        ("X-Public", "p"),
    ]
    assert without_hop_by_hop(headers) == [("X-Public", "p")]


def test_also_drops_more_and_keep_passes_a_hop_by_hop_header_on() -> None:
    headers = [("Content-Length", "7"), ("Expect", "100-continue"), ("A", "1")]
    assert without_hop_by_hop(headers, also=frozenset({"expect"})) == [("A", "1")]
    assert without_hop_by_hop(headers, keep=frozenset({"content-length"})) == headers
    # A Connection header that lists a kept name still wins (RFC 9110 7.6.1).
    listed = [("Connection", "content-length"), *headers]
    assert without_hop_by_hop(listed, keep=frozenset({"content-length"})) == headers[1:]


def test_any_iterable_of_pairs_is_accepted() -> None:
    headers = {"Keep-Alive": "5", "A": "1"}
    assert without_hop_by_hop(headers.items()) == [("A", "1")]
    assert without_hop_by_hop(iter([("Te", "x"), ("B", "2")])) == [("B", "2")]


@given(_headers, st.frozensets(st.sampled_from(["expect", "x-a", "set-cookie"])))
def test_filtering_fuzz(headers: list[tuple[str, str]], also: frozenset[str]) -> None:
    kept = without_hop_by_hop(headers, also=also)
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    dropped = HOP_BY_HOP_HEADERS | also | listed
    assert kept == [(n, v) for n, v in headers if n.lower() not in dropped]
    assert without_hop_by_hop(kept, also=also) == kept  # idempotent: nothing left to drop


def test_repeated_headers_are_joined_and_keep_their_first_spelling() -> None:
    headers = [("Accept", "a"), ("X-A", "1"), ("accept", "b"), ("X-a", "2"), ("ACCEPT", "c")]
    assert merge_repeated_headers(headers) == {"Accept": "a, b, c", "X-A": "1, 2"}


def test_only_the_first_set_cookie_is_kept() -> None:
    headers = [
        ("Set-Cookie", "a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT"),
        ("set-cookie", "b=2"),
        ("Vary", "Accept"),
    ]
    assert merge_repeated_headers(headers) == {
        "Set-Cookie": "a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT",
        "Vary": "Accept",
    }


@given(_headers)
def test_merge_fuzz(headers: list[tuple[str, str]]) -> None:
    merged = merge_repeated_headers(headers)
    names = [name.lower() for name in merged]
    assert len(names) == len(set(names))  # one entry per case-insensitive name
    for name, value in merged.items():
        values = [v for n, v in headers if n.lower() == name.lower()]
        first_spelling = next(n for n, _ in headers if n.lower() == name.lower())
        assert name == first_spelling
        expected = values[0] if name.lower() == "set-cookie" else ", ".join(values)
        assert value == expected
    assert {n.lower() for n, _ in headers} == set(names)


@pytest.mark.parametrize(
    ("chunked", "length", "header_bytes", "inline"),
    [
        (False, None, 0, True),
        (False, 0, 0, True),
        (False, INLINE_BODY_LIMIT, INLINE_HEADER_LIMIT, True),
        (False, INLINE_BODY_LIMIT + 1, 0, False),
        (False, 10, INLINE_HEADER_LIMIT + 1, False),
        (True, None, 0, False),
        (True, 10, 10, False),
    ],
)
def test_sends_inline(chunked: bool, length: int | None, header_bytes: int, inline: bool) -> None:
    assert sends_inline(chunked=chunked, content_length=length, header_bytes=header_bytes) is inline


@given(st.booleans(), st.none() | st.integers(0, 2**40), st.integers(0, 2**20))
def test_sends_inline_fuzz(chunked: bool, length: int | None, header_bytes: int) -> None:
    inline = sends_inline(chunked=chunked, content_length=length, header_bytes=header_bytes)
    assert inline == (not chunked and (length or 0) <= 64 * 1024 and header_bytes <= 32 * 1024)


def _json_size(headers: dict[str, str]) -> int:
    return len(json.dumps(headers, separators=(",", ":")).encode("utf-8"))


# Any text, escapes and characters outside the BMP (12 bytes of JSON each) included, and sizes
# on both sides of the limit.
_any_text = st.text(max_size=40) | st.text('\x00\U0001f600"\\a', min_size=600, max_size=1200)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_any_text, _any_text, max_size=8))
def test_header_json_size_decides_as_the_exact_size_does(headers: dict[str, str]) -> None:
    size, exact = header_json_size(headers), _json_size(headers)
    assert size >= exact
    assert (size <= INLINE_HEADER_LIMIT) == (exact <= INLINE_HEADER_LIMIT)
    if size > INLINE_HEADER_LIMIT:
        assert size == exact


@pytest.mark.parametrize("count", [0, 1, 10, 400])
def test_header_json_size_of_big_heads_is_exact(count: int) -> None:
    headers = {f"X-H{i}": "v" * 100 for i in range(count)}
    size = header_json_size(headers)
    assert (size <= INLINE_HEADER_LIMIT) == (_json_size(headers) <= INLINE_HEADER_LIMIT)
    if count == 400:  # ~43 KB of JSON: above the limit, so counted exactly
        assert size == _json_size(headers) > INLINE_HEADER_LIMIT
