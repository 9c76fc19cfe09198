"""The close handshake without sockets (protocol/closing.py): each event's step, and over any
sequence of events the invariants every socket relies on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hybridrelay.protocol.closing import CloseHandshake, CloseStep, sendable_close_code
from hybridrelay.protocol.websocket import WIRE_CLOSE_CODES


def _code_of(frame: bytes) -> int:
    return int.from_bytes(frame[:2], "big")


def test_we_close_first_then_the_peer_answers() -> None:
    closing = CloseHandshake()
    step = closing.send(1000, "bye")
    assert step.frame == b"\x03\xe8bye"
    assert step.arm and not step.drop
    step = closing.receive(1000, "")
    assert step == CloseStep(drop=True, news=True)
    assert closing.dropped


def test_the_peer_closes_first_and_data_may_still_go_out() -> None:
    closing = CloseHandshake()
    step = closing.receive(1001, "going")
    assert step == CloseStep(news=True)  # reported, not answered: half-close
    assert not closing.sent and not closing.dropped
    assert (closing.code, closing.reason, closing.answer_code) == (1001, "going", 1001)
    step = closing.send(closing.answer_code)
    assert step.frame is not None and _code_of(step.frame) == 1001
    assert step.drop and not step.arm


def test_one_close_frame_only() -> None:
    closing = CloseHandshake()
    assert closing.send(1000).frame is not None
    assert closing.send(1011) == CloseStep()


def test_a_second_close_from_the_peer_is_no_news() -> None:
    closing = CloseHandshake()
    assert closing.receive(1000).news
    assert closing.receive(1002) == CloseStep()
    assert closing.code == 1000


def test_no_status_is_reported_as_1005_and_answered_with_1000() -> None:
    closing = CloseHandshake()
    closing.receive(None)
    assert closing.code == 1005
    assert closing.answer_code == 1000


def test_giving_up_drops_once() -> None:
    closing = CloseHandshake()
    assert closing.send(1000).arm
    assert closing.give_up() == CloseStep(drop=True)
    assert closing.give_up() == CloseStep()
    assert closing.receive(1000) == CloseStep()  # too late: the connection is dropped


def test_lost_connection_reports_1006_and_sends_nothing() -> None:
    closing = CloseHandshake()
    assert closing.lost() == CloseStep(news=True)
    assert closing.code == 1006
    assert closing.send(1000) == CloseStep()
    assert closing.lost() == CloseStep()  # no second report


def test_codes_the_wire_refuses_are_sent_as_1011_or_1000() -> None:
    assert sendable_close_code(None) == 1000
    assert sendable_close_code(1005) == 1000
    assert sendable_close_code(1006) == 1011
    assert sendable_close_code(1015) == 1011
    assert sendable_close_code(999) == 1011
    assert sendable_close_code(5000) == 1011
    assert sendable_close_code(4321) == 4321
    closing = CloseHandshake()
    frame = closing.send(1006).frame
    assert frame is not None and _code_of(frame) == 1011


def test_reason_cut_on_a_character_boundary() -> None:
    frame = CloseHandshake().send(1000, "é" * 100).frame  # 200 bytes of UTF-8
    assert frame is not None
    assert len(frame) <= 125
    assert frame[2:].decode("utf-8") == "é" * 61


_events = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 70000), st.text(max_size=200)),
        st.tuples(
            st.just("receive"), st.one_of(st.none(), st.integers(0, 70000)), st.text(max_size=5)
        ),
        st.tuples(st.just("timeout"), st.none(), st.just("")),
        st.tuples(st.just("lost"), st.none(), st.just("")),
    ),
    max_size=12,
)


@given(_events)
def test_any_sequence_keeps_the_invariants(events: list[tuple[str, int | None, str]]) -> None:
    closing = CloseHandshake()
    frames: list[bytes] = []
    drops = 0
    armed = False
    timer_fired = False
    news = 0
    for name, code, reason in events:
        if name == "send":
            step = closing.send(code or 0, reason)
        elif name == "receive":
            step = closing.receive(code, reason)
        elif name == "timeout":
            if not armed:
                continue  # a timer fires only once armed
            timer_fired = True
            step = closing.give_up()
        else:
            step = closing.lost()
        if step.frame is not None:
            frames.append(step.frame)
        armed = armed or step.arm
        news += step.news
        if step.drop:
            drops += 1
            # Dropped only once both close frames went by, or after the peer's time ran out.
            assert (closing.sent and closing.received) or timer_fired
    assert len(frames) <= 1
    assert drops <= 1
    assert news <= 1
    for frame in frames:
        sent = _code_of(frame)
        assert sent in WIRE_CLOSE_CODES or 3000 <= sent <= 4999
        assert len(frame) <= 125
        frame[2:].decode("utf-8")  # never cut inside a character
    if armed:
        assert frames, "the timer is armed only after our close frame"
