"""The relay's error responses and reason phrases (server/responses.py)."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.server.responses import error_response, reason_phrase, tracking_id


@given(st.text())
def test_a_reason_phrase_is_safe_on_a_status_line(text: str) -> None:
    phrase = reason_phrase(text)
    assert len(phrase) <= 512
    assert all(32 <= ord(ch) < 127 for ch in phrase), phrase  # printable ASCII: no CR/LF
    assert phrase == phrase.strip()


def test_what_a_reason_phrase_keeps_and_replaces() -> None:
    assert reason_phrase("Not found") == "Not found"
    assert reason_phrase("bad\r\nSet-Cookie: x=1") == "bad  Set-Cookie: x=1"
    assert reason_phrase("caf\u00e9") == "caf?"
    assert reason_phrase("  \t ") == ""
    assert reason_phrase("x" * 600) == "x" * 512


def test_an_error_response_carries_a_tracking_id() -> None:
    response = error_response(404, "The hybrid connection does not exist.", track="t-1")
    assert response.status == 404
    assert response.reason == "The hybrid connection does not exist. TrackingId:t-1"
    assert response.text == "The hybrid connection does not exist. TrackingId:t-1\n"
    assert "TrackingId:" in (error_response(400, "x").reason or "")


@given(st.text(st.characters(max_codepoint=300)))
def test_a_reason_phrase_is_the_character_by_character_rule(text: str) -> None:
    # The rule written out slowly: the common printable-ASCII phrase takes a shortcut.
    slow = "".join((ch if ord(ch) < 128 else "?") if ch.isprintable() else " " for ch in text)
    assert reason_phrase(text) == slow.strip()[:512]


def test_tracking_ids_are_random_uuid4_text() -> None:
    ids = [tracking_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    # Every variant nibble occurs (8, 9, a, b): the bits are set, the rest stays random.
    assert {text[19] for text in ids} == set("89ab")
