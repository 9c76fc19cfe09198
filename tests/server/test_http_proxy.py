"""The ``-H`` reverse proxy (``hybridrelay.http_proxy``): httpx -> relay -> SDK listener ->
a real aiohttp upstream on 127.0.0.1, and back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
from aiohttp import web

from hybridrelay.exceptions import ConfigurationError
from hybridrelay.http_proxy import HttpForwardSpec, parse_http_forward, serve_http_forward
from tests.conftest import Relay, running_until_cancelled
from tests.server.test_http_relay import assert_no_exchanges_left

AUTH = "ServiceBusAuthorization"
KIB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def upstream() -> AsyncIterator[tuple[str, list[web.Request]]]:
    seen: list[web.Request] = []

    async def anything(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        body = await request.read()
        if request.path.endswith("/gzip"):
            return web.Response(
                body=gzip.compress(b"compressed text"), headers={"Content-Encoding": "gzip"}
            )
        if request.path.endswith("/redirect"):
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        if request.path.endswith("/slow-stream"):
            response = web.StreamResponse(headers={"X-Kind": "stream"})
            await response.prepare(request)
            for i in range(3):
                await response.write(f"part{i};".encode())
                await asyncio.sleep(0.05)
            await response.write_eof()
            return response
        return web.Response(
            status=201,
            reason="Made Upstream",
            body=body[::-1],
            headers={
                "X-Sha256": sha(body),
                "X-Path": request.path_qs,
                "X-Forwarded-For-Seen": request.headers.get("X-Forwarded-For", ""),
                "X-Proto-Seen": request.headers.get("X-Forwarded-Proto", ""),
                "X-Host-Seen": request.headers.get("X-Forwarded-Host", ""),
                "X-Via-Seen": request.headers.get("Via", ""),
                "X-Host-Header": request.headers.get("Host", ""),
                "Connection": "keep-alive",
            },
        )

    app = web.Application(client_max_size=64 * 1024 * KIB)
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def forwarding(relay: Relay, spec: str) -> AbstractAsyncContextManager[None]:
    return running_until_cancelled(
        lambda ready: serve_http_forward(
            relay.connection_string(), parse_http_forward(spec), ready=ready
        )
    )


def client(relay: Relay) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relay.http_url, timeout=30, headers={AUTH: relay.token("hc")})


@pytest.mark.parametrize("size", [0, 64 * KIB + 1, 10 * 1024 * KIB], ids=["0", "64k+1", "10M"])
async def test_proxy_bodies_paths_and_forwarded_headers(relay: Relay, size: int) -> None:
    payload = os.urandom(size)
    async with upstream() as (base, seen), forwarding(relay, f"hc:{base}/api"):
        async with client(relay) as http:
            response = await http.post(
                "/hc/items/1?x=1&sb-hc-id=t",
                content=payload,
                headers={"X-Forwarded-For": "10.0.0.9", "X-App": "a"},
            )
    assert response.status_code == 201
    assert response.reason_phrase == "Made Upstream"
    assert response.headers["x-sha256"] == sha(payload)
    assert sha(response.content) == sha(payload[::-1])
    assert response.headers["x-path"] == "/api/items/1?x=1"
    assert response.headers["x-forwarded-for-seen"] == "10.0.0.9, 127.0.0.1"
    assert response.headers["x-proto-seen"] == "http"
    assert response.headers["x-host-seen"] == f"127.0.0.1:{relay.server.port}"
    assert response.headers["x-via-seen"] == "1.1 hybridrelay"
    assert response.headers["x-host-header"] == base.removeprefix("http://")
    assert response.headers["via"].startswith("1.1 hybridrelay, 1.1 127.0.0.1")
    assert seen[0].headers["X-App"] == "a"
    assert AUTH not in seen[0].headers
    await assert_no_exchanges_left(relay)


async def test_proxy_passthrough_cases(relay: Relay) -> None:
    async with upstream() as (base, _seen), forwarding(relay, f"hc:{base}"):
        async with client(relay) as http:
            bare = await http.get("/hc")
            compressed = await http.get("/hc/gzip", headers={"Accept-Encoding": "gzip"})
            redirect = await http.get("/hc/redirect")
            streamed = await http.get("/hc/slow-stream")
    assert bare.headers["x-path"] == "/"
    assert compressed.headers["content-encoding"] == "gzip"
    assert compressed.content == b"compressed text"  # httpx decoded the untouched gzip body
    assert redirect.status_code == 302  # not followed by the proxy
    assert redirect.headers["location"] == "/elsewhere"
    assert streamed.text == "part0;part1;part2;"


async def test_proxy_upstream_down_is_502(relay: Relay) -> None:
    async with upstream() as (base, _seen):
        pass  # closed again: nothing listens on that port now
    async with forwarding(relay, f"hc:{base}"), client(relay) as http:
        response = await http.get("/hc/x")
    assert response.status_code == 502
    assert "upstream" in response.reason_phrase
    assert "via" in response.headers  # produced by the listener side, not the relay


def test_parse_http_forward() -> None:
    spec = parse_http_forward("a/b:http://127.0.0.1:8080/base/")
    assert (spec.entity_path, spec.target) == ("a/b", "http://127.0.0.1:8080/base")
    assert isinstance(parse_http_forward("hc:https://example.com"), HttpForwardSpec)
    for bad in ("hc", "hc:ftp://x", ":http://x:1", "hc:http://", "hc:http://x:1/?q=1"):
        with pytest.raises(ConfigurationError):
            parse_http_forward(bad)
