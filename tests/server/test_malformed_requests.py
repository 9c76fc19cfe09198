"""Requests the relay cannot parse (issue 17 finding 4): each is one short, rate-limited line
that quotes none of the request (a token in a malformed header never reaches the log), the
answer names no versions, and the relay keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import parse_qs

import aiohttp
import pytest

from tests.conftest import Relay


async def exchange(relay: Relay, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(65536)
    finally:
        writer.close()


def captured_text(caplog: pytest.LogCaptureFixture) -> str:
    handler = caplog.handler
    return "\n".join(handler.format(record) for record in caplog.records)


@pytest.mark.timeout(60)
async def test_a_malformed_request_logs_one_line_without_its_headers(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = relay.token("hc")
    signature = parse_qs(token.removeprefix("SharedAccessSignature "))["sig"][0]
    bad = [
        # The header carrying the token is the one the parser chokes on (a control character).
        f"GET /$hc/hc?sb-hc-action=connect HTTP/1.1\r\nHost: x\r\n"
        f"ServiceBusAuthorization: {token}\x01\r\n\r\n",
        f"GET /hc/x HTTP/1.1\r\nServiceBusAuthorization: {token}\r\nBad Header {signature}\r\n\r\n",
        f"GET /hc/x HTTP/1.1\r\nServiceBusAuthorization: {token}\r\n"
        f"Content-Length: {signature}\r\n\r\n",
        f"G\x00T /{signature} HTTP/1.1\r\n\r\n",
    ]
    for raw in bad:
        answer = await exchange(relay, raw.encode("latin-1"))
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0]
        assert b"\r\nServer: hybridrelay\r\n" in answer
    text = captured_text(caplog)
    assert signature not in text and token not in text
    lines = [r for r in caplog.records if r.name == "hybridrelay.refused"]
    assert len(lines) == len(bad)
    assert all("malformed" in r.getMessage() for r in lines)
    assert not [r for r in caplog.records if r.exc_info]  # no traceback
    # Still serving: a well-formed connect with no listener gets its 404.
    answer = await exchange(
        relay,
        b"GET /$hc/anon?sb-hc-action=connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404 ")
    assert b"\r\nServer: hybridrelay\r\n" in answer


@pytest.mark.timeout(60)
async def test_a_flood_of_malformed_requests_is_rate_limited(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await asyncio.gather(*(exchange(relay, b"BAD\x01 / HTTP/1.1\r\n\r\n") for _ in range(200)))
    lines = [r for r in caplog.records if r.name.startswith(("hybridrelay", "aiohttp"))]
    # A burst of 20 refusal lines, then about one a second: far fewer than the 200 requests.
    assert 1 <= len(lines) <= 40, len(lines)


@pytest.mark.timeout(60)
async def test_header_bytes_that_are_not_utf8_reach_the_listener_as_valid_json(
    relay: Relay,
) -> None:
    """A sender's header with a byte that is not UTF-8: the listener's accept carries it as
    ISO-8859-1 text, never as a lone-surrogate escape."""
    async with aiohttp.ClientSession() as s:
        control = await s.ws_connect(
            f"{relay.base_url}/$hc/anon?sb-hc-action=listen",
            headers={"ServiceBusAuthorization": relay.token("anon")},
        )
        _, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        writer.write(
            b"GET /$hc/anon?sb-hc-action=connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nX-Site: Caf\xe9 \xff\r\n\r\n"
        )
        async with asyncio.timeout(10):
            message = await control.receive()
        assert message.type is aiohttp.WSMsgType.TEXT
        assert "\\ud" not in message.data
        headers = json.loads(message.data)["accept"]["connectHeaders"]
        assert headers["X-Site"] == "Café ÿ"
        writer.close()
        await control.close()
