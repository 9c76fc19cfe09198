"""The relay's shutdown: the close handshake of a listener's control channel, and the drain
(``RelayServer.drain``; ``hybridrelay serve`` on SIGTERM/SIGINT)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
    SharedAccessKeyTokenProvider,
)
from hybridrelay.client.http import RelayedHttpContext
from hybridrelay.exceptions import RelayHttpError
from tests.client.helpers import accept_one, make_client, read_digest
from tests.client.helpers import open_listener as sdk_listener
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, RelayFactory, eventually
from tests.serve_process import relay_document, serve, write_config
from tests.server.test_relay_websocket import AUTH, open_listener, session


@pytest.mark.timeout(30)
async def test_the_relay_answers_a_listeners_close_frame(make_relay: RelayFactory) -> None:
    async with make_relay() as relay, session() as s:
        control = await open_listener(s, relay)
        await control.send_frame((4000).to_bytes(2, "big") + b"bye", aiohttp.WSMsgType.CLOSE)
        async with asyncio.timeout(5):
            answer = await control.receive()
        # RFC 6455 5.5.1: the answer is a close frame (echoing the code), not a dropped socket.
        assert answer.type is aiohttp.WSMsgType.CLOSE and answer.data == 4000, answer
        await control.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("activity", [False, True])
async def test_listener_aclose_returns_without_waiting_its_close_timeout(
    make_relay: RelayFactory, activity: bool
) -> None:
    async with make_relay() as relay:
        async with sdk_listener(relay) as listener:
            if activity:  # the control task has run and reads the channel
                await asyncio.sleep(0)
            # Not its 10 s CLOSE_TIMEOUT: the relay answers the close at once.
            await asyncio.wait_for(listener.aclose(), 5)
            assert listener.status == "offline"


# -- the drain, in process -----------------------------------------------------------------


def _closed_codes(listener: HybridConnectionListener) -> list[str]:
    """Why the listener's control channel went offline, as the SDK reports it."""
    reasons: list[str] = []

    def record(status: str, error: BaseException | None) -> None:
        if status == "offline" and error is not None:
            reasons.append(str(error))

    listener.on_status(record)
    return reasons


@pytest.mark.timeout(60)
async def test_a_transfer_in_flight_completes_while_the_relay_drains(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hybridrelay.server")
    payload = os.urandom(3 * 1024 * 1024)
    async with make_relay() as relay:
        server = relay.server
        async with sdk_listener(relay) as listener:
            reasons = _closed_codes(listener)
            client = make_client(relay)
            stream = await client.create_connection()
            accepted = await accept_one(listener)
            reading = asyncio.create_task(read_digest(accepted))
            await stream.write(payload[: len(payload) // 2])
            draining = asyncio.create_task(server.drain(grace=30))
            # The listener is told at once to reconnect elsewhere (1012)...
            await eventually(lambda: bool(reasons))
            assert "1012" in reasons[0], reasons
            # ... new senders, listeners and HTTP requests are refused ...
            with pytest.raises(RelayHttpError) as refused:
                await make_client(relay).create_connection()
            assert refused.value.status == 503
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{relay.http_url}/hc") as response:
                    assert response.status == 503
            assert not draining.done()
            # ... and the relayed connection carries on to its end.
            await stream.write(payload[len(payload) // 2 :])
            await stream.write_eof()
            assert await asyncio.wait_for(reading, 20) == (
                len(payload),
                hashlib.sha256(payload).hexdigest(),
            )
            await asyncio.gather(accepted.aclose(), stream.aclose())
            await asyncio.wait_for(draining, 10)  # ended by the connection, not the grace
            await client.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert any("draining: 1 relayed connection(s) and 0 HTTP request(s)" in m for m in messages)
    assert any(
        "drain over" in m and "1 of 1 connection(s)" in m and "finished, 0 cut" in m
        for m in messages
    ), messages


@pytest.mark.timeout(60)
async def test_a_connection_that_outlives_the_grace_is_cut_when_it_ends(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hybridrelay.server")
    async with make_relay() as relay:
        async with sdk_listener(relay) as listener:
            client = make_client(relay)
            stream = await client.create_connection()
            accepted = await accept_one(listener)
            await stream.write(b"before")
            assert await accepted.read() == b"before"

            # Both ends read, and close on end-of-stream as applications do: that answers the
            # relay's close frames at once.
            async def read_then_close(end: HybridConnectionStream) -> bytes:
                data = await end.read()
                await end.aclose()
                return data

            ends = [asyncio.create_task(read_then_close(end)) for end in (accepted, stream)]
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(relay.server.drain(grace=1.0), 15)
            # Cut when the grace ran out, not before, and not after the close handshake's 5 s.
            assert 1.0 <= loop.time() - started < 4
            assert await asyncio.wait_for(asyncio.gather(*ends), 5) == [b"", b""]
            assert accepted.close_code == stream.close_code == 1001
            await client.aclose()
    assert any(
        "drain over" in r.getMessage()
        and "0 of 1 connection(s)" in r.getMessage()
        and "1 cut" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.timeout(60)
@pytest.mark.both_loops  # the listener redials as the relay closes: asyncio's accept race
async def test_an_http_request_in_flight_is_answered_before_its_listener_is_told(
    make_relay: RelayFactory,
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: RelayedHttpContext) -> None:
        arrived.set()
        await release.wait()
        await ctx.respond(200, "OK", {"content-type": "text/plain"})
        await ctx.write(b"answered during the drain")
        await ctx.finish()

    async with make_relay() as relay:
        async with sdk_listener(relay, request_handler=slow) as listener:
            reasons = _closed_codes(listener)
            async with aiohttp.ClientSession() as s:
                request = asyncio.create_task(
                    s.get(f"{relay.http_url}/hc/x", headers={AUTH: relay.token("hc")})
                )
                await asyncio.wait_for(arrived.wait(), 10)
                draining = asyncio.create_task(relay.server.drain(grace=30))
                await asyncio.sleep(0.3)  # let a premature close of the channel show
                # The response travels on the control channel: it stays open until then.
                assert not reasons and not draining.done()
                release.set()
                response = await asyncio.wait_for(request, 10)
                assert response.status == 200
                assert await response.read() == b"answered during the drain"
                await eventually(lambda: bool(reasons))
                assert "1012" in reasons[0]
                await asyncio.wait_for(draining, 10)
            # It redialled at once and met the closing relay: refused or closed, never left
            # hanging in an accepted-but-orphaned connection until its own timeout.
            await asyncio.wait_for(listener.aclose(), 5)


@pytest.mark.timeout(60)
async def test_a_request_whose_body_arrives_as_the_drain_begins_gets_503(
    make_relay: RelayFactory,
) -> None:
    """Admitted before the drain, its body read after it began: no listener takes it now; the
    answer is the drain's retryable 503, not 502 (no listener)."""

    async def answer(ctx: RelayedHttpContext) -> None:
        await ctx.respond(200, "OK", {})
        await ctx.finish()

    async with make_relay() as relay, sdk_listener(relay, request_handler=answer) as listener:
        offline = asyncio.Event()
        listener.on_status(lambda status, _: offline.set() if status == "offline" else None)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
        try:
            head = (
                f"POST /hc HTTP/1.1\r\nHost: 127.0.0.1\r\n{AUTH}: {relay.token('hc')}\r\n"
                "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            writer.write(head.encode())
            async with asyncio.timeout(10):
                # The relay says 100 Continue once it takes the body (auth and routing done).
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
                draining = asyncio.create_task(relay.server.drain(grace=5))
                await offline.wait()  # the 1012: its listener takes nothing more
                writer.write(b"body")
                status = await reader.readline()
            assert status.startswith(b"HTTP/1.1 503"), status
            await asyncio.wait_for(draining, 10)
        finally:
            writer.close()


@pytest.mark.timeout(60)
async def test_an_ingress_tunnel_in_flight_completes_while_new_clients_are_refused(
    make_relay: RelayFactory,
) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    entry = {"listen": "127.0.0.1:0", "hybrid_connection": "hc"}
    async with make_relay(ingress=[entry]) as relay:
        address = relay.server.ingress[0].address
        assert address is not None
        async with sdk_listener(relay) as listener:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(payload[:1000])
            await writer.drain()
            accepted = await accept_one(listener)
            reading = asyncio.create_task(read_digest(accepted))
            draining = asyncio.create_task(relay.server.drain(grace=30))
            # The port stops accepting at once: a new client is refused by the kernel.
            await eventually(lambda: not relay.server.ingress[0].accepting)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*address)
            writer.write(payload[1000:])
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(reading, 20) == (
                len(payload),
                hashlib.sha256(payload).hexdigest(),
            )
            await accepted.aclose()  # the listener's close: end-of-stream for the client
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            await asyncio.wait_for(draining, 10)  # ended by the tunnel, not the grace


# -- hybridrelay serve, signalled --------------------------------------------------------------


def _root_provider() -> SharedAccessKeyTokenProvider:
    return SharedAccessKeyTokenProvider(ROOT_KEY_NAME, ROOT_KEY)


@pytest.mark.timeout(90)
async def test_serve_drains_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    config = write_config(tmp_path / "relay.yaml", relay_document())
    async with serve(config, "--shutdown-grace-period", "30") as relay:
        listener = HybridConnectionListener(relay.base_url, "hc", _root_provider())
        reasons = _closed_codes(listener)
        client = HybridConnectionClient(relay.base_url, "hc", _root_provider())
        async with listener:
            stream = await client.create_connection()
            accepted = await accept_one(listener)
            reading = asyncio.create_task(read_digest(accepted))
            await stream.write(payload[: len(payload) // 2])
            relay.signal(signal.SIGTERM)
            await relay.expect(r"draining: 1 relayed connection\(s\) .* up to 30s")
            await eventually(lambda: bool(reasons))
            assert "1012" in reasons[0], reasons
            with pytest.raises(RelayHttpError) as refused:
                await client.create_connection()
            assert refused.value.status == 503
            await stream.write(payload[len(payload) // 2 :])
            await stream.write_eof()
            assert await asyncio.wait_for(reading, 20) == (
                len(payload),
                hashlib.sha256(payload).hexdigest(),
            )
            await asyncio.gather(accepted.aclose(), stream.aclose())
            # The process ends by itself once the connection is done, well within the grace.
            assert await relay.wait(within=15) == 0
        await client.aclose()
    assert re.search(r"drain over .*: 1 of 1 connection\(s\) .* finished, 0 cut", relay.text)
    assert "Traceback" not in relay.text


@pytest.mark.timeout(90)
async def test_a_second_sigterm_stops_the_drain_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", relay_document())
    async with serve(config) as relay:  # the default grace: 30 s
        client = HybridConnectionClient(relay.base_url, "hc", _root_provider())
        async with HybridConnectionListener(relay.base_url, "hc", _root_provider()) as listener:
            stream = await client.create_connection()
            accepted = await accept_one(listener)
            relay.signal(signal.SIGTERM)
            await relay.expect(r"draining: 1 relayed connection\(s\) .* up to 30s")
            loop = asyncio.get_running_loop()
            started = loop.time()
            relay.signal(signal.SIGTERM)
            assert await relay.wait(within=15) == 0
            assert loop.time() - started < 10  # not the 30 s grace
            assert await asyncio.wait_for(accepted.read(), 5) == b""  # cut
            await asyncio.gather(accepted.aclose(), stream.aclose())
        await client.aclose()
    assert re.search(
        r"drain over .*stopped by a second signal.*0 of 1 connection.* 1 cut", relay.text
    )
