"""The relay's HTTP/1.1 behaviour on the wire, pinned black-box (PROTOCOL.md 5, 6, 7 and 8.2).

Senders here are raw sockets writing exact bytes; responses are parsed here, by the framing
rules of RFC 9112 (Content-Length, chunked, no body for HEAD/1xx/204/304, to EOF otherwise), so
that keep-alive, pipelining and connection reuse are exercised exactly: a response that carries
a byte too many or too few breaks the parse of the next one. The listener is the SDK's
(``HybridConnectionListener`` with a request handler that echoes what arrived, and an accept
loop that echoes WebSocket messages).

Whatever parses the senders' HTTP in front of the relay's endpoints must keep these answers.
Where a behaviour is aiohttp's rather than a protocol rule, the test says so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import json
import os
import random
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from hybridrelay.auth.sas import create_token
from hybridrelay.client import HybridConnectionListener
from hybridrelay.client.http import RelayedHttpContext
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, RelayFactory
from tests.server.test_http_relay import assert_no_exchanges_left
from tests.server.test_splice import OP_TEXT, RawWebSocket

pytestmark = pytest.mark.timeout(30)

AUTH = "ServiceBusAuthorization"
KIB = 1024
MIB = 1024 * KIB
#: How long one read of an answer may take; far beyond what a loopback exchange needs.
READ_TIMEOUT = 10.0
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ATOM = "{http://www.w3.org/2005/Atom}"
SB = "{http://schemas.microsoft.com/netservices/2010/10/servicebus/connect}"

#: The body of ``/hc/sized``, which the listener answers with its own Content-Length.
SIZED = b"a body of known length\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int) -> bytes:
    """``size`` bytes that differ from position to position, the same for the same size."""
    return random.Random(size).randbytes(size)


# -- the listener ----------------------------------------------------------------------------


@dataclass
class EchoApp:
    """The SDK request handler behind the relay; what it answers depends on the path."""

    requests: list[RelayedHttpContext] = field(default_factory=list)
    #: ``/hc/hold``: set when the request arrived, released by the test, and whether the
    #: handler learnt that the sender went away.
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    sender_gone: asyncio.Event = field(default_factory=asyncio.Event)
    #: ``/hc/hold``: the handler's own answer reached the end (responded, or failed to).
    hold_done: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, ctx: RelayedHttpContext) -> None:
        self.requests.append(ctx)
        path = ctx.path
        body = await ctx.read()
        if path == "/hc/sized":
            # The listener's own Content-Length: a HEAD answer keeps it (RFC 9110 9.3.2).
            headers = {"Content-Type": "text/plain", "Content-Length": str(len(SIZED))}
            await ctx.respond(200, headers=headers)
            if ctx.method != "HEAD":
                await ctx.write(SIZED)
        elif path.startswith("/hc/status/"):
            status = int(path.rsplit("/", 1)[1])
            await ctx.respond(status, headers={"ETag": '"v1"'})
        elif path == "/hc/own-server":
            headers = {"Server": "listener-app/1", "Date": "Mon, 01 Jan 2024 00:00:00 GMT"}
            await ctx.respond(200, headers=headers)
            await ctx.write(b"own")
        elif path == "/hc/cookies":
            await ctx.respond(
                200,
                headers=[
                    ("Content-Type", "text/plain"),
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Set-Cookie", "b=2"),
                    ("Set-Cookie", "c=3; HttpOnly"),
                ],
            )
            await ctx.write(b"cookies")
        elif path.startswith("/hc/bytes/"):
            # One write, with the listener's Content-Length: up to 64 KiB inline, beyond
            # that streamed over the request's rendezvous under that length.
            data = payload(int(path.rsplit("/", 1)[1]))
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(data)),
                "X-Sha256": sha(data),
            }
            await ctx.respond(200, headers=headers)
            await ctx.write(data)
        elif path.startswith("/hc/parts/"):
            # Several writes, no Content-Length, streaming from the first: chunked.
            count, size = (int(n) for n in path.split("/")[3:5])
            parts = [payload(size + index) for index in range(count)]
            await ctx.respond(
                200,
                headers={
                    "Content-Type": "application/octet-stream",
                    "X-Sha256": sha(b"".join(parts)),
                },
            )
            for part in parts:
                await ctx.write(part)
                await ctx.flush()
        elif path == "/hc/hold":
            ctx.on_disconnect(self.sender_gone.set)
            self.arrived.set()
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    await self.release.wait()
                await ctx.respond(200)
                await ctx.write(b"late")
                await ctx.finish()
            finally:
                self.hold_done.set()
        else:
            await ctx.respond(
                200,
                headers={"Content-Type": "application/json"},
            )
            await ctx.write(
                json.dumps(
                    {
                        "method": ctx.method,
                        "target": ctx.target,
                        "headers": ctx.headers,
                        "length": len(body),
                        "sha256": sha(body),
                        "remote_port": ctx.remote_endpoint[1] if ctx.remote_endpoint else None,
                    }
                ).encode()
            )


async def echo_streams(listener: HybridConnectionListener, seen: list[str]) -> None:
    """Echo every message of every accepted WebSocket; ``seen`` gets each stream's path."""

    async def echo(stream: Any) -> None:
        async with stream:
            while (message := await stream.receive_message()) is not None:
                await stream.send_message(message)

    tasks: set[asyncio.Task[None]] = set()
    try:
        async for stream in listener:
            seen.append(stream.connect_headers.get("X-Path", ""))
            task = asyncio.create_task(echo(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Served:
    """A relay with the SDK listener on ``hc`` and what a raw sender needs."""

    relay: Relay
    app: EchoApp
    host: str = "127.0.0.1"
    #: The X-Path header of each WebSocket the listener accepted.
    websockets: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.relay.server.port

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def token(self, entity: str = "hc", key: str = ROOT_KEY) -> str:
        return create_token(
            f"http://{self.authority}/{entity}",
            ROOT_KEY_NAME,
            key,
            expiry=int(time.time()) + 3600,
        )

    def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes | None = None,
        *,
        version: str = "HTTP/1.1",
        token: str | None = "hc",
    ) -> bytes:
        """The exact bytes of one request: Host, a token header for the entity ``token``
        (none if None), ``headers`` in order, Content-Length when ``body`` is given (b"" too),
        then the body."""
        lines = [f"{method} {target} {version}", f"Host: {self.authority}"]
        if token is not None:
            lines.append(f"{AUTH}: {self.token(token)}")
        lines += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Wire]:
        async with Wire.open(self.host, self.port) as wire:
            yield wire


@asynccontextmanager
async def serving(
    make_relay: RelayFactory, *, host: str = "127.0.0.1", limits: dict[str, Any] | None = None
) -> AsyncIterator[Served]:
    """A relay on port 0 (``host``) with the SDK listener (``EchoApp``) on ``hc``."""
    async with make_relay(host=host, limits=limits) as relay:
        served = Served(relay, EchoApp(), host=host)
        connection = (
            f"Endpoint=ws://{served.authority}/;SharedAccessKeyName={ROOT_KEY_NAME};"
            f"SharedAccessKey={ROOT_KEY}"
        )
        listener = HybridConnectionListener.from_connection_string(
            connection, "hc", request_handler=served.app
        )
        async with listener:  # open: the control channel is up
            streams = asyncio.create_task(echo_streams(listener, served.websockets))
            try:
                yield served
            finally:
                streams.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streams


@pytest.fixture
async def served(make_relay: RelayFactory) -> AsyncIterator[Served]:
    async with serving(make_relay) as running:
        yield running


# -- the sender's side: raw bytes out, responses parsed here ------------------------------------


@dataclass
class WireResponse:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes
    #: The body came in chunks (Transfer-Encoding: chunked), and in how many.
    chunks: int | None = None

    @property
    def version(self) -> str:
        return self.status_line.split(" ", 1)[0]

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ", 2)[1])

    @property
    def reason(self) -> str:
        parts = self.status_line.split(" ", 2)
        return parts[2] if len(parts) > 2 else ""

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        """The header's one value (None when absent); a repeated one fails the test."""
        values = self.values(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def json(self) -> dict[str, Any]:
        assert self.header("Content-Type") == "application/json", self.headers
        document: dict[str, Any] = json.loads(self.body)
        return document


class Wire:
    """One TCP connection to the relay: writes what it is given, reads responses one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @asynccontextmanager
    async def open(cls, host: str, port: int) -> AsyncIterator[Wire]:
        async with asyncio.timeout(READ_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, limit=4 * MIB)
        try:
            yield cls(reader, writer)
        finally:
            writer.transport.abort()

    async def send(self, *data: bytes) -> None:
        """Write ``data`` in ONE write."""
        self.writer.write(b"".join(data))
        async with asyncio.timeout(READ_TIMEOUT):
            await self.writer.drain()

    async def response(self, method: str = "GET") -> WireResponse:
        """The next response (an interim 1xx too), read by its framing (RFC 9112 6.3)."""
        async with asyncio.timeout(READ_TIMEOUT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            headers = []
            for line in lines:
                name, _, value = line.partition(":")
                assert name and name == name.strip(), line
                headers.append((name, value.strip()))
            response = WireResponse(status_line, headers, b"")
            status = response.status
            if status < 200 or status in (204, 304) or method == "HEAD":
                return response
            encoding = response.header("Transfer-Encoding")
            length = response.header("Content-Length")
            if encoding is not None:
                assert encoding.lower() == "chunked", encoding
                assert length is None, "both Content-Length and Transfer-Encoding"
                response.body, response.chunks = await self._chunked()
            elif length is not None:
                response.body = await self.reader.readexactly(int(length))
            else:  # delimited by the close (RFC 9112 6.3 point 8)
                response.body = await self.reader.read(-1)
            return response

    async def _chunked(self) -> tuple[bytes, int]:
        parts: list[bytes] = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                trailer = await self.reader.readuntil(b"\r\n")
                while trailer != b"\r\n":
                    trailer = await self.reader.readuntil(b"\r\n")
                return b"".join(parts), len(parts)
            parts.append(await self.reader.readexactly(size))
            assert await self.reader.readexactly(2) == b"\r\n"

    async def assert_closed(self) -> None:
        """The relay closed the connection and sent nothing more."""
        async with asyncio.timeout(READ_TIMEOUT):
            try:
                rest = await self.reader.read(65536)
            except ConnectionResetError:
                rest = b""
        assert rest == b"", rest[:200]

    async def exchange(self, served: Served, method: str, target: str, **kw: Any) -> WireResponse:
        await self.send(served.request(method, target, **kw))
        return await self.response(method)


def assert_relayed_ok(response: WireResponse) -> None:
    """A listener's 200 as the relay passes it on: framed by exactly one of the two."""
    assert response.status_line == "HTTP/1.1 200 OK", response.status_line
    length, encoding = response.header("Content-Length"), response.header("Transfer-Encoding")
    assert (length is None) != (encoding is None), response.headers
    if length is not None:
        assert int(length) == len(response.body)


def websocket_upgrade(served: Served, target: str, key: str, path_tag: str) -> bytes:
    return served.request(
        "GET",
        target,
        [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", key),
            ("X-Path", path_tag),
        ],
    )


def assert_switched(response: WireResponse, key: str) -> None:
    assert response.status == 101, response.status_line
    upgrade = response.header("Upgrade")
    assert upgrade is not None and upgrade.lower() == "websocket"
    assert "upgrade" in (response.header("Connection") or "").lower()
    expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
    assert response.header("Sec-WebSocket-Accept") == expected


# -- 1-4: keep-alive, pipelining, HTTP/1.0, Connection: close -------------------------------------


async def test_keep_alive_twenty_requests_in_sequence(served: Served) -> None:
    async with served.connect() as wire:
        for index in range(20):
            response = await wire.exchange(served, "GET", f"/hc/seq/{index}?n={index}")
            assert_relayed_ok(response)
            # A body the relay got inline and small: one write, with its length.
            assert response.header("Content-Length") == str(len(response.body))
            assert response.header("Connection") is None
            assert response.json()["target"] == f"/hc/seq/{index}?n={index}"
        last = await wire.exchange(served, "GET", "/hc/last", headers=[("Connection", "close")])
        assert_relayed_ok(last)
        await wire.assert_closed()  # nothing after the last body: every length was exact
    ports = {ctx.remote_endpoint for ctx in served.app.requests}
    assert len(ports) == 1, ports  # all 21 on the one connection


async def test_pipelined_requests_in_one_write_are_answered_in_order(served: Served) -> None:
    body = b"pipelined body"
    async with served.connect() as wire:
        await wire.send(
            served.request("GET", "/hc/one"),
            served.request("POST", "/hc/two", [("Content-Type", "text/plain")], body),
            served.request("GET", "/hc/three"),
        )
        one, two, three = [await wire.response() for _ in range(3)]
        again = await wire.exchange(served, "GET", "/hc/four")
    for response in (one, two, three, again):
        assert_relayed_ok(response)
    assert one.json()["target"] == "/hc/one"
    echoed = two.json()
    assert (echoed["method"], echoed["target"]) == ("POST", "/hc/two")
    assert (echoed["length"], echoed["sha256"]) == (len(body), sha(body))
    assert echoed["headers"]["Content-Type"] == "text/plain"
    assert three.json()["target"] == "/hc/three"
    assert again.json()["target"] == "/hc/four"
    assert len({ctx.remote_endpoint for ctx in served.app.requests}) == 1


async def test_pipelined_answers_keep_their_order_when_the_first_is_slow(
    served: Served,
) -> None:
    """The first answer is held by the listener; the one after it cannot overtake it on the
    wire (RFC 9112 9.3.2). Whether the relay dispatches the second before the first is
    answered is not pinned (aiohttp does not)."""
    async with served.connect() as wire:
        await wire.send(served.request("GET", "/hc/hold"), served.request("GET", "/hc/quick"))
        async with asyncio.timeout(READ_TIMEOUT):
            await served.app.arrived.wait()
        served.app.release.set()
        slow, quick = await wire.response(), await wire.response()
    assert_relayed_ok(slow)
    assert slow.body == b"late"
    assert_relayed_ok(quick)
    assert quick.json()["target"] == "/hc/quick"


async def test_a_good_request_pipelined_before_a_malformed_one_is_answered_first(
    served: Served,
) -> None:
    """RFC 9112 9.3.2: answers in order. (aiohttp alone parsed a pipelined burst whole and
    answered the malformed request's 400 in place of the good one's answer; the relay's
    front takes one request at a time.)"""
    async with served.connect() as wire:
        await wire.send(served.request("GET", "/hc/good"), b"GARBAGE\r\n\r\n")
        first = await wire.response()
        assert first.status == 200, first.status_line
        second = await wire.response()
        assert second.status == 400
        await wire.assert_closed()


async def test_http10_closes_unless_keep_alive_is_asked(served: Served) -> None:
    async with served.connect() as wire:
        response = await wire.exchange(served, "GET", "/hc/old", version="HTTP/1.0")
        # Answered in the request's version, framed by Content-Length, then closed.
        assert response.status_line == "HTTP/1.0 200 OK"
        assert response.header("Content-Length") == str(len(response.body))
        assert response.json()["target"] == "/hc/old"
        await wire.assert_closed()
    async with served.connect() as wire:
        # HTTP/1.0 with Connection: keep-alive: kept, and the answer says so (aiohttp does).
        ask = [("Connection", "keep-alive")]
        first = await wire.exchange(served, "GET", "/hc/ka1", headers=ask, version="HTTP/1.0")
        assert first.status_line == "HTTP/1.0 200 OK"
        assert first.header("Connection") == "keep-alive"
        assert first.header("Content-Length") == str(len(first.body))
        second = await wire.exchange(served, "GET", "/hc/ka2", version="HTTP/1.0")
        assert second.status_line == "HTTP/1.0 200 OK"
        assert second.json()["target"] == "/hc/ka2"
        await wire.assert_closed()  # the second did not ask: closed after it
    async with served.connect() as wire:
        # A body streamed without a length cannot be chunked in HTTP/1.0: it ends at the close
        # (PROTOCOL.md 6.5). 300 KiB: more than one read of the relay's, so it streams.
        parts = f"/hc/parts/3/{100 * KIB}"
        streamed = await wire.exchange(served, "GET", parts, version="HTTP/1.0")
        assert streamed.status_line == "HTTP/1.0 200 OK"
        assert streamed.header("Transfer-Encoding") is None
        assert streamed.header("Content-Length") is None
        expected = b"".join(payload(100 * KIB + index) for index in range(3))
        assert sha(streamed.body) == streamed.header("X-Sha256") == sha(expected)
        await wire.assert_closed()
    # Connection is hop-by-hop: the listener never saw it.
    assert all("Connection" not in ctx.headers for ctx in served.app.requests)


async def test_connection_close_on_http11_answers_then_closes(served: Served) -> None:
    async with served.connect() as wire:
        response = await wire.exchange(served, "GET", "/hc/bye", headers=[("Connection", "close")])
        assert_relayed_ok(response)
        assert response.header("Connection") == "close"
        assert response.json()["target"] == "/hc/bye"
        await wire.assert_closed()


# -- 5, 6: other endpoints after a relayed request on the same connection -------------------------


async def test_plain_request_then_websocket_connect_on_the_same_connection(
    served: Served,
) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    async with served.connect() as wire:
        first = await wire.exchange(served, "GET", "/hc/before")
        assert_relayed_ok(first)
        await wire.send(websocket_upgrade(served, "/$hc/hc?sb-hc-action=connect", key, "connect"))
        assert_switched(await wire.response(), key)
        websocket = RawWebSocket(wire.reader, wire.writer)
        websocket.send(OP_TEXT, b"hello over the relay")
        assert await websocket.frame() == (True, OP_TEXT, b"hello over the relay")
        websocket.send(OP_TEXT, b"and again")
        assert await websocket.frame() == (True, OP_TEXT, b"and again")
    assert served.websockets == ["connect"]


async def test_plain_request_then_websocket_on_the_http_path_on_the_same_connection(
    served: Served,
) -> None:
    """PROTOCOL.md 6.9: an upgrade on ``/{hc}/{path}`` is a WebSocket sender, after a relayed
    request on the same connection too."""
    key = base64.b64encode(os.urandom(16)).decode()
    async with served.connect() as wire:
        first = await wire.exchange(served, "POST", "/hc/before", body=b"x")
        assert_relayed_ok(first)
        await wire.send(websocket_upgrade(served, "/hc/socket?room=1", key, "http-path"))
        assert_switched(await wire.response(), key)
        websocket = RawWebSocket(wire.reader, wire.writer)
        websocket.send(OP_TEXT, b"ping")
        assert await websocket.frame() == (True, OP_TEXT, b"ping")
    assert served.websockets == ["http-path"]


async def test_plain_request_then_runtime_information_on_the_same_connection(
    served: Served,
) -> None:
    markers = [("X-PROCESS-AT", "ServiceBus")]
    async with served.connect() as wire:
        first = await wire.exchange(served, "GET", "/hc/before")
        assert_relayed_ok(first)
        info = await wire.exchange(served, "GET", "/hc?api-version=2016-07", headers=markers)
        after = await wire.exchange(served, "GET", "/hc/after")
    assert info.status_line == "HTTP/1.1 200 OK"
    assert info.header("Content-Type") == "application/atom+xml; charset=utf-8"
    assert info.header("Content-Length") == str(len(info.body))
    assert info.header("Via") is None  # the relay's own answer
    entry = ET.fromstring(info.body)
    assert entry.tag == ATOM + "entry"
    assert entry.findtext(ATOM + "title") == "hc"
    description = entry.find(f"{ATOM}content/{SB}HybridConnectionDescription")
    assert description is not None
    assert description.findtext(SB + "ListenerCount") == "1"
    assert_relayed_ok(after)
    assert after.json()["target"] == "/hc/after"
    # Only the two relayed requests reached the listener.
    assert [ctx.target for ctx in served.app.requests] == ["/hc/before", "/hc/after"]


# -- 7: the relay's error answers keep the connection ---------------------------------------------


async def test_error_answers_keep_the_connection(served: Served) -> None:
    wrong_key = served.token(key="k" * 40)
    async with served.connect() as wire:
        unknown = await wire.exchange(served, "GET", "/nope/x")
        missing = await wire.exchange(served, "GET", "/hc/x", token=None)
        bad = await wire.exchange(served, "GET", "/hc/x", headers=[(AUTH, wrong_key)], token=None)
        other = await wire.exchange(served, "GET", "/hc/x", token="a/b")
        # a/b exists, but nobody listens on it.
        nobody = await wire.exchange(served, "GET", "/a/b/x", token="a/b")
        good = await wire.exchange(served, "POST", "/hc/ok", body=b"still here")
    answers = ((unknown, 404), (missing, 401), (bad, 401), (other, 403), (nobody, 502))
    for response, status in answers:
        assert response.status == status, response.status_line
        assert response.version == "HTTP/1.1"
        assert "TrackingId:" in response.reason
        assert response.header("Content-Type") == "text/plain; charset=utf-8"
        assert response.header("Content-Length") == str(len(response.body))
        assert response.body == (response.reason + "\n").encode()
        assert response.header("Connection") is None
        assert response.header("Via") is None  # relay errors carry no Via (6.5)
    assert_relayed_ok(good)
    assert good.json()["sha256"] == sha(b"still here")
    assert [ctx.target for ctx in served.app.requests] == ["/hc/ok"]


# -- 8, 9: request bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, MIB],
    ids=["0", "1", "65535", "65536", "65537", "1MiB"],
)
async def test_request_body_with_content_length(served: Served, size: int) -> None:
    data = payload(size)
    async with served.connect() as wire:
        response = await wire.exchange(served, "PUT", "/hc/upload", body=data)
        after = await wire.exchange(served, "GET", "/hc/after")
    assert_relayed_ok(response)
    echoed = response.json()
    assert (echoed["length"], echoed["sha256"]) == (size, sha(data))
    assert "Content-Length" not in echoed["headers"]  # the relay frames it, not the listener
    assert after.json()["target"] == "/hc/after"


async def test_chunked_upload_of_one_mebibyte(served: Served) -> None:
    data = payload(MIB)
    cuts = [0, 1, 4096, 300 * KIB, 300 * KIB + 7, MIB]
    head = served.request("POST", "/hc/chunked", [("Transfer-Encoding", "chunked")])
    async with served.connect() as wire:
        await wire.send(head)
        for start, end in zip(cuts, cuts[1:], strict=False):
            await wire.send(f"{end - start:x}\r\n".encode(), data[start:end], b"\r\n")
        await wire.send(b"0\r\n\r\n")
        response = await wire.response()
        after = await wire.exchange(served, "GET", "/hc/after")
    assert_relayed_ok(response)
    echoed = response.json()
    assert (echoed["length"], echoed["sha256"]) == (MIB, sha(data))
    assert "Transfer-Encoding" not in echoed["headers"]
    assert after.json()["target"] == "/hc/after"


async def test_expect_100_continue(served: Served) -> None:
    data = payload(1000)
    head = served.request(
        "POST", "/hc/expect", [("Expect", "100-continue"), ("Content-Length", str(len(data)))]
    )
    async with served.connect() as wire:
        await wire.send(head)
        async with asyncio.timeout(READ_TIMEOUT):
            interim = await wire.reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # the whole interim answer
        await wire.send(data)
        final = await wire.response()
        after = await wire.exchange(served, "GET", "/hc/after")
    assert_relayed_ok(final)
    echoed = final.json()
    assert (echoed["length"], echoed["sha256"]) == (len(data), sha(data))
    assert "Expect" not in echoed["headers"]  # answered by the relay, never forwarded (6.1)
    assert after.json()["target"] == "/hc/after"


# -- 10-12: responses ----------------------------------------------------------------------------


async def test_head_204_and_304_have_no_body_and_keep_the_framing(served: Served) -> None:
    async with served.connect() as wire:
        head = await wire.exchange(served, "HEAD", "/hc/sized")
        no_content = await wire.exchange(served, "GET", "/hc/status/204")
        not_modified = await wire.exchange(served, "GET", "/hc/status/304")
        get = await wire.exchange(served, "GET", "/hc/sized")
        head_again = await wire.exchange(served, "HEAD", "/hc/sized")
        last = await wire.exchange(served, "GET", "/hc/last", headers=[("Connection", "close")])
        await wire.assert_closed()  # no stray body bytes anywhere before
    for response in (head, head_again):
        assert response.status_line == "HTTP/1.1 200 OK"
        # What a GET would send (RFC 9110 9.3.2); no Transfer-Encoding, no body.
        assert response.header("Content-Length") == str(len(SIZED))
        assert response.header("Transfer-Encoding") is None
    assert no_content.status_line == "HTTP/1.1 204 No Content"
    assert not_modified.status_line == "HTTP/1.1 304 Not Modified"
    for response in (no_content, not_modified):
        assert response.header("Content-Length") is None
        assert response.header("Transfer-Encoding") is None
        assert response.header("ETag") == '"v1"'
    assert get.body == SIZED
    assert get.header("Content-Length") == str(len(SIZED))
    assert_relayed_ok(last)
    assert [ctx.method for ctx in served.app.requests] == [
        "HEAD",
        "GET",
        "GET",
        "GET",
        "HEAD",
        "GET",
    ]


async def test_response_bodies_small_large_and_streamed(served: Served) -> None:
    async with served.connect() as wire:
        small = await wire.exchange(served, "GET", "/hc/bytes/1000")
        large = await wire.exchange(served, "GET", f"/hc/bytes/{MIB}")
        streamed = await wire.exchange(served, "GET", f"/hc/parts/5/{100 * KIB}")
        after = await wire.exchange(served, "GET", "/hc/after")
    # Small: inline, one write with its length.
    assert_relayed_ok(small)
    assert small.header("Content-Length") == "1000"
    assert sha(small.body) == small.header("X-Sha256") == sha(payload(1000))
    # 1 MiB: streamed over the rendezvous, under the listener's Content-Length.
    assert_relayed_ok(large)
    assert large.header("Content-Length") == str(MIB)
    assert large.header("Transfer-Encoding") is None
    assert sha(large.body) == large.header("X-Sha256") == sha(payload(MIB))
    # Parts without a length: chunked, as they arrive. (The relay writes what one read of
    # the rendezvous brought as one part: a short unsized body whose parts all came in one
    # read goes out with a Content-Length instead, so only a body larger than one read,
    # 256 KiB, is sure to be chunked.)
    assert_relayed_ok(streamed)
    assert streamed.header("Transfer-Encoding") == "chunked"
    assert streamed.chunks is not None and streamed.chunks > 1
    expected = b"".join(payload(100 * KIB + index) for index in range(5))
    assert len(streamed.body) == len(expected)
    assert sha(streamed.body) == streamed.header("X-Sha256") == sha(expected)
    assert after.json()["target"] == "/hc/after"
    await assert_no_exchanges_left(served.relay)


async def test_repeated_headers_both_ways(served: Served) -> None:
    async with served.connect() as wire:
        cookies = await wire.exchange(served, "GET", "/hc/cookies")
        multi = await wire.exchange(
            served, "GET", "/hc/multi", headers=[("X-Multi", "one"), ("X-Multi", "two")]
        )
    assert_relayed_ok(cookies)
    # Each Set-Cookie its own field line, in order (never joined: RFC 9110 5.3).
    assert cookies.values("Set-Cookie") == ["a=1; Path=/", "b=2", "c=3; HttpOnly"]
    assert cookies.body == b"cookies"
    # A repeated request header reaches the listener joined with ", " (PROTOCOL.md 6.2).
    assert multi.json()["headers"]["X-Multi"] == "one, two"


# -- 13: a sender that goes away -----------------------------------------------------------------


@pytest.mark.parametrize("body", [None, 100 * KIB], ids=["inline", "rendezvous"])
async def test_sender_gone_while_waiting_for_the_answer(served: Served, body: int | None) -> None:
    """The relay frees the request at once and keeps serving. Over a rendezvous (a body
    beyond 64 KiB) the relay closes it, so the SDK handler learns (``on_disconnect``); inline
    on the control channel there is no message to tell it (PROTOCOL.md 6), so it learns only
    when its answer is over, and that answer is dropped without harm."""
    app = served.app
    data = payload(body) if body is not None else None
    async with served.connect() as wire:
        await wire.send(served.request("POST" if data else "GET", "/hc/hold", body=data))
        async with asyncio.timeout(READ_TIMEOUT):
            await app.arrived.wait()
        wire.writer.transport.abort()
    await assert_no_exchanges_left(served.relay)
    if body is not None:
        async with asyncio.timeout(READ_TIMEOUT):
            await app.sender_gone.wait()
    else:
        assert not app.sender_gone.is_set()
    app.release.set()
    async with asyncio.timeout(READ_TIMEOUT):
        await app.hold_done.wait()
    async with served.connect() as wire:
        response = await wire.exchange(served, "GET", "/hc/next")
    assert_relayed_ok(response)
    assert response.json()["target"] == "/hc/next"


# -- 14-16: malformed requests, bounded heads, idle connections ----------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /hc/x HTTP/1.1 junk\r\nHost: x\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /hc/x HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        b"GET /hc/x HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n",
        b"POST /hc/x HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n",
    ],
    ids=["request-line", "no-target", "header-name", "header-value", "content-length"],
)
@pytest.mark.parametrize("when", ["first", "later"])
async def test_malformed_request_is_400_then_closed(served: Served, bad: bytes, when: str) -> None:
    async with served.connect() as wire:
        if when == "later":
            assert_relayed_ok(await wire.exchange(served, "GET", "/hc/before"))
        await wire.send(bad)
        refused = await wire.response()
        # aiohttp answers these in HTTP/1.0 (its own error page); the status is the rule.
        assert refused.status_line.startswith(("HTTP/1.0 400 ", "HTTP/1.1 400 ")), refused
        assert refused.header("Server") == "hybridrelay"
        assert refused.header("Content-Length") == str(len(refused.body))
        await wire.assert_closed()
    async with served.connect() as wire:
        assert_relayed_ok(await wire.exchange(served, "GET", "/hc/still-serving"))


async def test_first_head_is_bounded_by_the_gate(make_relay: RelayFactory) -> None:
    limits = {"header_timeout": 1.0, "max_header_bytes": 4096}
    async with serving(make_relay, limits=limits) as served:
        async with served.connect() as slow:
            await slow.send(b"GET /hc/x HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            timed_out = await slow.response()
            await slow.assert_closed()
        async with served.connect() as huge:
            await huge.send(b"GET /hc/x HTTP/1.1\r\nX-Big: " + b"x" * 5000)
            too_large = await huge.response()
            await huge.assert_closed()
        async with served.connect() as silent:
            await silent.assert_closed()  # never said a word: closed without an answer
        # The bound counts the request line, the headers and the blank line: 4096 bytes
        # are served, 4097 are not.
        pad = 4096 - len(served.request("GET", "/hc/fits", [("X-Pad", "")]))
        async with served.connect() as fits:
            response = await fits.exchange(
                served, "GET", "/hc/fits", headers=[("X-Pad", "p" * pad)]
            )
            assert_relayed_ok(response)
        async with served.connect() as over:
            await over.send(served.request("GET", "/hc/over", [("X-Pad", "p" * (pad + 1))]))
            one_too_many = await over.response()
            await over.assert_closed()
    assert [ctx.target for ctx in served.app.requests] == ["/hc/fits"]
    for answer, status in (
        (timed_out, "408 Request Timeout"),
        (too_large, "431 Request Header Fields Too Large"),
        (one_too_many, "431 Request Header Fields Too Large"),
    ):
        assert answer.status_line == f"HTTP/1.1 {status}"
        assert answer.header("Server") == "hybridrelay"
        assert answer.header("Connection") == "close"
        assert answer.header("Content-Type") == "text/plain; charset=utf-8"
        assert answer.header("Content-Length") == str(len(answer.body))


@pytest.mark.parametrize(
    "later",
    ["fits", "line", "field", "count"],
)
async def test_later_heads_are_bounded_by_the_http_parser(
    make_relay: RelayFactory, later: str
) -> None:
    """After the first head the gate has stepped out: a later head may be larger than
    ``max_header_bytes`` (4 KiB here), and is bounded by aiohttp's limits instead: a request
    line of 8190 bytes, a header field of 32768 (app.py sets it), 128 header lines."""
    async with serving(make_relay, limits={"max_header_bytes": 4096}) as served:
        headers: list[tuple[str, str]] = []
        target = "/hc/later"
        if later == "fits":
            headers = [("X-Big", "b" * 30000)] + [(f"X-{i}", "v") for i in range(100)]
        elif later == "line":
            target = "/hc/" + "l" * 8200
        elif later == "field":
            headers = [("X-Big", "b" * 32800)]
        else:
            headers = [(f"X-{i}", "v") for i in range(130)]
        async with served.connect() as wire:
            assert_relayed_ok(await wire.exchange(served, "GET", "/hc/first"))
            response = await wire.exchange(served, "GET", target, headers=headers)
            if later == "fits":
                assert_relayed_ok(response)
                echoed = response.json()["headers"]
                assert echoed["X-Big"] == "b" * 30000 and echoed["X-99"] == "v"
                assert_relayed_ok(await wire.exchange(served, "GET", "/hc/after"))
            else:
                assert response.status == 400, response.status_line
                await wire.assert_closed()
        expected = ["/hc/first", target, "/hc/after"] if later == "fits" else ["/hc/first"]
        assert [ctx.target for ctx in served.app.requests] == expected


async def test_idle_connections_are_closed_after_the_idle_timeout(
    make_relay: RelayFactory,
) -> None:
    """``limits.idle_timeout``: between requests, and during a later request's head (its
    timer runs from the last answer; the gate's 408 is for the first head only), the relay
    closes the connection without an answer. Only that it closes is checked, not when."""
    async with serving(make_relay, limits={"idle_timeout": 1.0}) as served:
        async with served.connect() as idle:
            assert_relayed_ok(await idle.exchange(served, "GET", "/hc/once"))
            await idle.assert_closed()
        async with served.connect() as partial:
            assert_relayed_ok(await partial.exchange(served, "GET", "/hc/once"))
            await partial.send(served.request("GET", "/hc/never")[:40])
            await partial.assert_closed()
        async with served.connect() as silent:
            await silent.assert_closed()  # no first request: min(header, idle) timeout
        # The listener's control channel (a WebSocket) is not idle-timed: still serving.
        async with served.connect() as fresh:
            assert_relayed_ok(await fresh.exchange(served, "GET", "/hc/again"))
    assert [ctx.target for ctx in served.app.requests] == ["/hc/once", "/hc/once", "/hc/again"]


# -- 17, 18: the relay's own headers; IPv6 ----------------------------------------------------


async def test_server_via_and_date_headers(served: Served) -> None:
    async with served.connect() as wire:
        relayed = await wire.exchange(served, "GET", "/hc/h", headers=[("Via", "1.0 proxy")])
        streamed = await wire.exchange(served, "GET", f"/hc/parts/2/{40 * KIB}")
        refused = await wire.exchange(served, "GET", "/nope")
        own = await wire.exchange(served, "GET", "/hc/own-server")
    for response in (relayed, streamed):
        assert response.header("Server") == "hybridrelay"
        # This relay's entry, named by the Host the sender used.
        assert response.header("Via") == f"1.1 {served.authority}"
    # A request's Via is not the relay's to change: it reaches the listener as sent.
    assert relayed.json()["headers"]["Via"] == "1.0 proxy"
    assert refused.status == 404
    assert refused.header("Server") == "hybridrelay"
    assert refused.header("Via") is None
    for response in (relayed, streamed, refused):
        date = response.header("Date")
        assert date is not None and date.endswith(" GMT")
        assert email.utils.parsedate_to_datetime(date).tzinfo is not None
    # A listener's own Server and Date are passed on in place of the relay's (one of each).
    assert own.header("Server") == "listener-app/1"
    assert own.header("Date") == "Mon, 01 Jan 2024 00:00:00 GMT"
    assert own.header("Via") == f"1.1 {served.authority}"


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
async def test_ipv6_loopback(make_relay: RelayFactory) -> None:
    async with serving(make_relay, host="::1") as served:
        async with served.connect() as wire:
            first = await wire.exchange(served, "POST", "/hc/v6", body=b"six")
            second = await wire.exchange(served, "GET", "/hc/v6-again")
    for response in (first, second):
        assert_relayed_ok(response)
        assert response.header("Via") == f"1.1 [::1]:{served.port}"
    assert first.json()["sha256"] == sha(b"six")
    contexts = served.app.requests
    assert [ctx.remote_endpoint[0] for ctx in contexts if ctx.remote_endpoint] == ["::1", "::1"]
