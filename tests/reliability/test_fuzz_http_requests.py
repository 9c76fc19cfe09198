"""Hypothesis-generated raw HTTP requests against a real relay (issue 17, "Proof": HTTP request
parsing for relaying).

Each example is written to a fresh socket of a running relay with an SDK listener answering
relayed requests. Whatever the bytes (a request line, headers, framing and body built from
the pieces that trip parsers up, or plain noise), the relay must answer with a status line
that is not a 5xx of its own making (500; 502/503/504 only where a listener is involved is
fine) or close the connection, within a few seconds; it must never log a traceback; and a
well-formed request on a new connection must work after every example (the process keeps
serving). The number of examples is bounded: this runs in the default suite.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridrelay import HybridConnectionListener
from hybridrelay.client import RelayedHttpContext
from tests.conftest import Relay, RelayFactory

ANSWER_WITHIN = 5.0
#: Stands for a valid token of the relay under test (made when its port is known).
TOKEN = "{token}"
#: aiohttp answers with the request's version when it parses one ("GET / HTTP/2.0" gets
#: "HTTP/2.0 401"), so any version is taken here.
STATUS_LINE = re.compile(rb"^HTTP/\d\.\d (\d{3}) ")

#: Tokens that trip HTTP parsers: framing headers, smuggling shapes, the relay's own names.
HEADER_NAMES = st.sampled_from(
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Upgrade",
        "Expect",
        "ServiceBusAuthorization",
        "Authorization",
        "Cookie",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "X-Forwarded-For",
        "Content-Type",
        " Content-Length",
        "Content-Length ",
        "Transfer-Encoding\t",
        "X-\u00e9",
    ]
) | st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=12)
#: Well-formed headers most of the time, so that most examples reach the relaying code.
VALID_NAMES = st.sampled_from(["X-App", "Accept", "Content-Type", "User-Agent", "X-Forwarded-For"])
VALID_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
HEADER_VALUES = st.sampled_from(
    [
        "chunked",
        "gzip, chunked",
        "chunked, identity",
        "0",
        "-1",
        "5",
        "99999999999999999999",
        "close",
        "upgrade",
        "websocket",
        "100-continue",
        "SharedAccessSignature sr=x&sig=y&se=1&skn=z",
        TOKEN,
        TOKEN,
        "a\rb",
        "a\x00b",
        "\xff\xfe",
    ]
) | st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40)
_METHODS = st.sampled_from(
    ["GET", "GET", "POST", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PATCH"]
    + ["get", ""]
)
METHODS = (
    _METHODS
    | _METHODS
    | _METHODS
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8)
)
_TARGETS = st.sampled_from(
    [
        "/hc",
        "/hc/",
        "/hc/a/b?x=1",
        "/hc?sb-hc-action=connect",
        "/$hc/hc",
        "/$hc/hc?sb-hc-action=listen",
        "/$hc/hc?sb-hc-action=connect",
        "/$hc/hc?sb-hc-action=accept&sb-hc-id=x",
        "/$runtime/hc",
        "*",
        "http://127.0.0.1/hc",
        "/hc/%00",
        "/hc/%ff%fe",
        "//hc",
        "/../hc",
        "",
    ]
)
TARGETS = (
    _TARGETS
    | _TARGETS
    | _TARGETS
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
        lambda s: "/" + s
    )
)
VERSIONS = st.sampled_from(
    ["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", "http/1.1", ""]
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = f"{draw(METHODS)} {draw(TARGETS)} {draw(VERSIONS)}"
    valid = st.tuples(VALID_NAMES, VALID_VALUES)
    odd = st.tuples(HEADER_NAMES, HEADER_VALUES)
    headers = draw(st.lists(st.one_of(valid, valid, valid, valid, valid, odd), max_size=5))
    usually = st.sampled_from([True, True, True, False])
    if draw(usually):
        headers.insert(0, ("Host", "127.0.0.1"))
    if draw(usually):
        headers.append(("ServiceBusAuthorization", TOKEN))
    newline = draw(st.sampled_from(["\r\n"] * 6 + ["\n", "\r"]))
    head = newline.join([line, *(f"{name}: {value}" for name, value in headers)])
    bodies = st.sampled_from([b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"ffffffff\r\n", b"x" * 10])
    body = draw(st.just(b"") | st.just(b"") | bodies | st.binary(max_size=64))
    return head.encode("utf-8", "surrogateescape") + (newline * 2).encode() + body


RAW = st.one_of(requests(), st.binary(max_size=300).map(lambda b: b + b"\r\n\r\n"))


async def exchange(relay: Relay, raw: bytes) -> bytes:
    """What the relay answers to ``raw`` (its head, or what it sends before it closes, or
    until ANSWER_WITHIN); the socket is then dropped. Our side is not shut after the bytes:
    a relayed request whose client half-closes counts as a client that went away."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    received = b""
    try:
        writer.write(raw)
        async with asyncio.timeout(ANSWER_WITHIN):
            while len(received) < 65536 and (chunk := await reader.read(65536)):
                received += chunk
                if b"\r\n\r\n" in received:
                    break  # the head is enough
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.transport.abort()
    return received


async def well_formed(relay: Relay) -> bytes:
    request = (
        f"GET /hc/canary HTTP/1.1\r\nHost: 127.0.0.1:{relay.server.port}\r\n"
        f"ServiceBusAuthorization: {relay.token('hc')}\r\nConnection: close\r\n\r\n"
    ).encode()
    return await exchange(relay, request)


@pytest.mark.timeout(240)
async def test_raw_requests_get_an_answer_and_the_relay_keeps_serving(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_relay(limits=FAST_TIMEOUTS) as relay:
        await _fuzz(relay, caplog)


#: An unfinished head is answered 408 after this, a kept-alive connection closed: each
#: example that does not finish its request costs this, not the 10 s default.
FAST_TIMEOUTS = {"header_timeout": 0.2, "idle_timeout": 0.2}


async def _fuzz(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    async def handler(ctx: RelayedHttpContext) -> None:
        # Answered before the body is read: a body that never ends is not waited for.
        await ctx.respond(200)
        await ctx.write(b"served")

    listener = HybridConnectionListener.from_connection_string(
        relay.connection_string("hc"), request_handler=handler
    )
    statuses: dict[int, int] = {}
    caplog.set_level(logging.INFO)
    loop = asyncio.get_running_loop()
    token = relay.token("hc").encode()

    def run(coroutine: Coroutine[Any, Any, bytes]) -> bytes:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(ANSWER_WITHIN + 10)

    # Hypothesis drives a plain function; it runs in a worker thread and hands each exchange
    # to the test's event loop, where the relay and the listener run.
    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(raw=RAW)
    def one(raw: bytes) -> None:
        raw = raw.replace(TOKEN.encode(), token)
        answer = run(exchange(relay, raw))
        if answer:
            found = STATUS_LINE.match(answer)
            assert found, (raw[:200], answer[:200])
            status = int(found.group(1))
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500, (raw[:200], answer[:300])
        canary = run(well_formed(relay))
        assert canary.startswith(b"HTTP/1.1 200"), (raw[:200], canary[:300])

    async with listener:
        await asyncio.to_thread(one)
    logging.getLogger("tests.reliability").info(
        "raw request fuzzing: answers by status %s", dict(sorted(statuses.items()))
    )
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage()[:200] for r in tracebacks]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage()[:200] for r in errors]
