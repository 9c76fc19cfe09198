"""WebSockets through HTTP relaying (issue 14): the Starlette app's WebSocket routes behind
``hybridrelay serve-app`` and behind ``bridge -H`` -> uvicorn, called with the ``websockets``
library through the relay's HTTP endpoint (``/{hc}/ws``, what a browser does) and through the
Hybrid Connections connect URL (``/$hc/{hc}/ws?sb-hc-action=connect``).

Covered: text and binary messages, pings, with their type, close code and reason both ways, the
subprotocol the app picks, the path/query/headers the app sees (no relay credential), the
app's refusal (403) before any 101; the credentials a sender may use (header, query, cookie,
none for an anonymous hybrid connection) and 401 for a missing or bad one; backpressure (an
app that does not read stalls the sender); 502 from -H for an upstream that is down or silent;
1001 when -H stops; plain and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from hybridrelay.auth.sas import create_token
from tests.conftest import ROOT_KEY_NAME, TlsFiles
from tests.webapps.app import BLOCK, blob_block
from tests.webapps.harness import (
    AUTH,
    ENTITY,
    RelayProcess,
    bridge_h,
    relay_process,
    uvicorn_server,
)
from tests.webapps.test_webapps import (
    RSS_GROWTH_LIMIT_KIB,
    SOAK,
    TOPOLOGIES,
    RssSampler,
    web_app,
)

#: Every network step of a test client.
WAIT = 15.0
ENDPOINTS = ["http", "connect"]
#: The backpressure check sends this much in messages of STALL_CHUNK; it must stall before.
STALL_TOTAL = 48 * 1024 * 1024
STALL_CHUNK = 256 * 1024


def ws_url(relay: RelayProcess, route: str, endpoint: str, query: str = "") -> str:
    """``route`` of the app through the relay's HTTP endpoint or the HC connect URL."""
    if endpoint == "connect":
        extra = f"&{query}" if query else ""
        return f"{relay.base_url}/$hc/{ENTITY}{route}?sb-hc-action=connect{extra}"
    return f"{relay.base_url}/{ENTITY}{route}" + (f"?{query}" if query else "")


async def receive(ws: ClientConnection) -> str | bytes:
    """The next message, bounded (``recv``'s own argument is ``decode``, not a timeout)."""
    async with asyncio.timeout(WAIT):
        return await ws.recv()


def client_ssl(relay: RelayProcess) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=relay.ca_file) if relay.ca_file else None


@contextlib.asynccontextmanager
async def connect(
    relay: RelayProcess,
    url: str,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
) -> AsyncIterator[ClientConnection]:
    async with websockets.connect(
        url,
        additional_headers=headers or {},
        subprotocols=subprotocols,  # type: ignore[arg-type]
        ssl=client_ssl(relay),
        open_timeout=WAIT,
        close_timeout=WAIT,
    ) as ws:
        yield ws


async def refused_status(relay: RelayProcess, url: str, headers: dict[str, str] | None) -> int:
    """The HTTP status the relay answers the upgrade with (it must not be a 101)."""
    return (await refusal(relay, url, headers))[0]


async def refusal(
    relay: RelayProcess, url: str, headers: dict[str, str] | None
) -> tuple[int, str | None]:
    """The status of the refused upgrade and who refused it, as the relay says
    (``X-Hybridrelay-Rejected-By``, PROTOCOL.md 5.4: ``listener``, or None for the relay)."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(relay, url, headers):
            pass
    response = refused.value.response
    return response.status_code, response.headers.get("X-Hybridrelay-Rejected-By")


async def echo_both_ways(relay: RelayProcess, http: httpx.AsyncClient, endpoint: str) -> None:
    auth = {AUTH: relay.token()}
    key = uuid.uuid4().hex
    url = ws_url(relay, "/ws", endpoint, f"id={key}&x=1")
    async with connect(relay, url, auth, subprotocols=["nope", "echo.v1"]) as ws:
        assert ws.subprotocol == "echo.v1"  # the app's choice reaches the client
        await ws.send("héllo")
        assert await receive(ws) == "héllo"  # text stays text
        payload = bytes(range(256)) * 300
        await ws.send(payload)
        assert await receive(ws) == payload  # binary stays binary
        await ws.send("whoami")
        seen = json.loads(await receive(ws))
        async with asyncio.timeout(WAIT):
            await (await ws.ping(b"are you there"))  # a pong comes back (answered per hop)
        await ws.close(4002, "client bye")
    assert seen["path"] == f"/{ENTITY}/ws"
    assert seen["root_path"] == f"/{ENTITY}"
    assert seen["query"] == f"id={key}&x=1"  # the relay's sb-hc-* parameters are gone
    assert seen["subprotocol"] == "echo.v1"
    assert AUTH.lower() not in seen["headers"]
    assert seen["headers"]["x-forwarded-prefix"] == f"/{ENTITY}"
    # The client's close code and reason reached the app.
    closed = await http.get(f"/{ENTITY}/ws-closed", params={"id": key})
    assert closed.json() == {"code": 4002, "reason": "client bye"}
    # The app's close code and reason reach the client.
    async with connect(relay, ws_url(relay, "/ws", endpoint), auth) as ws:
        await ws.send("close:4001:app bye")
        with pytest.raises(websockets.ConnectionClosed) as ended:
            await receive(ws)
    assert ended.value.rcvd is not None
    assert (ended.value.rcvd.code, ended.value.rcvd.reason) == (4001, "app bye")
    # An app that closes before accepting refuses the sender, before any 101; the relay says
    # the refusal is the listener's (a sender's SDK then does not blame its token).
    refused = await refusal(relay, ws_url(relay, "/ws-refuse", endpoint), auth)
    assert refused == (403, "listener")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_websocket_echo_both_endpoints_and_backpressure(
    tmp_path: Path, topology: str
) -> None:
    async with web_app(tmp_path, topology) as (relay, _, http):
        for endpoint in ENDPOINTS:
            await echo_both_ways(relay, http, endpoint)
        stalled_mib = await backpressure(relay, http)
    # Seen: ~12 MiB (serve-app), ~23 MiB (bridge -H: uvicorn queues 32 messages too): the
    # TCP buffers of each hop, not the message count.
    assert stalled_mib < STALL_TOTAL / (1024 * 1024)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_websocket_echo_over_tls(tmp_path: Path, topology: str, tls_files: TlsFiles) -> None:
    async with web_app(tmp_path, topology, tls_files) as (relay, _, http):
        assert relay.base_url.startswith("wss://")
        for endpoint in ENDPOINTS:
            await echo_both_ways(relay, http, endpoint)


async def whoami(ws: ClientConnection) -> dict[str, str]:
    await ws.send("whoami")
    headers: dict[str, str] = json.loads(await receive(ws))["headers"]
    return headers


@pytest.mark.timeout(120)
async def test_websocket_credentials_and_401(tmp_path: Path) -> None:
    async with web_app(tmp_path, "serve-app") as (relay, _, http):
        token = relay.token()
        url = ws_url(relay, "/ws", "http")
        # The header.
        async with connect(relay, url, {AUTH: token}) as ws:
            assert AUTH.lower() not in await whoami(ws)
        # The query parameter (it never reaches the app).
        async with connect(relay, ws_url(relay, "/ws", "http", "sb-hc-token=" + quote(token))):
            pass
        # Authorization, as for HTTP relaying: stripped once used.
        async with connect(relay, url, {"Authorization": token}) as ws:
            assert "authorization" not in await whoami(ws)
        # The cookie (percent-encoded): removed, the app's own cookies kept.
        cookie = f"theme=dark; sb-hc-token={quote(token, safe='')}; lang=en"
        async with connect(relay, url, {"Cookie": cookie}) as ws:
            assert (await whoami(ws))["cookie"] == "theme=dark; lang=en"
        # The cookie works for plain HTTP requests too (a browser's EventSource, its page).
        async with httpx.AsyncClient(base_url=relay.http_url, timeout=WAIT) as bare:
            links = await bare.get(f"/{ENTITY}/links", headers={"Cookie": cookie})
            assert links.status_code == 200
            assert (await bare.get(f"/{ENTITY}/links")).status_code == 401
        # Missing or bad: 401 before any upgrade, on both endpoints.
        wrong = create_token(
            f"http://127.0.0.1:{relay.port}/{ENTITY}",
            ROOT_KEY_NAME,
            "b" * 44,  # not the rule's key
            expiry=int(time.time()) + 3600,
        )
        for endpoint in ENDPOINTS:
            assert await refusal(relay, ws_url(relay, "/ws", endpoint), None) == (401, None)
            assert await refused_status(relay, ws_url(relay, "/ws", endpoint), {AUTH: wrong}) == 401
        bad_cookie = {"Cookie": "sb-hc-token=" + quote(wrong, safe="")}
        assert await refused_status(relay, url, bad_cookie) == 401
        # The relay still serves after the refusals.
        assert (await http.get(f"/{ENTITY}/small")).text == "small"


@pytest.mark.timeout(120)
async def test_websocket_to_an_anonymous_hybrid_connection(tmp_path: Path) -> None:
    async with web_app(tmp_path, "serve-app", anonymous=True) as (relay, _, _http):
        for endpoint in ENDPOINTS:
            async with connect(relay, ws_url(relay, "/ws", endpoint)) as ws:
                await ws.send(b"anyone")
                assert await receive(ws) == b"anyone"


async def backpressure(relay: RelayProcess, http: httpx.AsyncClient) -> float:
    """Against an app that reads nothing yet, the sender's sends stall once the buffers on the
    way are full (no hop queues without bound); once the app reads, everything arrives. The
    MiB sent before the stall."""
    key = uuid.uuid4().hex
    chunk = b"x" * STALL_CHUNK
    sent = 0
    progress = asyncio.Event()
    url = ws_url(relay, "/ws-gated", "http", f"id={key}")
    async with connect(relay, url, {AUTH: relay.token()}) as ws:

        async def send_all() -> None:
            nonlocal sent
            while sent < STALL_TOTAL:
                await ws.send(chunk)
                sent += len(chunk)
                progress.set()
            await ws.send(b"")  # the end

        sending = asyncio.create_task(send_all())
        try:
            while not sending.done():
                progress.clear()
                try:
                    # No progress for a second: every buffer on the way is full.
                    await asyncio.wait_for(progress.wait(), 1.0)
                except TimeoutError:
                    break
            assert not sending.done(), "all was sent while the app read nothing"
            stalled_at = sent
            assert (await http.get(f"/{ENTITY}/ws-gate-open", params={"id": key})).text == "open"
            async with asyncio.timeout(60):
                await sending
            assert await receive(ws) == str(STALL_TOTAL)
        finally:
            sending.cancel()
    return stalled_at / (1024 * 1024)


@pytest.mark.timeout(120)
async def test_bridge_h_refusals_and_stop(tmp_path: Path) -> None:
    """-H: an upstream that is down is 502; one that accepts TCP but never answers the upgrade
    is 502 within --connect-timeout; stopping the bridge closes its WebSockets with 1001."""
    async with uvicorn_server() as gone:
        pass  # nothing listens on its port any more
    # The kernel accepts the TCP connection (backlog) but nothing ever answers the upgrade.
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url_of_silent = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        async with relay_process(tmp_path, None) as relay:
            auth = {AUTH: relay.token()}
            url = ws_url(relay, "/ws", "http")
            async with bridge_h(relay, gone):
                assert await refused_status(relay, url, auth) == 502
            async with bridge_h(relay, url_of_silent, "--connect-timeout", "1"):
                started = time.monotonic()
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with connect(relay, url, auth):
                        pass
                seconds = time.monotonic() - started
            async with uvicorn_server(root_path="/hc") as up, bridge_h(relay, up) as bridge:
                async with connect(relay, url, auth) as ws:
                    await ws.send("before")
                    assert await receive(ws) == "before"
                    bridge.process.terminate()
                    with pytest.raises(websockets.ConnectionClosed) as ended:
                        await receive(ws)
                async with asyncio.timeout(WAIT):
                    assert await bridge.process.wait() == 0
    finally:
        silent.close()
    assert refused.value.response.status_code == 502
    assert "in time" in refused.value.response.reason_phrase
    assert 0.9 < seconds < 5, seconds
    assert ended.value.rcvd is not None
    assert ended.value.rcvd.code == 1001


async def echo_volume(relay: RelayProcess, size: int) -> None:
    """``size`` bytes to the echo route and back, in 64 KiB messages, sent while the echoes are
    read (pipelined); their SHA-256 must agree."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0
    async with connect(relay, ws_url(relay, "/ws", "http"), {AUTH: relay.token()}) as ws:

        async def send_all() -> None:
            for index, start in enumerate(range(0, size, BLOCK)):
                block = blob_block(index)[: size - start]
                sent.update(block)
                await ws.send(block)

        sending = asyncio.create_task(send_all())
        try:
            while received < size:
                message = await receive(ws)
                assert isinstance(message, bytes)
                got.update(message)
                received += len(message)
            await sending
        finally:
            sending.cancel()
    assert got.hexdigest() == sent.hexdigest()


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_one_gibibyte_each_way_through_a_websocket_soak(
    tmp_path: Path, topology: str
) -> None:
    async with web_app(tmp_path, topology) as (relay, listener, _http):
        async with RssSampler([relay.process.pid, listener.pid]) as rss:
            await echo_volume(relay, SOAK)
    assert all(growth < RSS_GROWTH_LIMIT_KIB for growth in rss.growth().values()), rss.growth()
