"""The ASGI adapter (``hybridrelay.asgi``) behind our relay, called with httpx."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from hybridrelay.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    load_app,
    serve,
)
from hybridrelay.cli.serve_app import add_serve_app_arguments, run_serve_app
from hybridrelay.exceptions import ConfigurationError
from tests.conftest import Relay, running_until_cancelled
from tests.server.test_http_relay import assert_no_exchanges_left

AUTH = "ServiceBusAuthorization"
KIB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class App:
    """A small ASGI app written against the spec (no framework)."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.lifespan: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["greeting"] = "hello from lifespan"
                    self.lifespan.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.lifespan.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        self.scopes.append(scope)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"][len(scope["root_path"]) :]  # the route path (ASGI: path has it)
        if path == "/boom":
            raise RuntimeError("application error")
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(5):
                chunk = bytes([65 + i]) * (40 * KIB)  # 200 KiB in total, in 5 messages
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if path == "/state":
            text = scope["state"]["greeting"].encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": text})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"x-sha256", sha(body).encode()),
                    (b"x-path", path.encode()),
                    (b"x-multi", b"a"),
                    (b"x-multi", b"b"),
                    (b"set-cookie", b"a=1"),
                    (b"set-cookie", b"b=2"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body[::-1]})


def serving(relay: Relay, app: ASGIApp, **kw: Any) -> AbstractAsyncContextManager[None]:
    return running_until_cancelled(
        lambda ready: serve(app, relay.connection_string("hc"), ready=ready, **kw)
    )


def client(relay: Relay) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relay.http_url, timeout=30, headers={AUTH: relay.token("hc")})


@pytest.mark.parametrize(
    "size", [0, 64 * KIB, 64 * KIB + 1, 10 * 1024 * KIB], ids=["0", "64k", "64k+1", "10M"]
)
async def test_asgi_body_sizes_both_ways(relay: Relay, size: int) -> None:
    app = App()
    payload = os.urandom(size)
    async with serving(relay, app), client(relay) as http:
        response = await http.post("/hc/echo?k=v", content=payload)
    assert response.status_code == 201
    assert response.headers["x-sha256"] == sha(payload)
    assert sha(response.content) == sha(payload[::-1])
    assert len(response.content) == size
    await assert_no_exchanges_left(relay)


async def test_asgi_scope_and_headers(relay: Relay) -> None:
    app = App()
    async with serving(relay, app), client(relay) as http:
        response = await http.get("/hc/a%20b/c?x=1&sb-hc-id=z", headers={"X-Custom": "yes"})
        bare = await http.get("/hc")
    assert response.status_code == 201
    assert response.headers["x-path"] == "/a b/c"
    assert response.headers["x-multi"] == "a, b"
    # Both, through hybridrelay's repeatedResponseHeaders extension (PROTOCOL.md 6.4).
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    scope = app.scopes[0]
    assert scope["method"] == "GET"
    assert scope["root_path"] == "/hc"  # the hybrid connection's path, by default
    assert scope["path"] == "/hc/a b/c"
    assert scope["raw_path"] == b"/hc/a%20b/c"
    assert scope["query_string"] == b"x=1"
    assert scope["scheme"] == "http"
    assert scope["client"][0] == "127.0.0.1"
    headers = dict(scope["headers"])
    assert headers[b"x-custom"] == b"yes"
    assert headers[b"host"] == f"127.0.0.1:{relay.server.port}".encode()
    assert b"servicebusauthorization" not in headers
    assert headers[b"x-forwarded-for"] == b"127.0.0.1"
    assert headers[b"x-forwarded-proto"] == b"http"
    assert headers[b"x-forwarded-host"] == headers[b"host"]
    assert headers[b"x-forwarded-prefix"] == b"/hc"
    assert bare.headers["x-path"] == "/"


async def test_asgi_streaming_lifespan_and_errors(relay: Relay) -> None:
    app = App()
    async with serving(relay, app), client(relay) as http:
        streamed = await http.get("/hc/stream")
        state = await http.get("/hc/state")
        boom = await http.get("/hc/boom")
    assert streamed.status_code == 200
    assert streamed.content == b"".join(bytes([65 + i]) * (40 * KIB) for i in range(5))
    assert state.text == "hello from lifespan"
    assert boom.status_code == 500
    assert app.lifespan == ["startup", "shutdown"]


async def test_asgi_app_failing_on_a_websocket_scope_refuses_it_with_500(relay: Relay) -> None:
    # App() asserts an http scope: the exception before websocket.accept is a 500 refusal.
    async with serving(relay, App()):
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(
                    f"{relay.base_url}/$hc/hc?sb-hc-action=connect",
                    headers={AUTH: relay.token("hc")},
                )
    assert info.value.status == 500


async def test_asgi_app_without_lifespan(relay: Relay) -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError("only http")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"bare"})

    async with serving(relay, bare), client(relay) as http:
        response = await http.get("/hc")
    assert response.text == "bare"
    with pytest.raises(ConfigurationError):
        async with serving(relay, bare, lifespan="on"):
            pass


async def test_serve_app_cli(relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kit_asgi_app.py").write_text(
        "async def app(scope, receive, send):\n"
        "    if scope['type'] != 'http':\n"
        "        return\n"
        "    await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "    await send({'type': 'http.response.body', 'body': b'from the cli'})\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    parser = argparse.ArgumentParser()
    add_serve_app_arguments(parser)
    args = parser.parse_args(
        [
            "kit_asgi_app:app",
            "--app-dir",
            str(tmp_path),
            "-x",
            relay.connection_string("hc"),
            "--lifespan",
            "off",
        ]
    )
    task = asyncio.create_task(run_serve_app(args))
    try:
        async with client(relay) as http:
            for _ in range(200):  # until the listener is online
                response = await http.get("/hc")
                if response.status_code != 502:
                    break
                await asyncio.sleep(0.02)
        assert response.text == "from the cli"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    with pytest.raises(ConfigurationError):
        load_app("no_such_module_xyz:app")
    with pytest.raises(ConfigurationError):
        load_app("kit_asgi_app:missing", app_dir=str(tmp_path))
    with pytest.raises(ConfigurationError):
        load_app("nocolon")
