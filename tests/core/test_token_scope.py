"""The token-scope rule (PROTOCOL.md 3.5, issue 11): pure, table-driven and fuzzed.

A token covers a request when its path, normalised, is a segment-wise prefix of the request's
path (the entity's path plus the request's suffix). Never the reverse: a token for a child
never opens its parent.
"""

from __future__ import annotations

import posixpath
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridrelay.auth.sas import (
    AuthorizationRule,
    Rights,
    audience_scope,
    authorize,
    create_token,
    normalize_path,
    path_covers,
    request_path,
)

NOW = 1_700_000_000
KEY = "namespace-key-0123456789"
RULES = (AuthorizationRule("ns", KEY, None, Rights.LISTEN | Rights.SEND),)


@pytest.mark.parametrize(
    ("token_path", "entity", "suffix", "covered"),
    [
        # namespace, parent, same, child
        ("", "plant/line-1/plc", "", True),
        ("plant", "plant/line-1/plc", "", True),
        ("plant/line-1", "plant/line-1/plc", "", True),
        ("plant/line-1/plc", "plant/line-1/plc", "", True),
        ("plant/line-1/plc", "plant/line-1", "", False),
        ("plant/line-1/plc", "plant", "", False),
        ("plant/line-1", "plant", "", False),
        # siblings and prefixes that are not at a segment boundary
        ("plant/line-2", "plant/line-1", "", False),
        ("plan", "plant", "", False),
        ("plant-x", "plant", "", False),
        ("plant/line", "plant/line-1", "", False),
        # the request's suffix counts as part of its path
        ("hyco/sub", "hyco", "/sub", True),
        ("hyco/sub", "hyco", "/sub/x", True),
        ("hyco/sub", "hyco", "/other", False),
        ("hyco/sub", "hyco", "", False),
        ("hyco", "hyco", "/anything/below", True),
        # dot segments are resolved, on both sides; a suffix cannot climb out of its entity
        ("a/../b", "a", "", False),
        ("a/../b", "b", "", True),
        ("a/./b", "a/b", "", True),
        ("a/b/..", "a/b", "", True),  # the token is for "a", a parent
        ("a/b/..", "a", "", True),
        ("a/x", "a", "/x/../y", False),
        ("a/y", "a", "/x/../y", True),
        ("b", "a", "/../b", False),
        ("a", "a", "/../../..", True),
        # repeated, leading and trailing slashes
        ("a//b", "a/b", "", True),
        ("/a/b/", "a/b", "", True),
        ("a/b//", "a", "", False),
        ("a", "a/b", "//c//", True),
        # case
        ("PLANT/Line-1", "plant/line-1/plc", "", True),
        ("plant", "PLANT/LINE-1", "", True),
        ("Plant/Line-1/PLC", "plant/line-1", "", False),
    ],
)
def test_the_rule(token_path: str, entity: str, suffix: str, covered: bool) -> None:
    assert path_covers(token_path, request_path(entity, suffix)) is covered


@pytest.mark.parametrize(
    ("audience", "entity", "suffix", "covered"),
    [
        ("http://ns/plant/line-1", "plant/line-1", "", True),
        ("http://ns/plant/line-1", "plant", "", False),
        # an encoded slash inside the audience is a slash
        ("http://ns/plant%2Fline-1", "plant/line-1", "", True),
        ("http://ns/plant%2Fline-1", "plant", "", False),
        # encoded dot segments are dot segments
        ("http://ns/a/%2E%2E/b", "a", "", False),
        ("http://ns/a/%2e%2e/b", "b", "", True),
        ("http://ns/a%2F..%2Fb", "a", "", False),
        # .NET's trailing slash, a port, the $hc segment some signers keep, another scheme
        ("http://ns/plant/", "plant/line-1", "", True),
        ("http://ns:443/plant/line-1/plc", "plant/line-1", "", False),
        ("sb://ns/$hc/plant/line-1/plc", "plant/line-1/plc", "", True),
        ("sb://ns/$hc/plant/line-1/plc", "plant/line-1", "", False),
        ("https://ns/", "anything/at/all", "/x", True),
    ],
)
def test_audiences(audience: str, entity: str, suffix: str, covered: bool) -> None:
    _, path = audience_scope(audience)
    assert path_covers(path, request_path(entity, suffix)) is covered
    token = create_token(audience, "ns", KEY, expiry=NOW + 60)
    decision = authorize(
        token, rules=RULES, entity_path=entity, suffix=suffix, required=Rights.SEND, now=NOW
    )
    assert decision.status == (200 if covered else 403), decision


def test_normalize_path() -> None:
    assert normalize_path("") == ""
    assert normalize_path("/") == ""
    assert normalize_path("A//B/./c/../") == "a/b"
    assert normalize_path("../../x") == "x"
    assert request_path("Plant/", "/Line-1//plc/") == "plant/line-1/plc"
    assert request_path("a", "/../../b") == "a/b"


# -- hypothesis: for random entity trees and token paths, accepted exactly by the rule --------

SEGMENT = st.sampled_from(["a", "b", "A", "c-1", "x y", "%", "é"])
DOTTED = st.sampled_from(["a", "b", "A", ".", "..", "", "c-1"])


def model_covers(token: list[str], request: list[str]) -> bool:
    """The rule, restated independently: posixpath resolves the dots, then compare lists."""

    def canonical(segments: list[str]) -> list[str]:
        joined = posixpath.normpath("/" + "/".join(segments))
        return [s.lower() for s in joined.split("/") if s]

    wanted = canonical(token)
    return canonical(request)[: len(wanted)] == wanted


@settings(max_examples=300, deadline=None)
@given(
    tree=st.lists(st.lists(SEGMENT, min_size=1, max_size=4), min_size=1, max_size=6),
    token=st.lists(DOTTED, max_size=5),
    pick=st.integers(min_value=0),
    suffix=st.lists(SEGMENT, max_size=2),
    slash=st.booleans(),
    encode=st.booleans(),
)
def test_tokens_are_accepted_exactly_by_the_rule(
    tree: list[list[str]],
    token: list[str],
    pick: int,
    suffix: list[str],
    slash: bool,
    encode: bool,
) -> None:
    entity = tree[pick % len(tree)]
    # The audience a signer would write: segments percent-encoded (or with %2F joins), maybe a
    # trailing slash.
    quoted = [quote(s, safe="") for s in token]
    joiner = "%2F" if encode else "/"
    audience = "http://ns/" + joiner.join(quoted) + ("/" if slash else "")
    signed = create_token(audience, "ns", KEY, expiry=NOW + 60)
    suffix_text = "".join("/" + s for s in suffix)
    decision = authorize(
        signed,
        rules=RULES,
        entity_path="/".join(entity),
        suffix=suffix_text,
        required=Rights.LISTEN,
        now=NOW,
    )
    expected = model_covers(token, entity + suffix)
    assert decision.status == (200 if expected else 403), (audience, entity, suffix)
