"""The relay's own HTTP front (server/sender_http.py): it answers what it relays exactly as
aiohttp's path does, and hands aiohttp the rest of a connection intact.

The differential tests send the same request twice, once served by the front and once with
the front made to hand every request over (its ``_prepare`` answering None), and compare the
two answers on the wire: status line, headers (but ``Date``) and body.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import h11
import pytest

from hybridrelay.server import sender_http
from hybridrelay.server.sender_http import _SenderConnection
from tests.conftest import Relay, RelayFactory, eventually
from tests.server.http_peer import Received, Reply, peer_listener
from tests.server.test_http_relay import assert_no_exchanges_left

pytestmark = pytest.mark.timeout(60)

AUTH = "ServiceBusAuthorization"

Answer = tuple[int, bytes, list[tuple[bytes, bytes]], bytes]


def _played(client: h11.Connection, method: str) -> None:
    # h11 reads a response only to a request it sent: it plays the one written raw (its
    # method decides the framing: a HEAD's answer has no body).
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())


async def exchange(relay: Relay, raw: bytes, methods: tuple[str, ...] = ("GET",)) -> list[Answer]:
    """Write ``raw`` (requests with ``methods``) on one connection; their answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    client = h11.Connection(h11.CLIENT)
    answers: list[Answer] = []
    try:
        writer.write(raw)
        await writer.drain()
        _played(client, methods[0])
        status, reason, headers, body = 0, b"", [], bytearray()
        while len(answers) < len(methods):
            event = client.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(65536), 20)
                client.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status, reason = event.status_code, event.reason
                headers = [(n, v) for n, v in event.headers.raw_items() if n.lower() != b"date"]
                body = bytearray()
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answers.append((status, reason, headers, bytes(body)))
                if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                    break
                if len(answers) < len(methods):
                    client.start_next_cycle()
                    _played(client, methods[len(answers)])
            elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
    finally:
        writer.close()
    return answers


def request(relay: Relay, method: str, target: str, *, body: bytes = b"", **kw: str) -> bytes:
    lines = [
        f"{method} {target} HTTP/{kw.pop('version', '1.1')}",
        f"Host: 127.0.0.1:{relay.server.port}",
    ]
    lines.append(f"{AUTH}: {relay.token('hc')}")
    for name, value in kw.items():
        lines.append(f"{name.replace('_', '-')}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def normalized(answer: Answer) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    status, reason, headers, body = answer
    # The relay's own answers carry a fresh TrackingId each: compare them without it.
    if b"TrackingId:" in reason:
        reason = reason.split(b"TrackingId:")[0]
        body = body.split(b"TrackingId:")[0]
    return status, reason, sorted((n.lower(), v) for n, v in headers), body


Handler = Callable[[Received], Awaitable[Reply]]


async def answers_both_ways(
    relay: Relay, monkeypatch: pytest.MonkeyPatch, raw: bytes, handler: Handler | None
) -> tuple[Answer, Answer]:
    methods = (raw.split(b" ", 1)[0].decode(),)

    async def serve() -> Answer:
        if handler is None:
            (answer,) = await exchange(relay, raw, methods)
            return answer
        async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
            (answer,) = await exchange(relay, raw, methods)
        return answer

    front = await serve()
    with monkeypatch.context() as patch:
        patch.setattr(_SenderConnection, "_prepare", lambda self, head: None)
        aiohttp_answer = await serve()
    await assert_no_exchanges_left(relay)
    return front, aiohttp_answer


def reply(**kw: object) -> Handler:
    async def handler(received: Received) -> Reply:
        return Reply(**kw)  # type: ignore[arg-type]

    return handler


async def echo(received: Received) -> Reply:
    return Reply(headers={"content-type": "application/x-echo"}, body=received.body[::-1])


CASES: list[tuple[str, Callable[[Relay], bytes], Handler | None]] = [
    (
        "get-small",
        lambda r: request(r, "GET", "/hc/a?x=1"),
        reply(headers={"content-type": "text/plain", "x-kit": "1"}, body=b"hi"),
    ),
    ("get-no-content-type", lambda r: request(r, "GET", "/hc/a"), reply(body=b"x")),
    ("get-empty-body", lambda r: request(r, "GET", "/hc/a"), reply(body=b"")),
    (
        "head-keeps-length",
        lambda r: request(r, "HEAD", "/hc/a"),
        reply(headers={"content-length": "1234", "content-type": "text/html"}),
    ),
    ("no-content", lambda r: request(r, "GET", "/hc/a"), reply(status=204, description=None)),
    (
        "not-modified",
        lambda r: request(r, "GET", "/hc/a", If_None_Match='"v1"'),
        reply(status=304, description="Not Modified", headers={"etag": '"v1"'}),
    ),
    ("post-echo", lambda r: request(r, "POST", "/hc/e", body=os.urandom(1000)), echo),
    ("post-empty", lambda r: request(r, "POST", "/hc/e"), echo),
    ("http10-close", lambda r: request(r, "GET", "/hc/a", version="1.0"), reply(body=b"ten")),
    (
        "http10-keep-alive",
        lambda r: request(r, "GET", "/hc/a", version="1.0", Connection="keep-alive"),
        reply(body=b"ten"),
    ),
    ("connection-close", lambda r: request(r, "GET", "/hc/a", Connection="close"), echo),
    ("no-listener", lambda r: request(r, "GET", "/hc/a"), None),
    (
        "odd-reason-and-server",
        lambda r: request(r, "GET", "/hc/a"),
        reply(
            status=299,
            description="Fine\u00e9 \x01 really",
            headers={"server": "upstream/1", "via": "1.0 inner"},
            body=b"ok",
        ),
    ),
    (
        "large-response-by-rendezvous",
        lambda r: request(r, "GET", "/hc/a"),
        reply(body=bytes(range(256)) * 400, fragments=3),
    ),
    (
        "streamed-response-by-rendezvous",
        lambda r: request(r, "GET", "/hc/a"),
        reply(body=b"small but streamed", via_rendezvous=True, fragments=2),
    ),
]


@pytest.mark.parametrize(("make", "handler"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_front_answers_as_aiohttp_did(
    relay: Relay,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Relay], bytes],
    handler: Handler | None,
) -> None:
    front, aiohttp_answer = await answers_both_ways(relay, monkeypatch, make(relay), handler)
    assert normalized(front) == normalized(aiohttp_answer)
    assert front[0] != 0


async def test_front_serves_keep_alive_then_hands_an_upgrade_to_aiohttp(relay: Relay) -> None:
    """A connection the front served goes on as a WebSocket when its next request is one."""
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        try:
            writer.write(request(relay, "POST", "/hc/e", body=b"abc"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"Content-Length: 3\r\n" in head
            assert await asyncio.wait_for(reader.readexactly(3), 20) == b"cba"
            # Now an upgrade on the same connection: not the front's, aiohttp's. A listener's
            # control channel is the one the relay opens at once.
            key = "dGhlIHNhbXBsZSBub25jZQ=="
            writer.write(
                (
                    "GET /$hc/hc?sb-hc-action=listen HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{relay.server.port}\r\n"
                    f"{AUTH}: {relay.token('hc')}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(b"HTTP/1.1 101"), head
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's example accept
            await eventually(lambda: relay.server.broker.listener_count("hc") == 2)
        finally:
            writer.close()


async def test_pipelined_requests_front_then_aiohttp(relay: Relay) -> None:
    """Three requests in one write: two the front relays, then a chunked upload (aiohttp's):
    three answers, in order, each with its own body."""
    chunked = (
        "POST /hc/e HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{relay.server.port}\r\n{AUTH}: {relay.token('hc')}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n2\r\n12\r\n0\r\n\r\n"
    ).encode()
    raw = (
        request(relay, "POST", "/hc/e", body=b"one")
        + request(relay, "POST", "/hc/e", body=b"two!")
        + chunked
    )
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), echo):
        answers = await exchange(relay, raw, ("POST", "POST", "POST"))
    assert [(a[0], a[3]) for a in answers] == [(200, b"eno"), (200, b"!owt"), (200, b"21zyx")]
    await assert_no_exchanges_left(relay)


async def test_front_reads_a_body_that_arrives_in_pieces(relay: Relay) -> None:
    body = os.urandom(60_000)
    raw = request(relay, "POST", "/hc/e", body=body)
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), echo):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        try:
            for start in range(0, len(raw), 7_000):
                writer.write(raw[start : start + 7_000])
                await writer.drain()
                await asyncio.sleep(0.01)  # separate reads on the relay's side
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(b"HTTP/1.1 200")
            answer = await asyncio.wait_for(reader.readexactly(len(body)), 20)
        finally:
            writer.close()
    assert hashlib.sha256(answer).digest() == hashlib.sha256(body[::-1]).digest()


async def test_sender_gone_before_the_answer_ends_the_exchange(relay: Relay) -> None:
    told = asyncio.Event()
    release = asyncio.Event()

    async def slow(received: Received) -> Reply:
        told.set()
        await release.wait()
        return Reply(body=b"late")

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), slow):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        writer.write(request(relay, "GET", "/hc/a"))
        await asyncio.wait_for(told.wait(), 20)
        writer.close()
        await assert_no_exchanges_left(relay)
        release.set()
        # The relay goes on serving.
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{relay.http_url}/hc/a", headers={AUTH: relay.token("hc")}
            ) as response:
                assert response.status == 200
                assert await response.read() == b"late"


@pytest.mark.parametrize("front", [True, False], ids=["front", "aiohttp"])
async def test_a_body_that_does_not_arrive_gets_408(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch, front: bool
) -> None:
    """A head whose body stops short gets 408 once the response deadline has passed, by the
    front as by aiohttp's path."""
    if not front:
        monkeypatch.setattr(_SenderConnection, "_prepare", lambda self, head: None)
    async with make_relay(limits={"http_response_timeout": 0.5}) as relay:
        async with peer_listener(relay.base_url, "hc", relay.token("hc"), echo):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
            try:
                raw = request(relay, "POST", "/hc/e", body=b"0123456789")
                writer.write(raw[:-5])  # five bytes of the body short
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 408 The request body did not arrive in time.")
            finally:
                writer.close()
        await assert_no_exchanges_left(relay)


async def test_a_repeated_head_is_parsed_once_and_admitted_each_time(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep-alive client sending the same head again: its bytes are parsed once per
    connection, while the entity, the token and the relay's state are asked for each request
    (``_prepare``); a different head is parsed anew. Every answer as without the reuse."""
    parsed: list[bytes] = []
    prepared: list[str] = []
    real_parse, real_prepare = sender_http._parse, _SenderConnection._prepare

    def parse(head: bytes) -> sender_http._Parsed | None:
        if head.startswith(b"POST"):  # not the listener's upgrade
            parsed.append(head)
        return real_parse(head)

    def prepare(self: _SenderConnection, head: sender_http._Parsed) -> sender_http._Inline | None:
        prepared.append(head.raw_path)
        return real_prepare(self, head)

    monkeypatch.setattr(sender_http, "_parse", parse)
    monkeypatch.setattr(_SenderConnection, "_prepare", prepare)
    same = request(relay, "POST", "/hc/e", body=b"abc")
    raw = same + same + request(relay, "POST", "/hc/f", body=b"abc") + same
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), echo):
        answers = await exchange(relay, raw, ("POST",) * 4)
    assert [(a[0], a[3]) for a in answers] == [(200, b"cba")] * 4
    head = same[: same.index(b"\r\n\r\n") + 4]
    assert parsed == [head, head.replace(b"/hc/e", b"/hc/f"), head]
    assert prepared == ["/hc/e", "/hc/e", "/hc/f", "/hc/e"]
    await assert_no_exchanges_left(relay)


async def test_a_repeated_head_meets_the_relay_as_it_is_now(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reused parse carries nothing of the last request's admission: the same head,
    refused by the relay's state the second time (no inline answer there now), goes to
    aiohttp's path and is answered there, as a first head would be."""
    broker = relay.server.broker
    calls: list[str] = []
    real = broker.answers_inline

    def answers_inline(entity: str) -> bool:
        calls.append(entity)
        return real(entity) and len(calls) == 1

    monkeypatch.setattr(broker, "answers_inline", answers_inline)
    same = request(relay, "POST", "/hc/e", body=b"abc")
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), echo):
        answers = await exchange(relay, same + same, ("POST", "POST"))
    assert [(a[0], a[3]) for a in answers] == [(200, b"cba")] * 2
    # The front asked for each request; aiohttp's path asked again for the second (and sent
    # it by rendezvous, as it does when the answer cannot come inline).
    assert calls == ["hc", "hc", "hc"]
    await assert_no_exchanges_left(relay)


async def test_a_repeated_head_meets_the_entity_as_it_is_now(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a head says (its entity, token, forwarded headers) is kept with the head
    (``_Parsed.said``) while the namespace is the same object: the same head on the same
    connection after the entity changed is read anew, for the changed entity. Here it starts
    to require a token: the ``Authorization`` header, forwarded to the listener while the
    entity was anonymous, becomes the sender's token and is no longer forwarded. Both
    requests are the front's to relay (none goes to aiohttp's path, which would read the
    head anew)."""
    entities = [{"name": "open", "requires_client_authorization": False}]
    async with make_relay(entities=entities) as relay:
        relayed: list[str] = []
        real = relay.server.http.relay_inline

        def relay_inline(sender: Any, entity: Any, headers: Any, target: str, body: bytes) -> None:
            relayed.append(target)
            real(sender, entity, headers, target, body)

        monkeypatch.setattr(relay.server.http, "relay_inline", relay_inline)
        same = (
            f"POST /open/x HTTP/1.1\r\nHost: 127.0.0.1:{relay.server.port}\r\n"
            f"Authorization: {relay.token('open')}\r\nContent-Length: 3\r\n\r\nabc"
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        try:

            async def answer() -> bytes:
                writer.write(same)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await asyncio.wait_for(reader.readexactly(length), 10)
                return head

            async with peer_listener(relay.base_url, "open", relay.token("open"), echo) as peer:
                assert (await answer()).startswith(b"HTTP/1.1 200 ")
                config = relay.server.config
                changed = replace(config.hybrid_connections[0], requires_client_authorization=True)
                relay.server.replace_config(replace(config, hybrid_connections=(changed,)))
                assert (await answer()).startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()
        await assert_no_exchanges_left(relay)
    told = [{name.lower() for name in r.message["requestHeaders"]} for r in peer.received]
    assert ["authorization" in names for names in told] == [True, False]
    assert relayed == ["/open/x", "/open/x"]
