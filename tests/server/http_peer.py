"""A raw HTTP-relaying listener for the relay tests: a protocol peer written from PROTOCOL.md
section 6 with plain aiohttp (not our SDK), so the relay is checked against the wire format.

It opens a control channel, takes ``request`` messages (inline, or address-only followed by a
rendezvous), hands each to a test-supplied handler and sends the handler's :class:`Reply` back:
inline on the control channel when the body is <= 64 KiB, else over a rendezvous (as hyco-https
and .NET do), optionally in several fragments and with the hyco-https quirks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket

INLINE_LIMIT = 64 * 1024


@dataclass
class Received:
    """A request as the listener saw it."""

    message: dict[str, Any]
    body: bytes
    #: True when the request itself arrived over a rendezvous (address-only announcement).
    via_rendezvous: bool
    announcement: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.message["method"])

    @property
    def target(self) -> str:
        return str(self.message["requestTarget"])

    @property
    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = self.message["requestHeaders"]
        return headers


@dataclass
class Reply:
    status: int | str = 200
    description: str | None = "OK"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: None: rendezvous iff the body is larger than 64 KiB.
    via_rendezvous: bool | None = None
    #: Send the body in this many fragments (one binary message).
    fragments: int = 1
    #: Pause between fragments (seconds).
    fragment_pause: float = 0.0
    #: hyco-https quirk: a zero-length binary message after body:false.
    stray_empty: bool = False
    #: Announce a body (body:true) even if it is empty.
    force_body_flag: bool = False


Handler = Callable[[Received], Awaitable[Reply | None]]


class PeerListener:
    def __init__(self, control: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession):
        self.control = control
        self.session = session
        self.handler: Handler = _echo
        self.received: list[Received] = []
        self.rendezvous_opened = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def run(self) -> None:
        try:
            while True:
                message = await self.control.receive()
                if message.type is not aiohttp.WSMsgType.TEXT:
                    if message.type is aiohttp.WSMsgType.CLOSE:
                        self.close_code = int(message.data)
                    return
                document = json.loads(message.data)
                request = document.get("request")
                if request is None:
                    continue
                if "method" not in request:  # address-only
                    assert "body" not in request, request
                    self._spawn(self._serve_rendezvous(request))
                    continue
                body = b""
                if request["body"]:
                    async with asyncio.timeout(10):
                        follow = await self.control.receive()
                    assert follow.type is aiohttp.WSMsgType.BINARY, follow
                    body = follow.data
                received = Received(request, body, False, request)
                self._spawn(self._answer_inline(received))
        finally:
            self.closed.set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_inline(self, received: Received) -> None:
        self.received.append(received)
        reply = await self.handler(received)
        if reply is None:
            return  # never answer
        rendezvous = reply.via_rendezvous
        if rendezvous is None:
            rendezvous = len(reply.body) > INLINE_LIMIT
        if rendezvous:
            async with self._open(received.message["address"]) as ws:
                await self._send_reply(ws, received.message["id"], reply, None)
                await _await_close(ws)
            return
        await self._send_reply(self.control, received.message["id"], reply, self._lock)

    async def _serve_rendezvous(self, announcement: dict[str, Any]) -> None:
        async with self._open(announcement["address"]) as ws:
            async with asyncio.timeout(30):
                first = await ws.receive()
            assert first.type is aiohttp.WSMsgType.TEXT, first
            request = json.loads(first.data)["request"]
            assert request["id"] == announcement["id"]
            body = b""
            if request["body"]:
                async with asyncio.timeout(30):
                    follow = await ws.receive()
                assert follow.type is aiohttp.WSMsgType.BINARY, follow
                body = follow.data
            received = Received(request, body, True, announcement)
            self.received.append(received)
            reply = await self.handler(received)
            if reply is None:
                await _await_close(ws)
                return
            await self._send_reply(ws, request["id"], reply, None)
            await _await_close(ws)

    @asynccontextmanager
    async def _open(self, address: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        ws = await self.session.ws_connect(address, autoclose=False, max_msg_size=0)
        self.rendezvous_opened += 1
        try:
            yield ws
        finally:
            await ws.close()

    async def _send_reply(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        request_id: str,
        reply: Reply,
        lock: asyncio.Lock | None,
    ) -> None:
        has_body = bool(reply.body) or reply.force_body_flag
        head = {
            "response": {
                "requestId": request_id,
                "statusCode": reply.status,
                "responseHeaders": reply.headers,
                "body": has_body,
            }
        }
        if reply.description is not None:
            head["response"]["statusDescription"] = reply.description
        async with lock or contextlib.nullcontext():
            await ws.send_str(json.dumps(head))
            if has_body:
                await _send_fragmented(ws, reply)
            elif reply.stray_empty:
                await ws.send_bytes(b"")

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.control.close()


async def _send_fragmented(ws: aiohttp.ClientWebSocketResponse, reply: Reply) -> None:
    if reply.fragments <= 1:
        await ws.send_bytes(reply.body)
        return
    socket = AiohttpMessageSocket.client(ws)
    size = -(-len(reply.body) // reply.fragments) or 1
    pieces = [reply.body[i : i + size] for i in range(0, len(reply.body), size)] or [b""]
    for index, piece in enumerate(pieces):
        if index and reply.fragment_pause:
            await asyncio.sleep(reply.fragment_pause)
        await socket.send_fragment(piece, first=index == 0, last=index == len(pieces) - 1)


async def _await_close(ws: aiohttp.ClientWebSocketResponse) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while True:
                message = await ws.receive()
                if message.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return


async def _echo(received: Received) -> Reply:
    return Reply(body=received.body, headers={"content-type": "application/octet-stream"})


@asynccontextmanager
async def peer_listener(
    base_url: str, entity: str, token: str, handler: Handler | None = None
) -> AsyncIterator[PeerListener]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        control = await session.ws_connect(
            f"{base_url}/$hc/{entity}?sb-hc-action=listen",
            headers={"ServiceBusAuthorization": token},
            autoclose=False,
            max_msg_size=0,
        )
        peer = PeerListener(control, session)
        if handler is not None:
            peer.handler = handler
        runner = asyncio.create_task(peer.run())
        try:
            yield peer
        finally:
            await peer.aclose()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
