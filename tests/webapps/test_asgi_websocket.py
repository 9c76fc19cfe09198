"""The ASGI adapter's ``websocket`` scopes (asgi_websocket.py) with apps written against the
spec (no framework), served in process on a real relay (port 0): what each ASGI step does to
the sender. The Starlette app through real processes is test_websockets.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest

from hybridrelay.asgi import serve
from tests.conftest import Relay, running_until_cancelled

pytestmark = pytest.mark.timeout(60)

AUTH = "ServiceBusAuthorization"
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def serving(relay: Relay, app: App) -> AbstractAsyncContextManager[None]:
    return running_until_cancelled(
        lambda ready: serve(app, relay.connection_string("hc"), ready=ready, lifespan="off")
    )


async def ws_connect(
    relay: Relay, session: aiohttp.ClientSession, protocols: tuple[str, ...] = ()
) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(
        f"{relay.base_url}/hc/room?q=1",
        headers={AUTH: relay.token("hc")},
        protocols=protocols,
        timeout=aiohttp.ClientWSTimeout(ws_close=10),
        autoclose=False,
    )


async def close_answered(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    """The next message (a close, expected), the close then answered."""
    message = await ws.receive(timeout=10)
    await ws.close()
    return message


async def refusal(relay: Relay, app: App) -> int:
    async with serving(relay, app), aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await ws_connect(relay, session, ("a",))
    return refused.value.status


async def test_scope_messages_and_close_codes(relay: Relay) -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append({k: scope[k] for k in ("type", "path", "root_path", "query_string")})
        seen.append(scope["subprotocols"])
        seen.append(await receive())
        await send({"type": "websocket.accept", "subprotocol": "b"})
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "websocket.send", "text": "t"})
        await send({"type": "websocket.send", "bytes": b"\x00b"})
        seen.append(await receive())  # the client's close

    async with serving(relay, app), aiohttp.ClientSession() as session:
        ws = await ws_connect(relay, session, ("a", "b"))
        assert ws.protocol == "b"
        await ws.send_str("hello")
        await ws.send_bytes(b"\xffbin")
        text, binary = await ws.receive(timeout=10), await ws.receive(timeout=10)
        await ws.close(code=4321, message=b"done")
    assert (text.type, text.data) == (aiohttp.WSMsgType.TEXT, "t")
    assert (binary.type, binary.data) == (aiohttp.WSMsgType.BINARY, b"\x00b")
    assert seen == [
        {"type": "websocket", "path": "/hc/room", "root_path": "/hc", "query_string": b"q=1"},
        ["a", "b"],
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hello"},
        {"type": "websocket.receive", "bytes": b"\xffbin"},
        {"type": "websocket.disconnect", "code": 4321, "reason": "done"},
    ]


async def test_close_before_accept_is_403_and_an_exception_500(relay: Relay) -> None:
    async def closes(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.close", "code": 4000})

    async def returns(scope: Scope, receive: Receive, send: Send) -> None:
        return

    async def raises(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def bad_subprotocol(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept", "subprotocol": "not-offered"})

    assert await refusal(relay, closes) == 403
    assert await refusal(relay, returns) == 403
    assert await refusal(relay, raises) == 500
    assert await refusal(relay, bad_subprotocol) == 500


async def test_app_ending_after_accept_closes_1000_or_1011(relay: Relay) -> None:
    late: list[str] = []

    async def returns(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})

    async def raises(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})
        raise RuntimeError("after accept")

    async def closes(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        try:
            await send({"type": "websocket.send", "text": "late"})
        except OSError:  # ASGI 2.4: a send after the close
            late.append("refused")

    codes = []
    for app in (returns, raises, closes):
        async with serving(relay, app), aiohttp.ClientSession() as session:
            ws = await ws_connect(relay, session)
            message = await ws.receive(timeout=10)
            assert message.type is aiohttp.WSMsgType.CLOSE
            codes.append((message.data, message.extra))
            await ws.close()
    assert codes == [(1000, ""), (1011, ""), (4001, "bye")]
    assert late == ["refused"]


async def test_stopping_the_listener_closes_open_websockets_with_1001(relay: Relay) -> None:
    accepted = asyncio.Event()
    ended: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        try:
            await receive()  # never answered: the listener stops first
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async with aiohttp.ClientSession() as session:
        async with serving(relay, app):
            ws = await ws_connect(relay, session)
            async with asyncio.timeout(10):
                await accepted.wait()
            # Read (and answer) while the listener stops: its close handshake waits for us.
            closing = asyncio.create_task(close_answered(ws))
        message = await closing
    assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    assert ended == ["cancelled"]
