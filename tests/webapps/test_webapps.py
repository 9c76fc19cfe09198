"""A real Starlette app behind ``hybridrelay serve-app`` and behind ``bridge -H`` -> uvicorn,
called through a relay (all three real processes but uvicorn) with httpx (issue 14).

What a web app needs from HTTP relaying: server-sent events one by one, bodies of any size
streaming both ways in bounded memory, the sender's disconnect reaching the app, every
Set-Cookie, redirects that lead back through the relay, HEAD, 304, multipart, the
X-Forwarded-* headers and the public URLs the app builds; plain text and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TlsFiles
from tests.webapps.app import BLOCK, blob_block, blob_sha256
from tests.webapps.harness import (
    AUTH,
    ENTITY,
    Process,
    RelayProcess,
    bridge_h,
    relay_process,
    rss_kib,
    serve_app,
    uvicorn_server,
)

MIB = 1024 * 1024
TOPOLOGIES = ["serve-app", "bridge-h"]
#: The default run's large bodies (each way); HYBRIDRELAY_SOAK=1 adds a 1 GiB run.
LARGE = 64 * MIB
SOAK = 1024 * MIB
#: How much a relay or listener process may grow while bodies of LARGE (or SOAK) bytes pass
#: both ways: buffers, not bodies.
RSS_GROWTH_LIMIT_KIB = 24 * 1024


@contextlib.asynccontextmanager
async def web_app(
    tmp_path: Path,
    topology: str,
    tls: TlsFiles | None = None,
    *extra: str,
    anonymous: bool = False,
) -> AsyncIterator[tuple[RelayProcess, Process, httpx.AsyncClient]]:
    """The relay, the app behind it and a client: (relay, the listener's process, client);
    ``anonymous``: the hybrid connection requires no client authorization."""
    async with relay_process(tmp_path, tls, anonymous=anonymous) as relay:
        async with contextlib.AsyncExitStack() as stack:
            if topology == "serve-app":
                listener = await stack.enter_async_context(serve_app(relay, *extra))
            else:
                # The upstream knows it is served under /hc (as uvicorn --root-path /hc).
                upstream = await stack.enter_async_context(uvicorn_server(root_path="/" + ENTITY))
                listener = await stack.enter_async_context(bridge_h(relay, upstream, *extra))
            http = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=relay.http_url,
                    headers={AUTH: relay.token()},
                    timeout=60,
                    verify=ssl.create_default_context(cafile=relay.ca_file)
                    if relay.ca_file
                    else True,
                )
            )
            yield relay, listener, http


async def sse_arrive_one_by_one(http: httpx.AsyncClient, count: int = 5) -> None:
    """Event i+1 is only produced after the app heard (on another connection) that event i
    arrived: a relay or listener that holds events back never gets past the first."""
    stream = uuid.uuid4().hex
    seen: list[str] = []
    async with http.stream("GET", f"/{ENTITY}/sse", params={"stream": stream, "n": count}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in r.headers
        assert r.headers["transfer-encoding"] == "chunked"
        async with asyncio.timeout(30):
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                seen.append(line)
                index = len(seen) - 1
                if index + 1 < count:
                    ack = await http.get(f"/{ENTITY}/ack", params={"stream": stream, "i": index})
                    assert ack.status_code == 200
    assert seen == [f"data: event {i}" for i in range(count)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_sse_events_arrive_one_by_one(tmp_path: Path, topology: str) -> None:
    async with web_app(tmp_path, topology) as (_, _, http):
        await sse_arrive_one_by_one(http)


async def disconnect_reaches_app(http: httpx.AsyncClient) -> None:
    stream = uuid.uuid4().hex
    async with http.stream("GET", f"/{ENTITY}/forever", params={"stream": stream}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # the first event: now the client goes away
    ended = await http.get(f"/{ENTITY}/ended", params={"stream": stream})
    assert ended.status_code == 200, ended.text
    assert ended.text == "ended"


async def disconnect_before_the_answer_reaches_app(http: httpx.AsyncClient) -> None:
    """A long poll whose client leaves before any answer: the app hears of it. (Its body is
    chunked, so the request has a rendezvous: an inline request has nothing to close.)"""
    stream = uuid.uuid4().hex

    async def body() -> AsyncIterator[bytes]:
        yield b"waiting"

    poll = asyncio.create_task(
        http.post(f"/{ENTITY}/hold", params={"stream": stream}, content=body())
    )
    held = await http.get(f"/{ENTITY}/held", params={"stream": stream})
    assert held.status_code == 200, held.text
    # The app has the request and holds the answer. The client goes away without it.
    with contextlib.suppress(asyncio.CancelledError):
        poll.cancel()
        await poll
    ended = await http.get(f"/{ENTITY}/ended", params={"stream": stream})
    assert ended.status_code == 200, ended.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_client_disconnect_before_the_answer_reaches_the_app(
    tmp_path: Path, topology: str
) -> None:
    async with web_app(tmp_path, topology) as (_, _, http):
        await disconnect_before_the_answer_reaches_app(http)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_client_disconnect_reaches_the_app(tmp_path: Path, topology: str) -> None:
    """The app's event generator is stopped when the client goes away (http.disconnect for
    serve-app; bridge -H closes its upstream request, so uvicorn tells the app)."""
    async with web_app(tmp_path, topology) as (_, _, http):
        await disconnect_reaches_app(http)


class RssSampler:
    """Peak VmRSS of some processes while a block runs (sampled every 20 ms)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.baseline = {pid: rss_kib(pid) for pid in pids}
        self.peak = dict(self.baseline)
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_kib(pid))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def growth(self) -> dict[int, int]:
        return {pid: self.peak[pid] - self.baseline[pid] for pid in self.pids}


async def large_bodies_up(http: httpx.AsyncClient, size: int) -> None:
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for index, start in enumerate(range(0, size, BLOCK)):
            block = blob_block(index)[: size - start]
            sent.update(block)
            yield block

    up = await http.post(f"/{ENTITY}/sha256", content=body())
    assert up.status_code == 200, up.text
    answer = up.json()
    assert (answer["sha256"], answer["size"]) == (sent.hexdigest(), size)
    if size > 1024 * 1024:  # the app read it in parts as it came, not whole
        assert answer["parts"] > 1, answer


async def large_bodies_both_ways(http: httpx.AsyncClient, size: int) -> None:
    await large_bodies_up(http, size)
    queries: list[dict[str, str | int]] = [{"size": size}, {"size": size, "length": "1"}]
    for query in queries:
        received = hashlib.sha256()
        total = 0
        async with http.stream("GET", f"/{ENTITY}/blob", params=query) as r:
            assert r.status_code == 200
            if "length" in query:  # streamed under the app's Content-Length
                assert r.headers["content-length"] == str(size)
            else:
                assert r.headers["transfer-encoding"] == "chunked"
            async for chunk in r.aiter_raw():
                received.update(chunk)
                total += len(chunk)
        assert total == size
        assert received.hexdigest() == blob_sha256(size)


async def check_large_bodies(tmp_path: Path, topology: str, size: int) -> None:
    async with web_app(tmp_path, topology) as (relay, listener, http):
        warm = await http.get(f"/{ENTITY}/small")  # paths and buffers in use once
        assert warm.status_code == 200
        await large_bodies_both_ways(http, 4 * MIB)
        async with RssSampler([relay.process.pid, listener.pid]) as rss:
            await large_bodies_both_ways(http, size)
        growth = rss.growth()
    for pid, kib in growth.items():
        assert kib < RSS_GROWTH_LIMIT_KIB, f"process {pid} grew by {kib} KiB: {growth}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_large_bodies_both_ways_in_bounded_memory(tmp_path: Path, topology: str) -> None:
    await check_large_bodies(tmp_path, topology, LARGE)


@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("HYBRIDRELAY_SOAK") != "1", reason="HYBRIDRELAY_SOAK=1 only")
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_one_gibibyte_each_way_soak(tmp_path: Path, topology: str) -> None:
    await check_large_bodies(tmp_path, topology, SOAK)


async def headers_and_methods(relay: RelayProcess, http: httpx.AsyncClient, topology: str) -> None:
    proto = "https" if relay.base_url.startswith("wss") else "http"
    public_host = f"127.0.0.1:{relay.port}"
    cookies = await http.get(f"/{ENTITY}/cookies")
    set_cookies = cookies.headers.get_list("set-cookie")
    assert [c.split("=", 1)[0] for c in set_cookies] == ["first", "second", "third"], set_cookies
    assert "expires=Wed, 21 Oct 2037 07:28:00 GMT" in set_cookies[1]
    assert set(cookies.cookies.keys()) == {"first", "second", "third"}

    redirects = ["/redirect-url-for"] + (["/redirect"] if topology == "bridge-h" else [])
    for path in redirects:
        followed = await http.get(f"/{ENTITY}{path}", follow_redirects=True)
        assert followed.status_code == 200, (path, followed.history)
        assert followed.text == "small"
        assert followed.url.path == f"/{ENTITY}/small"
        assert followed.history[0].headers["location"] in (
            f"/{ENTITY}/small",
            f"{proto}://{public_host}/{ENTITY}/small",
        )

    links = (await http.get(f"/{ENTITY}/links")).json()
    assert links["url_for"] == f"{proto}://{public_host}/{ENTITY}/small"
    assert links["root_path"] == f"/{ENTITY}"
    assert links["client"] == "127.0.0.1"
    forwarded = links["forwarded"]
    assert forwarded["x-forwarded-proto"] == proto
    assert forwarded["x-forwarded-host"] == public_host
    assert forwarded["x-forwarded-prefix"] == f"/{ENTITY}"
    assert forwarded["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"

    head = await http.head(f"/{ENTITY}/small")
    assert head.status_code == 200
    assert head.headers["content-length"] == "5"
    assert head.content == b""

    tagged = await http.get(f"/{ENTITY}/etag")
    assert tagged.status_code == 200
    again = await http.get(f"/{ENTITY}/etag", headers={"If-None-Match": tagged.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == '"v1"'

    data = os.urandom(300 * 1024)
    form = await http.post(
        f"/{ENTITY}/upload", data={"note": "hello"}, files={"file": ("a.bin", data)}
    )
    assert form.status_code == 200, form.text
    assert form.json() == {
        "note": {"text": "hello"},
        "file": {
            "filename": "a.bin",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_headers_redirects_head_304_multipart(tmp_path: Path, topology: str) -> None:
    async with web_app(tmp_path, topology) as (relay, listener, http):
        await headers_and_methods(relay, http, topology)
        # The access log: one uvicorn-style line per request (never a token).
        line = await listener.wait_for_line(f'"GET /{ENTITY}/small" 200 5B')
        assert "hybridrelay.access" in line and " 127.0.0.1:" in line, line
        assert await listener.wait_for_line(f'"HEAD /{ENTITY}/small" 200 ')
    assert "SharedAccessSignature" not in listener.output()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_no_access_log(tmp_path: Path, topology: str) -> None:
    async with web_app(tmp_path, topology, None, "--no-access-log") as (_, listener, http):
        assert (await http.get(f"/{ENTITY}/small")).status_code == 200
    # The process has exited (its last log lines are written): no access line among them.
    assert f'"GET /{ENTITY}/small"' not in listener.output(), listener.output()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_the_same_over_tls(tmp_path: Path, topology: str, tls_files: TlsFiles) -> None:
    async with web_app(tmp_path, topology, tls_files) as (relay, _, http):
        await sse_arrive_one_by_one(http)
        await disconnect_reaches_app(http)
        await headers_and_methods(relay, http, topology)
        await large_bodies_both_ways(http, 16 * MIB)


@pytest.mark.timeout(300)
async def test_serve_app_gives_memory_back_after_16_mib_responses_over_tls(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """A series of 16 MiB uploads and whole (not streamed) 16 MiB responses over TLS: the
    listener's resident set comes back to near where it was. Before the SDK sent large writes
    in drained 256 KiB frames it handed the TLS transport 16 MiB at once, and serve-app kept
    ~70 MiB after six of these (hundreds of MiB with four at a time)."""
    size = 16 * MIB
    async with web_app(tmp_path, "serve-app", tls_files) as (_, listener, http):
        assert (await http.get(f"/{ENTITY}/small")).status_code == 200
        before = rss_kib(listener.pid)
        for _ in range(6):
            await large_bodies_up(http, size)
            total = 0
            async with http.stream("GET", f"/{ENTITY}/whole", params={"size": size}) as r:
                assert r.status_code == 200
                assert r.headers["content-length"] == str(size)
                async for chunk in r.aiter_raw():
                    total += len(chunk)
            assert total == size
        after = rss_kib(listener.pid)
    assert after - before < RSS_GROWTH_LIMIT_KIB, f"serve-app grew from {before} to {after} KiB"
