"""HTTP request relaying through the relay (PROTOCOL.md section 6), with real sockets: httpx as
the sender, :mod:`tests.server.http_peer` (raw aiohttp, written from the protocol text) as the
listener."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import quote

import aiohttp
import httpx
import pytest

from tests.conftest import (
    LISTEN_KEY,
    LISTEN_KEY_NAME,
    SEND_KEY,
    SEND_KEY_NAME,
    Relay,
    RelayFactory,
)
from tests.server.http_peer import Received, Reply, peer_listener

AUTH = "ServiceBusAuthorization"
KIB = 1024


def client(relay: Relay, **kw: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relay.http_url, timeout=30, **kw)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def assert_no_exchanges_left(relay: Relay) -> None:
    """Every relayed request has been cleaned up (the handler's finally runs just after the
    response went out, hence the short wait)."""
    state = relay.server.http
    for _ in range(500):
        if not (state._by_id or state._binary_owner or relay.server.broker.pending_count):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("relayed requests were not cleaned up")


async def test_small_request_inline_with_exact_target_and_headers(relay: Relay) -> None:
    async def handler(received: Received) -> Reply:
        return Reply(
            status=201,
            description="Made It",
            headers={"content-type": "text/plain", "x-kit": "small", "connection": "close"},
            body=b"hello " + received.body,
        )

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler) as peer:
        async with client(relay) as http:
            response = await http.post(
                "/hc/abc/def?x=1&sb-hc-id=trace&y=&&sb-hc-undefined&z=%2B",
                content=b"world",
                headers=[
                    (AUTH, relay.token("hc")),
                    ("X-Multi", "v1"),
                    ("X-Multi", "v2"),
                    ("X-Custom", "Value"),
                    ("Keep-Alive", "timeout=5"),
                    ("TE", "trailers"),
                    ("Via", "1.1 upstream"),
                ],
            )
    assert response.status_code == 201
    assert response.reason_phrase == "Made It"
    assert response.content == b"hello world"
    assert response.headers["x-kit"] == "small"
    assert response.headers["via"].startswith("1.1 127.0.0.1:")
    assert response.headers.get("connection") != "close"  # hop-by-hop from the listener not copied
    (received,) = peer.received
    assert not received.via_rendezvous
    assert received.method == "POST"
    assert received.target == "/hc/abc/def?x=1&y=&&sb-hc-undefined&z=%2B"
    headers = received.headers
    assert headers["X-Multi"] == "v1, v2"
    assert headers["X-Custom"] == "Value"
    assert headers["Via"] == "1.1 upstream"  # Via is not connection-level
    lowered = {name.lower() for name in headers}
    for dropped in (
        "servicebusauthorization",
        "host",
        "content-length",
        "connection",
        "te",
        "keep-alive",
        "transfer-encoding",
    ):
        assert dropped not in lowered
    message = received.message
    assert message["body"] is True
    assert message["remoteEndpoint"]["address"] == "127.0.0.1"
    assert isinstance(message["remoteEndpoint"]["port"], int)
    address = message["address"]
    assert address.startswith(relay.base_url + "/$hc/hc?sb-hc-action=request&sb-hc-id=")
    assert "sb-hc-rendezvous=" in address


async def test_get_without_body_and_empty_query(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        async with client(relay) as http:
            response = await http.get(f"/hc?sb-hc-token={quote(relay.token('hc'), safe='')}")
    assert response.status_code == 200
    assert response.content == b""
    (received,) = peer.received
    assert received.target == "/hc"
    assert received.message["body"] is False
    assert received.method == "GET"


@pytest.mark.parametrize(
    "size", [0, 64 * KIB, 64 * KIB + 1, 10 * 1024 * KIB], ids=["0", "64k", "64k+1", "10M"]
)
async def test_body_sizes_both_ways(relay: Relay, size: int) -> None:
    payload = os.urandom(size)

    async def handler(received: Received) -> Reply:
        digest = sha(received.body)
        # Answer with a different body of the same size, and the digest of what arrived.
        return Reply(body=received.body[::-1], headers={"x-sha256": digest}, fragments=3)

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler) as peer:
        async with client(relay) as http:
            response = await http.put(
                "/hc/blob", content=payload, headers={AUTH: relay.token("hc")}
            )
    assert response.status_code == 200
    assert response.headers["x-sha256"] == sha(payload)
    assert sha(response.content) == sha(payload[::-1])
    assert len(response.content) == size
    (received,) = peer.received
    assert received.via_rendezvous is (size > 64 * KIB)
    if received.via_rendezvous:  # address-only: no method, no body member (6.2)
        assert set(received.announcement) == {"address", "id"}
    # The listener answered a > 64 KiB body over a rendezvous; the inline request did not repeat.
    assert peer.rendezvous_opened == (1 if size > 64 * KIB else 0)
    await assert_no_exchanges_left(relay)


async def test_inline_request_with_large_response_over_rendezvous(relay: Relay) -> None:
    """6.3 case 2: the request came inline, the listener opens the rendezvous only to answer."""
    big = os.urandom(300 * KIB)

    async def handler(received: Received) -> Reply:
        return Reply(body=big, fragments=5)

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler) as peer:
        async with client(relay) as http:
            response = await http.get("/hc/large", headers={AUTH: relay.token("hc")})
    assert response.status_code == 200
    assert response.content == big
    # Streamed as it arrives: the listener gave no Content-Length, so chunked.
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert peer.rendezvous_opened == 1
    assert not peer.received[0].via_rendezvous


async def test_chunked_upload_goes_via_rendezvous(relay: Relay) -> None:
    parts = [os.urandom(n) for n in (10, 70 * KIB, 1, 200 * KIB, 5)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            await asyncio.sleep(0.01)
            yield part

    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        async with client(relay) as http:
            response = await http.post("/hc/up", content=body(), headers={AUTH: relay.token("hc")})
    assert response.status_code == 200
    assert response.content == b"".join(parts)
    (received,) = peer.received
    assert received.via_rendezvous
    assert "Transfer-Encoding" not in received.headers


async def test_small_chunked_upload_is_also_address_only(relay: Relay) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"tiny"

    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        async with client(relay) as http:
            response = await http.post("/hc", content=body(), headers={AUTH: relay.token("hc")})
    assert response.content == b"tiny"
    assert peer.received[0].via_rendezvous
    assert peer.received[0].message["body"] is True


async def test_empty_chunked_upload(relay: Relay) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in ():
            yield b""

    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        async with client(relay) as http:
            response = await http.post(
                "/hc",
                content=body(),
                headers={AUTH: relay.token("hc"), "Transfer-Encoding": "chunked"},
            )
    assert response.status_code == 200
    assert response.content == b""
    assert peer.received[0].body == b""


# -- authorization (3.4-3.6) ------------------------------------------------------------------


async def test_auth_failures(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        async with client(relay) as http:
            missing = await http.get("/hc")
            bad = await http.get("/hc", headers={AUTH: relay.token("hc", key="x" * 20)})
            garbage = await http.get("/hc", headers={AUTH: "SharedAccessSignature nonsense"})
            expired = await http.get("/hc", headers={AUTH: relay.token("hc", ttl=-3600)})
            other_entity = await http.get("/hc", headers={AUTH: relay.token("anon")})
            listen_only = await http.get(
                "/hc", headers={AUTH: relay.token("hc", LISTEN_KEY_NAME, LISTEN_KEY)}
            )
            send_only = await http.get(
                "/hc", headers={AUTH: relay.token("hc", SEND_KEY_NAME, SEND_KEY)}
            )
    assert missing.status_code == 401
    assert "TrackingId:" in missing.reason_phrase
    assert bad.status_code == 401
    assert garbage.status_code == 401
    assert expired.status_code == 401
    assert other_entity.status_code == 403
    assert listen_only.status_code == 403
    assert "via" not in missing.headers  # relay errors carry no Via (6.5)
    assert send_only.status_code == 200
    assert len(peer.received) == 1


async def test_token_precedence_and_stripping(relay: Relay) -> None:
    token = relay.token("hc")
    async with peer_listener(relay.base_url, "hc", token) as peer:
        async with client(relay) as http:
            # Authorization header alone: evaluated and stripped.
            r1 = await http.get("/hc/1", headers={"Authorization": token})
            # ServiceBusAuthorization present: Authorization is the application's, forwarded.
            r2 = await http.get("/hc/2", headers={AUTH: token, "Authorization": "Bearer app"})
            # Query token wins over a bad header; both stripped.
            r3 = await http.get(
                f"/hc/3?a=1&sb-hc-token={quote(token, safe='')}",
                headers={AUTH: "SharedAccessSignature bad"},
            )
            # A bad query token is not rescued by a good header.
            r4 = await http.get("/hc/4?sb-hc-token=bad", headers={AUTH: token})
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200, 200, 200, 401]
    h1, h2, h3 = (received.headers for received in peer.received)
    assert "Authorization" not in h1
    assert h2["Authorization"] == "Bearer app"
    assert AUTH not in h2 and AUTH not in h3
    assert peer.received[2].target == "/hc/3?a=1"


async def test_anonymous_entity_forwards_authorization(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "anon", relay.token("anon")) as peer:
        async with client(relay) as http:
            plain = await http.get("/anon/x", headers={"Authorization": "Bearer app"})
            with_sb = await http.get("/anon/y", headers={AUTH: "garbage"})
    assert plain.status_code == 200
    assert with_sb.status_code == 200
    assert peer.received[0].headers["Authorization"] == "Bearer app"
    assert AUTH not in peer.received[1].headers  # stripped even when not evaluated


async def test_entity_with_slash_and_suffix(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "a/b", relay.token("a/b")) as peer:
        async with client(relay) as http:
            response = await http.get("/a/b/c%20d?q=1", headers={AUTH: relay.token("a/b")})
    assert response.status_code == 200
    assert peer.received[0].target == "/a/b/c%20d?q=1"


# -- relay errors (6.8) -------------------------------------------------------------------------


async def test_unknown_entity_is_404(relay: Relay) -> None:
    async with client(relay) as http:
        response = await http.get("/nope/x", headers={AUTH: relay.token("nope")})
        root = await http.get("/")
    assert response.status_code == 404
    assert root.status_code == 404


async def test_no_listener_is_502(relay: Relay) -> None:
    async with client(relay) as http:
        response = await http.get("/hc", headers={AUTH: relay.token("hc")})
    assert response.status_code == 502
    assert "TrackingId:" in response.reason_phrase


async def test_connect_and_upgrades_are_not_relayed(relay: Relay) -> None:
    token = relay.token("hc").encode()
    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        statuses = []
        for head in (
            b"CONNECT /hc HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            b"GET /hc HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n",
            # A WebSocket upgrade is relayed (http_upgrade.py), but not a malformed one.
            b"GET /hc HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
            writer.write(head + b"ServiceBusAuthorization: " + token + b"\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(10):
                line = await reader.readline()
            writer.close()
            statuses.append(int(line.split()[1]))
    assert statuses[:2] == [405, 405], statuses
    assert statuses[2:] == [400, 426], statuses
    assert not peer.received


async def test_listener_that_never_answers_gives_504(make_relay: RelayFactory) -> None:
    """504 at the entity's own deadline when it has one, else at the relay's, as configured at
    the moment of the request. The relay's deadline starts far beyond the client's 30 s: a
    request answered by it would fail the test. (tests/server/test_broker.py checks the choice
    of deadline itself.)"""

    async def silent(received: Received) -> None:
        return None

    entities = [{"name": "hc", "http_response_timeout": 0.5}, {"name": "slow"}]
    async with make_relay(entities=entities, limits={"http_response_timeout": 120}) as relay:
        async with peer_listener(relay.base_url, "hc", relay.token("hc"), silent):
            async with client(relay) as http:
                inline = await http.get("/hc", headers={AUTH: relay.token("hc")})
                large = await http.post(
                    "/hc", content=b"x" * (100 * KIB), headers={AUTH: relay.token("hc")}
                )
        config = relay.server.config
        relay.server.replace_config(
            replace(config, limits=replace(config.limits, http_response_timeout=0.5))
        )
        async with peer_listener(relay.base_url, "slow", relay.token("slow"), silent) as peer:
            async with client(relay) as http:
                default = await http.get("/slow", headers={AUTH: relay.token("slow")})
        await assert_no_exchanges_left(relay)
    assert inline.status_code == 504
    assert "did not respond in time" in inline.reason_phrase
    assert large.status_code == 504
    assert default.status_code == 504
    assert "did not respond in time" in default.reason_phrase
    assert len(peer.received) == 1  # the listener was told, and said nothing


async def test_listener_drop_fails_pending_requests_promptly(relay: Relay) -> None:
    started = asyncio.Event()

    async def hang(received: Received) -> None:
        started.set()
        await asyncio.sleep(3600)

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), hang) as peer:
        async with client(relay) as http:
            pending = asyncio.gather(
                *(http.get(f"/hc/{i}", headers={AUTH: relay.token("hc")}) for i in range(5))
            )
            async with asyncio.timeout(10):
                await started.wait()
            await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await peer.control.close()
            async with asyncio.timeout(5):
                responses = await pending
            assert loop.time() - start < 2
    assert [r.status_code for r in responses] == [502] * 5
    await assert_no_exchanges_left(relay)


async def test_truncated_upload_never_reaches_listener_as_complete(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        token = relay.token("hc")
        writer.write(
            f"POST /hc HTTP/1.1\r\nHost: 127.0.0.1:{relay.server.port}\r\n{AUTH}: {token}\r\n"
            "Content-Length: 500000\r\n\r\n".encode()
        )
        writer.write(b"x" * 200_000)
        await writer.drain()
        for _ in range(500):  # the listener opened the rendezvous and is receiving the body
            if peer.rendezvous_opened:
                break
            await asyncio.sleep(0.01)
        writer.close()
        await assert_no_exchanges_left(relay)
        await asyncio.sleep(0.1)
        assert peer.rendezvous_opened == 1
        assert not peer.received  # the listener never saw a (truncated) complete body
        await reader.read()


async def test_response_larger_than_max_message_size_streams(make_relay: RelayFactory) -> None:
    """A response body is not one message the relay holds: max_message_size does not cap it."""
    body = os.urandom(2 * 1024 * KIB)

    async def handler(received: Received) -> Reply:
        return Reply(body=body, fragments=4)

    async with make_relay(limits={"max_message_size": 1024 * KIB}) as relay:
        async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
            async with client(relay) as http:
                response = await http.get("/hc", headers={AUTH: relay.token("hc")})
        await assert_no_exchanges_left(relay)
    assert response.status_code == 200
    assert response.content == body


# -- responses (6.4-6.6) ------------------------------------------------------------------------


async def test_status_forms_reasons_and_stray_empty_binary(relay: Relay) -> None:
    replies = {
        "/hc/string": Reply(status="202", description="Accepted Later", body=b"s"),
        "/hc/teapot": Reply(status=418, description="I'm a teapot", body=b"t"),
        "/hc/450": Reply(status=450, description="Blocked", body=b""),
        "/hc/nobody": Reply(status=204, description="Kit Reason", stray_empty=True),
        "/hc/gateway": Reply(status=502, description="From Listener", body=b"g"),
        "/hc/nodesc": Reply(status=404, description=None, body=b"n"),
        "/hc/unicode": Reply(status=200, description="Gr\u00fc\u00dfe\r\nX-Evil: 1", body=b"u"),
    }

    async def handler(received: Received) -> Reply:
        return replies[received.target]

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
        async with client(relay) as http:
            results = {
                path: await http.get(path, headers={AUTH: relay.token("hc")}) for path in replies
            }
            # The channel survived the stray empty message: a later request still works.
            again = await http.get("/hc/string", headers={AUTH: relay.token("hc")})
    assert (results["/hc/string"].status_code, results["/hc/string"].reason_phrase) == (
        202,
        "Accepted Later",
    )
    assert results["/hc/teapot"].status_code == 418
    assert results["/hc/450"].reason_phrase == "Blocked"
    assert results["/hc/nobody"].status_code == 204
    assert results["/hc/nobody"].reason_phrase == "Kit Reason"
    assert results["/hc/gateway"].status_code == 502
    assert "via" in results["/hc/gateway"].headers  # a listener's 502, not the relay's
    assert results["/hc/nodesc"].reason_phrase == "Not Found"
    assert results["/hc/unicode"].reason_phrase == "Gr??e  X-Evil: 1"  # no header injection
    assert "x-evil" not in results["/hc/unicode"].headers
    assert again.status_code == 202


async def test_unsafe_response_headers_are_neutralised(relay: Relay) -> None:
    async def handler(received: Received) -> Reply:
        return Reply(
            headers={
                "x-ok": "fine",
                "x-split": "a\r\nX-Injected: 1",
                "bad name": "dropped",
                "transfer-encoding": "chunked",
                "content-length": "999",
                "connection": "x-private",
                "x-private": "hop-by-hop by Connection",
            },
            body=b"body",
        )

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
        async with client(relay) as http:
            response = await http.get("/hc", headers={AUTH: relay.token("hc")})
    assert response.status_code == 200
    assert response.content == b"body"
    assert response.headers["content-length"] == "4"
    assert response.headers["x-ok"] == "fine"
    assert response.headers["x-split"] == "a  X-Injected: 1"
    assert "x-injected" not in response.headers
    assert "bad name" not in response.headers
    assert "x-private" not in response.headers


async def test_head_request(relay: Relay) -> None:
    async def handler(received: Received) -> Reply:
        assert received.method == "HEAD"
        return Reply(headers={"content-length": "1234", "x-h": "1"})

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
        async with client(relay) as http:
            response = await http.head("/hc", headers={AUTH: relay.token("hc")})
            follow = await http.head("/hc", headers={AUTH: relay.token("hc")})
    assert response.status_code == 200
    assert response.headers["content-length"] == "1234"
    assert follow.status_code == 200


async def test_responses_in_any_order(relay: Relay) -> None:
    first_arrived = asyncio.Event()
    second_done = asyncio.Event()

    async def handler(received: Received) -> Reply:
        if received.target == "/hc/first":
            first_arrived.set()
            async with asyncio.timeout(10):
                await second_done.wait()
            return Reply(body=b"first")
        second_done.set()
        return Reply(body=b"second")

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
        async with client(relay) as http:
            first = asyncio.create_task(http.get("/hc/first", headers={AUTH: relay.token("hc")}))
            await first_arrived.wait()
            second = await http.get("/hc/second", headers={AUTH: relay.token("hc")})
            assert second.content == b"second"
            assert (await first).content == b"first"


async def test_expect_100_continue(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        token = relay.token("hc")
        writer.write(
            f"POST /hc HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}: {token}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            interim = await reader.readline()
            assert interim.startswith(b"HTTP/1.1 100")
            await reader.readline()
            writer.write(b"hello")
            await writer.drain()
            status = await reader.readline()
            rest = await reader.readuntil(b"\r\n\r\n")
            assert b"Content-Length: 5" in rest
            body = await reader.readexactly(5)
        writer.close()
    assert status.startswith(b"HTTP/1.1 200")
    assert body == b"hello"
    assert "Expect" not in peer.received[0].headers


async def test_expect_is_answered_only_after_auth_and_only_for_100_continue(relay: Relay) -> None:
    async def exchange(head: str) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        writer.write(head.encode())
        await writer.drain()
        async with asyncio.timeout(10):
            line = await reader.readline()
        writer.close()
        return line

    # No token: the sender is refused before any 100 Continue invites the body.
    unauthorized = (
        "POST /hc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    assert (await exchange(unauthorized)).startswith(b"HTTP/1.1 401")
    token = relay.token("hc")
    odd = (
        f"POST /hc HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}: {token}\r\n"
        "Content-Length: 5\r\nExpect: magic\r\n\r\n"
    )
    async with peer_listener(relay.base_url, "hc", token):
        assert (await exchange(odd)).startswith(b"HTTP/1.1 417")


async def test_streamed_body_not_cut_while_flowing_but_cut_when_stalled(
    make_relay: RelayFactory,
) -> None:
    body = os.urandom(400 * KIB)

    async def handler(received: Received) -> Reply:
        if received.target == "/hc/flowing":
            # 8 fragments 0.25 s apart: 1.75 s in total, longer than the 1 s deadline.
            return Reply(body=body, fragments=8, fragment_pause=0.25)
        return Reply(body=body, fragments=2, fragment_pause=3.0)

    entities = [{"name": "hc", "http_response_timeout": 1.0}]
    async with make_relay(entities=entities) as relay:
        async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
            async with client(relay) as http:
                flowing = await http.get("/hc/flowing", headers={AUTH: relay.token("hc")})
                # The head and the first half went out as they came: the stall cuts the body
                # (no last chunk), it cannot turn into a 504 any more.
                with pytest.raises(httpx.RemoteProtocolError):
                    await http.get("/hc/stalled", headers={AUTH: relay.token("hc")})
    assert flowing.status_code == 200
    assert flowing.content == body


async def test_keep_alive_reused_after_rendezvous_response(relay: Relay) -> None:
    big = os.urandom(200 * KIB)

    async def handler(received: Received) -> Reply:
        return Reply(body=big if received.target == "/hc/big" else b"small")

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler) as peer:
        async with client(relay, limits=limits) as http:
            for path in ("/hc/big", "/hc/small", "/hc/big", "/hc/small"):
                response = await http.get(path, headers={AUTH: relay.token("hc")})
                assert response.status_code == 200
            upload = await http.post("/hc/x", content=big, headers={AUTH: relay.token("hc")})
            assert upload.status_code == 200
            last = await http.get("/hc/small", headers={AUTH: relay.token("hc")})
            assert last.content == b"small"
    ports = {received.message["remoteEndpoint"]["port"] for received in peer.received}
    assert len(ports) == 1, ports  # one TCP connection served all six requests


async def test_many_concurrent_requests_spread_over_listeners(relay: Relay) -> None:
    async def handler(received: Received) -> Reply:
        await asyncio.sleep(0.01)
        return Reply(body=received.target.encode())

    token = relay.token("hc")
    async with (
        peer_listener(relay.base_url, "hc", token, handler) as one,
        peer_listener(relay.base_url, "hc", token, handler) as two,
    ):
        limits = httpx.Limits(max_connections=200)
        async with client(relay, limits=limits) as http:
            responses = await asyncio.gather(
                *(http.get(f"/hc/{i}", headers={AUTH: token}) for i in range(200))
            )
    assert [r.content for r in responses] == [f"/hc/{i}".encode() for i in range(200)]
    assert len(one.received) + len(two.received) == 200
    assert one.received and two.received


# -- protocol violations --------------------------------------------------------------------------


async def test_framing_violation_closes_control_channel(relay: Relay) -> None:
    arrived = asyncio.Event()

    async def handler(received: Received) -> None:
        arrived.set()

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler) as peer:
        async with client(relay) as http:
            pending = asyncio.create_task(http.get("/hc", headers={AUTH: relay.token("hc")}))
            async with asyncio.timeout(10):
                await arrived.wait()
            request_id = peer.received[0].message["id"]
            head = {"response": {"requestId": request_id, "statusCode": 200, "body": True}}
            await peer.control.send_str(json.dumps(head))
            await peer.control.send_str(json.dumps(head))  # text where the body must be
            async with asyncio.timeout(10):
                await peer.closed.wait()
                response = await pending
    assert peer.close_code == 1002
    assert response.status_code == 502
    await assert_no_exchanges_left(relay)


async def test_unexpected_binary_closes_control_channel(relay: Relay) -> None:
    async with peer_listener(relay.base_url, "hc", relay.token("hc")) as peer:
        await peer.control.send_bytes(b"")  # tolerated (6.6)
        await peer.control.send_bytes(b"junk")
        async with asyncio.timeout(10):
            await peer.closed.wait()
    assert peer.close_code == 1002


async def test_rendezvous_address_is_single_use_and_secret(relay: Relay) -> None:
    opened: list[str] = []

    async def handler(received: Received) -> Reply:
        opened.append(received.message["address"])
        return Reply(body=b"ok")

    async with peer_listener(relay.base_url, "hc", relay.token("hc"), handler):
        async with client(relay) as http:
            response = await http.get("/hc", headers={AUTH: relay.token("hc")})
    assert response.status_code == 200
    address = opened[0]
    forged = address.split("&sb-hc-rendezvous=")[0] + "&sb-hc-rendezvous=guess"
    async with aiohttp.ClientSession() as session:
        for url in (address, forged):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url)
            assert info.value.status == 403
