"""``hybridrelay bridge -H hc:http://host:port[/base]``: httpx -> relay -> bridge agent (an SDK
listener with the reverse proxy as request handler) -> a real aiohttp upstream, and back.
Everything on 127.0.0.1, port 0; the relay and the agent in process, plus one real
``hybridrelay bridge`` subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import logging
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from hybridrelay.bridge.agent import BridgeAgent
from hybridrelay.bridge.config import (
    BridgeConfig,
    HttpForward,
    load_config,
    merge_cli,
    parse_config,
)
from hybridrelay.client import HybridConnectionClient
from hybridrelay.exceptions import ConfigurationError, ConnectionRejectedError
from tests.bridge.helpers import FAST_RETRY
from tests.conftest import Relay, eventually
from tests.server.test_http_relay import assert_no_exchanges_left

AUTH = "ServiceBusAuthorization"
KIB = 1024
MIB = 1024 * KIB
SIZES = [0, 100 * KIB, 5 * MIB]
SIZE_IDS = ["0B", "100KiB", "5MiB"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Upstream:
    """A real aiohttp server on 127.0.0.1 that records what reached it."""

    url: str
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def upstream_server() -> AsyncIterator[Upstream]:
    state = Upstream(url="", port=0)

    async def record(request: web.Request, body: bytes) -> None:
        state.seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": dict(request.headers),
                "sha": sha(body),
                "size": len(body),
            }
        )

    async def blob_handler(request: web.Request) -> web.Response:
        await record(request, await request.read())
        size = int(request.match_info["size"])
        payload = blob(size)
        return web.Response(body=payload, headers={"X-Sha256": sha(payload)})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        await record(request, body)
        return web.Response(
            status=200 if request.method != "POST" else 201,
            body=body,
            headers={"X-Sha256": sha(body), "X-Method": request.method},
        )

    async def slow(request: web.Request) -> web.Response:
        await record(request, await request.read())
        state.slow_started.set()
        async with asyncio.timeout(20):
            await state.release.wait()
        return web.Response(text="finally")

    async def made(request: web.Request) -> web.Response:
        body = await request.read()
        await record(request, body)
        headers = [
            ("Connection", "X-Hop"),
            ("X-Hop", "named by Connection"),
            ("Proxy-Authenticate", "Basic"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Via", "1.0 upstream-cache"),
        ]
        return web.Response(
            status=201, reason="Made Upstream", body=body[::-1], headers=CIMultiDict(headers)
        )

    async def compressed(request: web.Request) -> web.Response:
        await record(request, await request.read())
        body = gzip.compress(b"compressed text")
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def redirect(request: web.Request) -> web.Response:
        await record(request, await request.read())
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def streamed(request: web.Request) -> web.StreamResponse:
        await record(request, await request.read())
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(3):
            await response.write(f"part{i};".encode())
            await asyncio.sleep(0.05)  # a slow producer: the parts go out one by one
        await response.write_eof()
        return response

    async def anything(request: web.Request) -> web.Response:
        await record(request, await request.read())
        return web.Response(text=request.raw_path)

    app = web.Application(client_max_size=64 * MIB)
    app.router.add_route("*", "/blob/{size:[0-9]+}", blob_handler)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/root/echo", echo)
    app.router.add_route("GET", "/slow", slow)
    app.router.add_route("*", "/api/made/{tail:.*}", made)
    app.router.add_route("GET", "/gzip", compressed)
    app.router.add_route("GET", "/redirect", redirect)
    app.router.add_route("GET", "/slow-stream", streamed)
    app.router.add_route("*", "/{tail:.*}", anything)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = int(runner.addresses[0][1])
    state.url = f"http://127.0.0.1:{state.port}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


def http_config(
    relay: Relay,
    http: Sequence[str] = (),
    remote: Sequence[str] = (),
    document: dict[str, Any] | None = None,
) -> BridgeConfig:
    base = parse_config({"shutdown_grace_period": 5, "connect_timeout": 5, **(document or {})})
    return merge_cli(
        base,
        ["-x", relay.connection_string()]
        + [arg for spec in http for arg in ("-H", spec)]
        + [arg for spec in remote for arg in ("-R", spec)],
    )


@asynccontextmanager
async def running(config: BridgeConfig) -> AsyncIterator[BridgeAgent]:
    async with BridgeAgent(config, retry_schedule=FAST_RETRY) as agent:
        yield agent


def client(relay: Relay, entity: str = "hc") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=relay.http_url, timeout=30, headers={AUTH: relay.token(entity)}
    )


# -- bodies both ways --------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_get_downloads_bodies(relay: Relay, size: int) -> None:
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}"])):
        async with client(relay) as http:
            response = await http.get(f"/hc/blob/{size}")
    assert response.status_code == 200
    assert len(response.content) == size
    assert sha(response.content) == sha(blob(size)) == response.headers["x-sha256"]
    assert up.seen[0]["method"] == "GET"
    assert up.seen[0]["path_qs"] == f"/blob/{size}"


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
async def test_post_uploads_and_echoes_bodies(relay: Relay, size: int) -> None:
    payload = blob(size, seed=size + 1)
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}"])):
        async with client(relay) as http:
            response = await http.post(
                "/hc/echo", content=payload, headers={"Content-Type": "application/octet-stream"}
            )
    assert response.status_code == 201
    # The upstream received exactly what was sent ...
    assert up.seen[0]["size"] == size
    assert up.seen[0]["sha"] == sha(payload)
    assert response.headers["x-sha256"] == sha(payload)
    # ... and the whole echo came back.
    assert len(response.content) == size
    assert sha(response.content) == sha(payload)


# -- headers, paths, queries -------------------------------------------------------------------


async def test_forwarded_headers_reach_the_upstream(relay: Relay) -> None:
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}"])):
        async with client(relay) as http:
            plain = await http.get("/hc/who", headers={"X-App": "kept"})
            chained = await http.get(
                "/hc/who", headers={"X-Forwarded-For": "10.1.2.3", "Via": "1.0 corp-proxy"}
            )
    assert plain.status_code == chained.status_code == 200
    first, second = (seen["headers"] for seen in up.seen)
    assert first["Via"] == "1.1 hybridrelay"
    assert first["X-Forwarded-For"] == "127.0.0.1"
    assert first["X-Forwarded-Proto"] == "http"  # a plain-text relay (ws://)
    assert first["X-Forwarded-Host"] == f"127.0.0.1:{relay.server.port}"
    assert first["X-App"] == "kept"
    # The public host, as nginx's "proxy_set_header Host $host": the upstream's URLs name the
    # relay, and X-Forwarded-Prefix says where the upstream's root is there.
    assert first["Host"] == f"127.0.0.1:{relay.server.port}"
    assert first["X-Forwarded-Prefix"] == "/hc"
    assert AUTH not in first  # the relay consumed the token
    assert second["X-Forwarded-For"] == "10.1.2.3, 127.0.0.1"
    assert second["Via"] == "1.0 corp-proxy, 1.1 hybridrelay"
    # The response is marked as having passed the proxy too.
    assert plain.headers["via"].startswith("1.1 hybridrelay")


async def test_credentials_for_proxies_and_claimed_origins_do_not_reach_the_upstream(
    relay: Relay,
) -> None:
    claims = {
        "Proxy-Authorization": "Basic eDp5",
        "X-Forwarded-Proto": "gopher",
        "X-Forwarded-Host": "evil.example",
    }
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}"])):
        async with client(relay) as http:
            response = await http.get("/hc/who", headers=claims)
    assert response.status_code == 200
    seen = up.seen[0]["headers"]
    assert "Proxy-Authorization" not in seen
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{relay.server.port}"


async def test_status_reason_and_response_headers_come_back(relay: Relay) -> None:
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}/api"])):
        async with client(relay) as http:
            response = await http.post("/hc/made/1?x=1&sb-hc-id=t", content=b"abc")
    assert response.status_code == 201
    assert response.reason_phrase == "Made Upstream"
    assert response.content == b"cba"
    assert up.seen[0]["path_qs"] == "/api/made/1?x=1"  # the relay's sb-hc-* parameters gone
    assert "x-hop" not in response.headers  # named by the upstream's Connection header
    assert "proxy-authenticate" not in response.headers
    # Both: hybridrelay's repeatedResponseHeaders extension (PROTOCOL.md 6.4).
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    # Each hop appends itself: the upstream's cache, the bridge, then the relay.
    assert response.headers["via"].startswith("1.0 upstream-cache, 1.1 hybridrelay, 1.1 ")
    await assert_no_exchanges_left(relay)


async def test_bodies_redirects_and_streams_pass_as_they_are(relay: Relay) -> None:
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}"])):
        async with client(relay) as http:
            compressed = await http.get("/hc/gzip", headers={"Accept-Encoding": "gzip"})
            redirect = await http.get("/hc/redirect")
            streamed = await http.get("/hc/slow-stream")
    assert compressed.headers["content-encoding"] == "gzip"
    assert compressed.content == b"compressed text"  # httpx decoded the untouched gzip body
    assert up.seen[0]["headers"]["Accept-Encoding"] == "gzip"
    assert redirect.status_code == 302  # not followed by the proxy
    # The upstream's root is /hc on the relay (nginx's proxy_redirect default).
    assert redirect.headers["location"] == "/hc/elsewhere"
    assert streamed.text == "part0;part1;part2;"
    assert [seen["path_qs"] for seen in up.seen] == ["/gzip", "/redirect", "/slow-stream"]


async def test_base_path_mapping_and_query_strings(relay: Relay) -> None:
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}/base/v1/"])):
        async with client(relay) as http:
            nested = await http.get("/hc/items/42")
            bare = await http.get("/hc")
            query = await http.get(
                "/hc/search", params=[("q", "a b&c"), ("tag", "x"), ("tag", "y"), ("empty", "")]
            )
            raw = await http.get("/hc/raw?z=%2F%20%E2%9C%93&flag")
    assert nested.text == "/base/v1/items/42"
    assert bare.text == "/base/v1"
    assert query.text == "/base/v1/search?q=a+b%26c&tag=x&tag=y&empty="
    assert raw.text == "/base/v1/raw?z=%2F%20%E2%9C%93&flag"
    assert [seen["path_qs"] for seen in up.seen] == [
        nested.text,
        bare.text,
        query.text,
        raw.text,
    ]


async def test_entity_with_a_slash_and_root_target(relay: Relay) -> None:
    async with upstream_server() as up, running(http_config(relay, [f"a/b:{up.url}"])):
        async with client(relay, "a/b") as http:
            deep = await http.get("/a/b/c/d?e=f")
            root = await http.get("/a/b")
    assert deep.text == "/c/d?e=f"
    assert root.text == "/"


# -- failures ----------------------------------------------------------------------------------


async def test_upstream_down_is_502(relay: Relay) -> None:
    async with upstream_server() as up:
        dead = up.url
    # Nothing listens on that port any more.
    async with running(http_config(relay, [f"hc:{dead}"])), client(relay) as http:
        response = await http.get("/hc/anything")
    assert response.status_code == 502
    assert "upstream" in response.reason_phrase.lower()
    assert "via" in response.headers  # answered by the bridge, not the relay


async def test_websocket_sender_refused_by_an_http_only_upstream_is_502(relay: Relay) -> None:
    # The upstream answers the upgrade 200 (it does not speak WebSocket): the sender is
    # refused before any 101, with the reason (websocket_forward.py).
    async with upstream_server() as up, running(http_config(relay, [f"hc:{up.url}"])):
        sender = HybridConnectionClient.from_connection_string(relay.connection_string("hc"))
        try:
            with pytest.raises(ConnectionRejectedError) as caught:
                await sender.create_connection()
        finally:
            await sender.aclose()
    assert caught.value.status == 502
    assert "upstream" in str(caught.value).lower()
    assert [seen["headers"].get("Upgrade") for seen in up.seen] == ["websocket"]


async def test_shutdown_drains_requests_in_flight(relay: Relay) -> None:
    async with upstream_server() as up, client(relay) as http:
        agent = BridgeAgent(http_config(relay, [f"hc:{up.url}"]), retry_schedule=FAST_RETRY)
        async with agent:
            slow = asyncio.create_task(http.get("/hc/slow"))
            async with asyncio.timeout(10):
                await up.slow_started.wait()
            agent.shutdown()
            # While the slow request drains, new requests are refused, not forwarded.
            late = await http.get("/hc/late")
            assert late.status_code == 503
            assert "shutting down" in late.reason_phrase
            up.release.set()
            finished = await slow
        assert finished.status_code == 200
        assert finished.text == "finally"
        assert [seen["path_qs"] for seen in up.seen] == ["/slow"]
        # The listener is gone after the drain: the relay has nobody to give requests to.
        after = await http.get("/hc/after")
        assert after.status_code == 502


async def test_readiness_waits_for_the_http_listener(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hybridrelay.bridge")
    # Nothing listens on the relay's address (a 404 would end the bridge at start, issue 15):
    # the forward keeps retrying (the same cause again at DEBUG) and is never up.
    config = http_config(relay, ["nosuch:http://127.0.0.1:9"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"ws://127.0.0.1:{probe.getsockname()[1]}"
    config = dataclasses.replace(
        config, connection=dataclasses.replace(config.connection, endpoint=closed)
    )
    agent = BridgeAgent(config, retry_schedule=FAST_RETRY)
    task = asyncio.create_task(agent.run())
    try:
        await eventually(
            lambda: sum("-H nosuch: cannot listen" in r.getMessage() for r in caplog.records) >= 2
        )
        assert not agent.started.is_set()
        assert not task.done()
    finally:
        agent.shutdown()
        async with asyncio.timeout(10):
            await task  # stops cleanly while retrying


# -- configuration -----------------------------------------------------------------------------


def test_http_forward_cannot_share_a_hybrid_connection(relay: Relay) -> None:
    with pytest.raises(ConfigurationError, match="also a -R"):
        http_config(relay, ["hc:http://127.0.0.1:8080"], remote=["hc:127.0.0.1:22"])
    with pytest.raises(ConfigurationError, match="also a -R"):
        http_config(relay, ["HC:http://127.0.0.1:8080"], remote=["hc:127.0.0.1:22"])
    with pytest.raises(ConfigurationError, match="two HTTP forwards"):
        http_config(relay, ["hc:http://127.0.0.1:1", "hc:http://127.0.0.1:2"])
    # Different hybrid connections are fine.
    config = http_config(relay, ["hc:http://127.0.0.1:8080"], remote=["other:127.0.0.1:22"])
    assert config.http_forwards == (HttpForward("hc", "http://127.0.0.1:8080"),)


def test_http_forward_from_text() -> None:
    parsed = HttpForward.from_text("a/b:http://127.0.0.1:8080/base/")
    assert parsed == HttpForward("a/b", "http://127.0.0.1:8080/base")
    assert HttpForward.from_text("/hc/:https://example.com") == HttpForward(
        "hc", "https://example.com"
    )
    for bad in ("hc", "hc:ftp://x", ":http://x:1", "hc:http://", "hc:http://x:1/?q=1"):
        with pytest.raises(ConfigurationError):
            HttpForward.from_text(bad)


def test_http_forwards_in_the_config_file(tmp_path: Path, relay: Relay) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "http_forwards:\n"
        "  - 'api:http://127.0.0.1:8000/v1/'\n"
        "  - hybrid_connection: /admin/\n"
        "    target: https://intranet.example:8443\n"
    )
    config = load_config(path)
    assert config.http_forwards == (
        HttpForward("api", "http://127.0.0.1:8000/v1"),
        HttpForward("admin", "https://intranet.example:8443"),
    )
    # The command line adds to the file's list.
    merged = merge_cli(
        config,
        ["-x", relay.connection_string(), "-H", "web:http://127.0.0.1:9"],
    )
    assert [str(f) for f in merged.http_forwards] == [
        "api:http://127.0.0.1:8000/v1",
        "admin:https://intranet.example:8443",
        "web:http://127.0.0.1:9",
    ]


def test_the_example_file_has_http_forwards() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "bridge-http.yaml")
    assert [str(f) for f in config.http_forwards] == [
        "api:http://127.0.0.1:8000/v1",
        "admin:http://127.0.0.1:9000",
    ]
    assert "REPLACE-WITH" not in repr(config)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"http_forwards": [{"hybrid_connection": "a", "target": "x", "port": 1}]}, "port"),
        ({"http_forwards": [{"hybrid_connection": "a"}]}, r"http_forwards\[0\]\.target: required"),
        ({"http_forwards": [{"target": "http://h:1"}]}, "hybrid_connection: required"),
        ({"http_forwards": [{"hybrid_connection": "a", "target": "ftp://h"}]}, "http"),
        ({"http_forwards": [{"hybrid_connection": "a", "target": "http://u:p@h"}]}, "credentials"),
        ({"http_forwards": ["nonsense"]}, "-H expects"),
        ({"http_forwards": "a:http://h:1"}, "expected a list"),
    ],
)
def test_http_forward_config_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_config(document)


def test_entity_path_of_the_connection_string_applies_to_http_forwards(relay: Relay) -> None:
    with pytest.raises(ConfigurationError, match="EntityPath"):
        merge_cli(
            BridgeConfig(),
            ["-x", relay.connection_string("hc"), "-H", "other:http://127.0.0.1:1"],
        )


# -- the real command --------------------------------------------------------------------------


async def _read_until(stream: asyncio.StreamReader, marker: str, lines: list[str]) -> None:
    async with asyncio.timeout(20):
        while True:
            line = (await stream.readline()).decode(errors="replace")
            assert line, "the bridge exited before it was ready:\n" + "".join(lines)
            lines.append(line)
            if marker in line:
                return


async def test_bridge_command_with_h_as_a_subprocess(relay: Relay) -> None:
    async with upstream_server() as up:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hybridrelay",
            "bridge",
            "-x",
            relay.connection_string(),
            "-H",
            f"hc:{up.url}/root",
            "--shutdown-grace-period",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        lines: list[str] = []
        try:
            await _read_until(process.stderr, "all forwards are up", lines)
            payload = blob(300 * KIB, seed=3)
            async with client(relay) as http:
                response = await http.put("/hc/echo?x=1", content=payload)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                _, rest = await process.communicate()
        err = "".join(lines) + rest.decode(errors="replace")
    assert process.returncode == 0, err
    assert response.status_code == 200
    assert sha(response.content) == sha(payload)
    assert up.seen[0]["path_qs"] == "/root/echo?x=1"
    assert up.seen[0]["headers"]["Via"] == "1.1 hybridrelay"
    assert "-H hc: forwarding HTTP requests to" in err
    assert "Traceback" not in err
    # The key never appears in the bridge's output.
    key = relay.connection_string().split("SharedAccessKey=")[1]
    assert key not in err


async def test_bridge_command_rejects_a_bad_h(relay: Relay) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hybridrelay",
        "bridge",
        "-x",
        relay.connection_string(),
        "-H",
        "hc:ftp://127.0.0.1:21",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, err = await process.communicate()
    text = err.decode()
    assert process.returncode == 2
    assert text.count("\n") == 1, text
    assert "-H expects hybrid_connection:http://host:port[/base]" in text
