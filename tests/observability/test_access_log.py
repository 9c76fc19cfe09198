"""The access log, the rate-limited refusal log and their redaction (observability/access_log.py,
docs/LOGGING.md). The JSON format itself, and ``serve --log-format json`` as a subprocess, are
tested in tests/test_logs.py."""

from __future__ import annotations

import io
import json
import logging
import re
import string
from collections.abc import Iterator
from urllib.parse import quote, quote_plus, unquote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hybridrelay.auth.sas import create_token
from hybridrelay.cli.logs import LOG_FORMAT, JsonFormatter
from hybridrelay.observability.access_log import (
    MAX_REASON,
    MAX_REFUSAL_KEYS,
    AccessLog,
    RefusalLog,
    TokenBucket,
    _fields_text,
    redact,
)

pytestmark = pytest.mark.timeout(60)


class Captured:
    """What one logger wrote, in both formats, through the formatters the commands use."""

    def __init__(self) -> None:
        self.text = io.StringIO()
        self.json = io.StringIO()

    def lines(self) -> list[str]:
        return self.text.getvalue().splitlines()

    def documents(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.json.getvalue().splitlines()]


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, logging.Logger, Captured]]:
    """The real ``hybridrelay.access`` and ``hybridrelay.refused`` loggers, written to
    memory (their levels, handlers and propagation restored afterwards)."""
    captured = Captured()
    text = logging.StreamHandler(captured.text)
    text.setFormatter(logging.Formatter(LOG_FORMAT))
    as_json = logging.StreamHandler(captured.json)
    as_json.setFormatter(JsonFormatter())
    loggers = [logging.getLogger("hybridrelay.access"), logging.getLogger("hybridrelay.refused")]
    saved = [(log.level, log.propagate, log.handlers[:]) for log in loggers]
    for log in loggers:
        log.setLevel(logging.INFO)
        log.propagate = False
        log.handlers[:] = [text, as_json]
    try:
        yield loggers[0], loggers[1], captured
    finally:
        for log, (level, propagate, handlers) in zip(loggers, saved, strict=True):
            log.setLevel(level)
            log.propagate = propagate
            log.handlers[:] = handlers


Capture = tuple[logging.Logger, logging.Logger, Captured]


# -- the access log ----------------------------------------------------------------------------


def test_a_connection_line_carries_its_fields_in_text_and_json(capture: Capture) -> None:
    _, _, captured = capture
    AccessLog().connection(
        "6f1c",
        "plant/line-1",
        kind="websocket",
        duration=1.23456,
        bytes_to_listener=1024,
        bytes_to_sender=2048,
        sender="10.0.0.5:40000",
        listener="10.0.0.9:1234",
    )
    (line,) = captured.lines()
    assert line.endswith(
        " INFO hybridrelay.access: connection tracking_id=6f1c hc=plant/line-1 kind=websocket "
        "outcome=relayed duration=1.235 bytes_to_listener=1024 bytes_to_sender=2048 "
        "sender=10.0.0.5:40000 listener=10.0.0.9:1234"
    )
    (document,) = captured.documents()
    assert document == {
        "ts": document["ts"],
        "level": "info",
        "logger": "hybridrelay.access",
        "message": line.split(": ", 1)[1],
        "event": "connection",
        "tracking_id": "6f1c",
        "hc": "plant/line-1",
        "kind": "websocket",
        "outcome": "relayed",
        "duration": 1.235,
        "bytes_to_listener": 1024,
        "bytes_to_sender": 2048,
        "sender": "10.0.0.5:40000",
        "listener": "10.0.0.9:1234",
    }


def test_an_http_line_leaves_unknown_sizes_out_of_the_text(capture: Capture) -> None:
    _, _, captured = capture
    AccessLog().http_request(
        "9a2b",
        "api",
        method="POST",
        status=201,
        duration=0.0204,
        request_bytes=None,
        response_bytes=17,
        sender=None,
    )
    (line,) = captured.lines()
    assert line.endswith(
        "hybridrelay.access: http tracking_id=9a2b hc=api method=POST status=201 duration=0.02 "
        "response_bytes=17"
    )
    (document,) = captured.documents()
    assert document["event"] == "http" and document["status"] == 201
    assert document["request_bytes"] is None and document["response_bytes"] == 17


def test_nothing_is_built_when_info_is_off(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    access, _, captured = capture
    access.setLevel(logging.WARNING)

    def must_not_run(*args: object) -> None:
        raise AssertionError("the line was built although INFO is off")

    monkeypatch.setattr(AccessLog, "_write", must_not_run)
    log = AccessLog()
    log.connection(
        "1",
        "hc",
        kind="ingress",
        duration=0,
        bytes_to_listener=0,
        bytes_to_sender=0,
        sender=None,
        listener=None,
    )
    log.http_request(
        "1",
        "hc",
        method="GET",
        status=200,
        duration=0,
        request_bytes=0,
        response_bytes=0,
        sender=None,
    )
    assert captured.lines() == []


def test_a_value_with_a_line_break_cannot_forge_a_text_line(capture: Capture) -> None:
    _, _, captured = capture
    forged = 'closing\n2026-12-02 10:00:00,000 INFO hybridrelay.server: all "good"'
    log = RefusalLog()
    log.refused("listen", "hc", 403, forged, "10.0.0.7:5000")
    log.refused("connect", "hc", 403, "Rejected by user code", None)
    forging, plain = captured.lines()  # the forged line is inside a quoted value
    assert "reason=" + json.dumps(forged) + " remote=10.0.0.7:5000" in forging
    assert plain.endswith("connect refused hc=hc status=403 reason=Rejected by user code")
    assert captured.documents()[0]["reason"] == forged


# -- the refusal log ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_refusals_is_rate_limited_and_every_one_is_counted(capture: Capture) -> None:
    _, refused_logger, captured = capture
    clock = FakeClock()
    log = RefusalLog(burst=20, rate=1.0, clock=clock)
    for i in range(10_000):
        clock.now = i / 1000  # 10,000 refusals in 10 s, from ever new addresses
        log.refused("connect", f"hc-{i}", 401, "bad token", f"203.0.113.{i % 250}:{i}")
    refused = captured.documents()
    # The burst at once, then one a second: 9 more in the 9.98 s after the burst.
    assert 20 + 9 <= len(refused) <= 20 + 10
    assert all(d["event"] == "refused" and d["level"] == "warning" for d in refused)
    assert not any("suppressed" in d for d in refused[:20])
    first_after_burst = refused[20]
    # The bucket refills from t = 0, so its next token is there at t = 1.000: the refusals
    # of t = 0.020 .. 0.999 were left out, in the 0.98 s since the burst's last line.
    assert first_after_burst["suppressed"] == 980
    assert first_after_burst["suppressed_seconds"] == 1.0
    assert captured.lines()[20].endswith("(980 similar refusals suppressed in the last 1.0s)"), (
        captured.lines()[20]
    )
    # The flood stopped: the ones left out since the last line are told once, on request.
    clock.now = 30.0
    pending = log.report_suppressed()
    assert pending > 0
    summary = captured.documents()[-1]
    assert summary["event"] == "refusals_suppressed" and summary["suppressed"] == pending
    assert summary["kind"] == "connect" and summary["status"] == 401
    assert log.report_suppressed() == 0  # nothing twice
    documents = captured.documents()
    written = sum(1 for d in documents if d["event"] == "refused")
    left_out = sum(n for d in documents if isinstance(n := d.get("suppressed"), int))
    assert written + left_out == 10_000  # each refusal a line or in exactly one count
    assert refused_logger.name == "hybridrelay.refused"


def test_each_kind_and_status_has_its_own_budget_and_the_table_stays_small(
    capture: Capture,
) -> None:
    _, _, captured = capture
    clock = FakeClock()
    log = RefusalLog(burst=2, rate=0.0, clock=clock)
    for _ in range(5):
        log.refused("connect", "hc", 401, "bad token", None)
    log.refused("connect", "hc", 404, "There are no listeners", None)
    log.refused("listen", "hc", 401, "bad token", None)
    statuses = [(d["kind"], d["status"]) for d in captured.documents()]
    assert statuses == [("connect", 401)] * 2 + [("connect", 404), ("listen", 401)]
    # A caller passing unforeseen statuses: past MAX_REFUSAL_KEYS they share one budget.
    for status in range(1000, 1000 + 10 * MAX_REFUSAL_KEYS):
        log.refused("http", "hc", status, "odd", None)
    assert len(log._table) == MAX_REFUSAL_KEYS + 1


def test_refusals_below_the_level_cost_nothing(capture: Capture) -> None:
    _, refused_logger, captured = capture
    refused_logger.setLevel(logging.ERROR)
    log = RefusalLog()
    log.refused("connect", "hc", 401, "bad token", None)
    assert captured.lines() == [] and log._table == {} and log.report_suppressed() == 0


def test_reasons_and_names_are_redacted_and_bounded(capture: Capture) -> None:
    _, _, captured = capture
    token = create_token("http://relay/hc/", "root", "k" * 44, expiry=2_000_000_000)
    RefusalLog().refused(
        "connect", f"hc?sb-hc-token={quote(token)}", 401, f"token {token} expired" + "x" * 500, None
    )
    (document,) = captured.documents()
    sig = token.split("sig=")[1].split("&")[0]
    assert sig not in json.dumps(document) and unquote(sig) not in json.dumps(document)
    assert str(document["reason"]).startswith("token *** expired")
    assert len(str(document["reason"])) == MAX_REASON


def test_the_token_bucket() -> None:
    bucket = TokenBucket(burst=3, rate=2.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # 2 a second: one per half second
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert not bucket.take(50.0)  # a clock stepping back adds nothing
    with pytest.raises(ValueError):
        TokenBucket(burst=0.5, rate=1.0)
    with pytest.raises(ValueError):
        RefusalLog(rate=-1.0)


# -- redaction ---------------------------------------------------------------------------------

_B64 = string.ascii_letters + string.digits + "+/="
_NAME = string.ascii_letters + string.digits + "-._"


def _signature_pieces(token: str) -> list[str]:
    """The signature's alphanumeric runs long enough to be recognisable: they read the same in
    any URL or form encoding of the token."""
    signature = unquote(token.split("&sig=", 1)[1].split("&", 1)[0])
    return [piece for piece in re.split(r"[+/=]", signature) if len(piece) >= 8]


_FORMS = (
    "{around} {token} {around}",
    "{around}{token}",
    "Authorization: {token}\r\n{around}",
    "{around} rejected {quoted}",  # URL-encoded without its parameter name
    "{around}?token={plus}",
    "wss://relay/$hc/x?sb-hc-action=connect&sb-hc-token={quoted}&{around}",
    "https://relay/x?sb-hc-token={plus}#{around}",
    "listen refused: sb-hc-token={token} {around}",
    "Endpoint=sb://relay/;SharedAccessKeyName={name};SharedAccessSignature={token};{around}",
    "Endpoint=sb://relay/;SharedAccessKeyName={name};SharedAccessKey={key};{around}",
    "Endpoint=sb://relay/;SharedAccessKeyName={name};SharedAccessKey={key}",
)


@given(
    key=st.text(alphabet=_B64, min_size=16, max_size=64),
    name=st.text(alphabet=_NAME, min_size=1, max_size=20),
    entity=st.text(alphabet=_NAME + "/", max_size=30),
    around=st.text(max_size=40),
    form=st.sampled_from(_FORMS),
)
def test_no_token_or_key_survives_redaction(
    key: str, name: str, entity: str, around: str, form: str
) -> None:
    token = create_token(f"http://relay/{entity}", name, key, expiry=2_000_000_000)
    secrets = [key, *_signature_pieces(token)] if "{key}" in form else _signature_pieces(token)
    # A secret that is also part of the text around it cannot be told apart from it.
    assume(not any(secret in part for secret in secrets for part in (around, entity, name, form)))
    text = form.format(
        around=around,
        token=token,
        quoted=quote(token, safe=""),
        plus=quote_plus(token),
        name=name,
        key=key,
    )
    cleaned = redact(text)
    for secret in secrets:
        assert secret not in cleaned, (text, cleaned)
    assert "***" in cleaned


class Shown:
    """A value of a kind the callers do not pass: written as its ``str``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class Text(str):
    """A ``str`` of a subclass: its ``str`` is what is written, as for any other value."""

    def __str__(self) -> str:
        return "shown\nas " + super().__str__()


_VALUES = (
    st.none()
    | st.text(max_size=12)
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=8).map(Shown)
    | st.text(max_size=8).map(Text)
)


@given(fields=st.dictionaries(st.text(alphabet=string.ascii_lowercase, max_size=8), _VALUES))
def test_fields_text_is_each_value_s_text_quoted_when_not_printable(
    fields: dict[str, object],
) -> None:
    """The text of the fields (the per-kind shortcuts of ``_fields_text`` included) is each
    value's ``str``, as a JSON string when it is not printable, None left out."""
    expected = []
    for key, value in fields.items():
        if value is not None:
            text = str(value)
            expected.append(f"{key}={text if text.isprintable() else json.dumps(text)}")
    assert _fields_text(fields) == " ".join(expected)


_SIZES = st.none() | st.integers(min_value=0)
_TEXTS = st.text(max_size=10)


@given(
    tracking_id=_TEXTS,
    entity=_TEXTS,
    method=_TEXTS,
    status=st.integers(min_value=100, max_value=599),
    duration=st.floats(min_value=0, max_value=1e6),
    request_bytes=_SIZES,
    response_bytes=_SIZES,
    sender=st.none() | _TEXTS,
)
def test_an_http_line_is_the_text_of_its_fields(
    tracking_id: str,
    entity: str,
    method: str,
    status: int,
    duration: float,
    request_bytes: int | None,
    response_bytes: int | None,
    sender: str | None,
) -> None:
    """``http_request`` writes its line without the loop over its fields: the same text as
    ``_fields_text`` makes of them, any value (non-printable ones quoted, None left out)."""
    fields = {
        "tracking_id": tracking_id,
        "hc": entity,
        "method": method,
        "status": status,
        "duration": round(duration, 3),
        "request_bytes": request_bytes,
        "response_bytes": response_bytes,
        "sender": sender,
    }
    logger = logging.getLogger("hybridrelay.access.test-http-line")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    AccessLog(logger).http_request(
        tracking_id,
        entity,
        method=method,
        status=status,
        duration=duration,
        request_bytes=request_bytes,
        response_bytes=response_bytes,
        sender=sender,
    )
    assert stream.getvalue() == f"http {_fields_text(fields)}\n"
