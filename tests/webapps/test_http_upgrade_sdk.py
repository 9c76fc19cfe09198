"""A WebSocket upgrade on the relay's HTTP path (PROTOCOL.md 6.9) reaches a plain SDK listener
exactly as a Hybrid Connections sender: an ``accept`` whose path, query and connectHeaders are
the sender's minus the relay's credential, then a stream (Hybrid Connections semantics) that
carries text, binary and the close code. In process, on a real relay (port 0)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from hybridrelay.client import AcceptContext, HybridConnectionListener
from tests.conftest import Relay

pytestmark = pytest.mark.timeout(60)

AUTH = "ServiceBusAuthorization"


async def test_a_browser_style_upgrade_is_an_ordinary_sender(relay: Relay) -> None:
    seen: list[AcceptContext] = []

    def decide(ctx: AcceptContext) -> None:
        seen.append(ctx)
        if ctx.path == "/refused":
            ctx.reject(451, "not here")

    listener = HybridConnectionListener.from_connection_string(
        relay.connection_string("hc"), accept_handler=decide
    )
    token = relay.token("hc")
    cookie = f"a=1; sb-hc-token={quote(token, safe='')}"
    async with listener, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{relay.base_url}/hc/chat/room?x=1&sb-hc-token={quote(token, safe='')}&y=2",
            headers={"Cookie": cookie, "X-App": "kept"},
            protocols=("chat.v1",),
        )
        async with asyncio.timeout(10):
            stream = await listener.accept_connection()
        assert stream is not None
        await ws.send_str("text")
        await ws.send_bytes(b"\x00binary")
        received: list[Any] = [await stream.receive_message(), await stream.receive_message()]
        await stream.send_message("back")
        answer = await ws.receive(timeout=10)
        # The close handshake needs both ends at once: the listener answers the sender's close.
        closing = asyncio.create_task(ws.close(code=4100, message=b"gone"))
        assert await stream.receive_message() is None
        await stream.aclose()
        async with asyncio.timeout(10):
            await closing
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{relay.base_url}/hc/refused", headers={AUTH: token})
    ctx = seen[0]
    assert (ctx.path, ctx.query) == ("/chat/room", "x=1&y=2")
    headers = {name.lower(): value for name, value in ctx.connect_headers.items()}
    assert headers["cookie"] == "a=1"  # the relay's cookie is gone, the app's kept
    assert headers["x-app"] == "kept"
    assert AUTH.lower() not in headers
    assert ctx.offered_subprotocols == ["chat.v1"]
    assert ws.protocol == "chat.v1"  # the listener's (default: the first offered) reached it
    assert received == ["text", b"\x00binary"]
    assert (answer.type, answer.data) == (aiohttp.WSMsgType.TEXT, "back")
    assert (stream.close_code, stream.close_reason) == (4100, "gone")
    assert refused.value.status == 451


async def test_no_listener_or_no_entity_is_404(relay: Relay) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
            await session.ws_connect(f"{relay.base_url}/hc/x", headers={AUTH: relay.token("hc")})
        with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
            await session.ws_connect(f"{relay.base_url}/nope/x", headers={AUTH: relay.token("hc")})
    assert missing.value.status == 404
    assert unknown.value.status == 404
