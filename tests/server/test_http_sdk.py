"""The SDK's request handler (``HybridConnectionListener.request_handler``) behind our relay,
called with httpx over real sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from hybridrelay.client import HybridConnectionListener
from hybridrelay.client.http import RelayedHttpContext, RequestHandler
from tests.conftest import Relay, RelayFactory, eventually
from tests.server.test_http_relay import assert_no_exchanges_left

AUTH = "ServiceBusAuthorization"
KIB = 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def sdk_listener(
    relay: Relay, handler: RequestHandler | None, entity: str = "hc"
) -> AsyncIterator[HybridConnectionListener]:
    listener = HybridConnectionListener.from_connection_string(
        relay.connection_string(entity), request_handler=handler
    )
    async with listener:
        yield listener


def client(relay: Relay, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=relay.http_url,
        timeout=30,
        headers={AUTH: relay.token("hc")},
        **kw,  # type: ignore[arg-type]
    )


async def echo_sha(ctx: RelayedHttpContext) -> None:
    body = await ctx.read()
    await ctx.respond(
        200, "Echoed", {"content-type": "application/octet-stream", "x-sha256": sha(body)}
    )
    # Written in pieces, as an application would: crosses the 64 KiB switch mid-way.
    for start in range(0, len(body), 100 * KIB):
        await ctx.write(body[start : start + 100 * KIB][::-1])
    await ctx.finish()


@pytest.mark.parametrize(
    "size", [0, 64 * KIB, 64 * KIB + 1, 10 * 1024 * KIB], ids=["0", "64k", "64k+1", "10M"]
)
async def test_sdk_body_sizes_both_ways(relay: Relay, size: int) -> None:
    payload = os.urandom(size)
    expected = b"".join(
        payload[start : start + 100 * KIB][::-1] for start in range(0, size, 100 * KIB)
    )
    async with sdk_listener(relay, echo_sha), client(relay) as http:
        response = await http.post("/hc/echo?x=1", content=payload)
    assert response.status_code == 200
    assert response.reason_phrase == "Echoed"
    assert response.headers["x-sha256"] == sha(payload)
    assert len(response.content) == size
    assert sha(response.content) == sha(expected)
    assert "via" in response.headers
    await assert_no_exchanges_left(relay)


async def test_sdk_request_details(relay: Relay) -> None:
    seen: list[RelayedHttpContext] = []

    async def handler(ctx: RelayedHttpContext) -> None:
        seen.append(ctx)
        # The SDK drops Connection and what it names: the relay would never see the list.
        headers = {"X-Path": ctx.path, "Connection": "close, X-Private", "X-Private": "1"}
        await ctx.respond(202, headers=headers)
        await ctx.write(b"ok")

    async with sdk_listener(relay, handler), client(relay) as http:
        response = await http.get(
            "/hc/a/b?q=1&sb-hc-id=x", headers=[("X-Multi", "1"), ("X-Multi", "2")]
        )
    assert response.status_code == 202
    assert response.content == b"ok"  # finished automatically when the handler returned
    assert response.headers["x-path"] == "/hc/a/b"
    assert "x-private" not in response.headers
    (ctx,) = seen
    assert ctx.method == "GET"
    assert ctx.target == "/hc/a/b?q=1"
    assert ctx.query == "q=1"
    assert ctx.header("x-multi") == "1, 2"
    assert ctx.header(AUTH) is None
    assert ctx.remote_endpoint is not None and ctx.remote_endpoint[0] == "127.0.0.1"


async def test_sdk_chunked_upload(relay: Relay) -> None:
    parts = [os.urandom(n) for n in (1, 100 * KIB, 3, 500 * KIB)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async def handler(ctx: RelayedHttpContext) -> None:
        chunks = [chunk async for chunk in ctx.body]
        await ctx.respond(200)
        await ctx.write(sha(b"".join(chunks)).encode())

    async with sdk_listener(relay, handler), client(relay) as http:
        response = await http.put("/hc/up", content=body())
    assert response.status_code == 200
    assert response.text == sha(b"".join(parts))


async def test_sdk_no_handler_is_501_and_failing_handler_is_500(relay: Relay) -> None:
    async def failing(ctx: RelayedHttpContext) -> None:
        await ctx.respond(200)
        await ctx.write(b"partial")
        raise RuntimeError("boom")

    async with sdk_listener(relay, None), client(relay) as http:
        missing = await http.get("/hc")
    async with sdk_listener(relay, failing), client(relay) as http:
        failed = await http.get("/hc")
    assert missing.status_code == 501
    assert "RequestHandler" in missing.reason_phrase and "TrackingId:" in missing.reason_phrase
    assert "via" in missing.headers  # the listener's answer, passed through by the relay
    assert failed.status_code == 500
    assert "RequestHandler" in failed.reason_phrase and "exception" in failed.reason_phrase
    assert failed.content == b""


async def test_sdk_streamed_response_with_flush(relay: Relay) -> None:
    async def handler(ctx: RelayedHttpContext) -> None:
        await ctx.respond(200, headers={"content-type": "text/event-stream"})
        await ctx.write(b"data: 1\n\n")
        await ctx.flush()  # switch to the rendezvous now; the rest streams
        for i in range(2, 6):
            await asyncio.sleep(0.02)
            await ctx.write(f"data: {i}\n\n".encode())

    async with sdk_listener(relay, handler), client(relay) as http:
        response = await http.get("/hc/events")
    assert response.status_code == 200
    assert response.text == "".join(f"data: {i}\n\n" for i in range(1, 6))


@pytest.mark.parametrize("answer", ["stream", "small", "fails"])
async def test_sdk_event_stream_requests_get_their_rendezvous_at_once(
    relay: Relay, answer: str
) -> None:
    """``Accept: text/event-stream`` (what EventSource sends): the listener opens the request's
    rendezvous as the request arrives, before the handler writes, so the first event does not
    wait for its connect and upgrade; whatever the handler then answers goes there."""
    opened_before_write: list[bool] = []

    def rendezvous_open(ctx: RelayedHttpContext) -> bool:
        exchange = relay.server.http._by_id.get(ctx.id)
        return exchange is not None and exchange.rendezvous.done()

    async def handler(ctx: RelayedHttpContext) -> None:
        wanted = ctx.header("accept") == "text/event-stream"
        if wanted:
            await eventually(lambda: rendezvous_open(ctx))
        opened_before_write.append(rendezvous_open(ctx))
        await ctx.respond(200, headers={"content-type": "text/event-stream"})
        if answer == "fails":
            raise RuntimeError("the handler fails before any byte")
        await ctx.write(b"data: 1\n\n")
        if answer == "stream":
            await ctx.flush()
            await ctx.write(b"data: 2\n\n")

    async with sdk_listener(relay, handler), client(relay) as http:
        sse = await http.get("/hc/events", headers={"Accept": "text/event-stream"})
        plain = await http.get("/hc/events")
    assert opened_before_write == [True, False]
    for response in (sse, plain):
        if answer == "fails":
            assert response.status_code == 500
        else:
            assert response.status_code == 200
            expected = "data: 1\n\n" + ("data: 2\n\n" if answer == "stream" else "")
            assert response.text == expected
    await assert_no_exchanges_left(relay)


async def test_sdk_200_concurrent_requests_and_keep_alive(relay: Relay) -> None:
    big = os.urandom(200 * KIB)
    ports: set[int] = set()

    async def handler(ctx: RelayedHttpContext) -> None:
        if ctx.remote_endpoint is not None and ctx.path == "/hc/ka":
            ports.add(ctx.remote_endpoint[1])
        await ctx.respond(200)
        await ctx.write(big if ctx.query == "big" else ctx.target.encode())

    async with sdk_listener(relay, handler):
        async with client(relay, limits=httpx.Limits(max_connections=200)) as http:
            responses = await asyncio.gather(*(http.get(f"/hc/{i}") for i in range(200)))
        assert [r.content for r in responses] == [f"/hc/{i}".encode() for i in range(200)]
        single = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with client(relay, limits=single) as http:
            for query in ("big", "small", "big", "small"):
                response = await http.get(f"/hc/ka?{query}")
                assert response.status_code == 200
                assert response.content == (big if query == "big" else f"/hc/ka?{query}".encode())
    assert len(ports) == 1  # one keep-alive connection carried all four
    await assert_no_exchanges_left(relay)


async def test_sdk_listener_close_cancels_handlers_and_fails_requests(relay: Relay) -> None:
    started = asyncio.Event()
    done = asyncio.Event()

    async def slow(ctx: RelayedHttpContext) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            done.set()

    listener = HybridConnectionListener.from_connection_string(
        relay.connection_string("hc"), request_handler=slow
    )
    async with client(relay) as http:
        async with listener:
            task = asyncio.create_task(http.get("/hc"))
            async with asyncio.timeout(10):
                await started.wait()
        # Closing the listener cancelled the handler; the relay answers the sender 502.
        async with asyncio.timeout(5):
            await done.wait()
            response = await task
    assert response.status_code == 502
    await assert_no_exchanges_left(relay)


async def test_sdk_slow_response_streams_after_two_seconds(make_relay: RelayFactory) -> None:
    """A response still being written 2 s after its first bytes switches to streaming over a
    rendezvous: its head reaches the relay within the 2.5 s deadline and the body keeps
    flowing, although the whole response takes longer than the deadline."""

    async def slow(ctx: RelayedHttpContext) -> None:
        await ctx.respond(200)
        for i in range(9):
            await ctx.write(f"{i};".encode())
            await asyncio.sleep(0.4)

    entities = [{"name": "hc", "http_response_timeout": 2.5}]
    async with make_relay(entities=entities) as relay:
        async with sdk_listener(relay, slow), client(relay) as http:
            loop = asyncio.get_running_loop()
            start = loop.time()
            response = await http.get("/hc/slow")
            elapsed = loop.time() - start
    assert response.status_code == 200
    assert response.text == "".join(f"{i};" for i in range(9))
    assert elapsed > 3.0  # longer than the deadline, and still complete
