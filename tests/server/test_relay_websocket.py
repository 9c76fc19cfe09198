"""The relay's WebSocket endpoints (E1-E4), driven by raw aiohttp peers that speak the protocol
byte for byte as PROTOCOL.md describes, independently of our SDK."""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_module
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import aiohttp
import pytest

from hybridrelay.auth.sas import create_token
from hybridrelay.server import LocalBroker, RelayServer
from hybridrelay.server.channel import ControlChannel
from tests.conftest import (
    LISTEN_KEY,
    LISTEN_KEY_NAME,
    ROOT_KEY,
    ROOT_KEY_NAME,
    ROOT_SECONDARY,
    SEND_KEY,
    SEND_KEY_NAME,
    Relay,
    RelayFactory,
    eventually,
    relay_config,
)

pytestmark = pytest.mark.both_loops

AUTH = "ServiceBusAuthorization"


@asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


async def handshake_status(
    relay: Relay, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Attempt a WebSocket upgrade; return the HTTP status and reason phrase of a refusal."""
    reasons: list[str] = []

    async def on_request_end(
        _s: aiohttp.ClientSession, _c: object, params: aiohttp.TraceRequestEndParams
    ) -> None:
        reasons.append(params.response.reason or "")

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20), trace_configs=[trace]
    ) as s:
        try:
            ws = await s.ws_connect(relay.base_url + path, headers=headers or {})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, reasons[-1] if reasons else ""
        await ws.close()
        return 101, "Switching Protocols"


async def open_listener(
    s: aiohttp.ClientSession,
    relay: Relay,
    entity: str = "hc",
    token: str | None = None,
    *,
    autoping: bool = True,
    ssl: ssl_module.SSLContext | bool = True,
    listener_id: str | None = None,
) -> aiohttp.ClientWebSocketResponse:
    named = f"&sb-hc-id={listener_id}" if listener_id else ""
    return await s.ws_connect(
        f"{relay.base_url}/$hc/{entity}?sb-hc-action=listen{named}",
        headers={AUTH: token or relay.token(entity)},
        autoclose=False,
        autoping=autoping,
        ssl=ssl,
    )


async def next_accept(control: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    async with asyncio.timeout(10):
        message = await control.receive()
    assert message.type is aiohttp.WSMsgType.TEXT, message
    document = json.loads(message.data)
    accept = document["accept"]
    assert isinstance(accept, dict)
    return accept


async def relayed_pair(
    s: aiohttp.ClientSession, relay: Relay, control: aiohttp.ClientWebSocketResponse
) -> tuple[aiohttp.ClientWebSocketResponse, aiohttp.ClientWebSocketResponse]:
    """A sender's connect to ``hc`` accepted through ``control``: (sender, rendezvous)."""
    sender_task = asyncio.create_task(
        s.ws_connect(
            f"{relay.base_url}/$hc/hc?sb-hc-action=connect",
            headers={AUTH: relay.token("hc")},
        )
    )
    address = str((await next_accept(control))["address"])
    rendezvous = await s.ws_connect(address)
    return await sender_task, rendezvous


# -- authorization and addressing ------------------------------------------------------------


async def test_listen_requires_a_valid_token(relay: Relay) -> None:
    path = "/$hc/hc?sb-hc-action=listen"
    assert (await handshake_status(relay, path))[0] == 401
    assert (await handshake_status(relay, path, {AUTH: "SharedAccessSignature sr=x"}))[0] == 401
    wrong_key = relay.token("hc", key="not-the-key-0123456789abcdef")
    assert (await handshake_status(relay, path, {AUTH: wrong_key}))[0] == 401
    expired = relay.token("hc", ttl=-10)
    assert (await handshake_status(relay, path, {AUTH: expired}))[0] == 401
    unknown_rule = relay.token("hc", key_name="nobody")
    assert (await handshake_status(relay, path, {AUTH: unknown_rule}))[0] == 401
    send_only = relay.token("hc", SEND_KEY_NAME, SEND_KEY)
    status, reason = await handshake_status(relay, path, {AUTH: send_only})
    assert status == 403 and "Listen" in reason and "TrackingId:" in reason
    other_entity = relay.token("anon")
    assert (await handshake_status(relay, path, {AUTH: other_entity}))[0] == 403
    assert (await handshake_status(relay, path, {AUTH: relay.token("hc")}))[0] == 101
    secondary = relay.token("hc", key=ROOT_SECONDARY)
    assert (await handshake_status(relay, path, {AUTH: secondary}))[0] == 101


async def test_token_in_query_and_every_audience_form(relay: Relay) -> None:
    port = relay.server.port
    expiry = int(time.time()) + 600
    audiences = [
        f"http://127.0.0.1:{port}/hc",  # Node createRelayListenUri form, port kept
        "http://127.0.0.1/hc/",  # .NET form
        "http://127.0.0.1/",  # namespace-wide
        "https://127.0.0.1/$hc/hc",
    ]
    for audience in audiences:
        token = create_token(audience, ROOT_KEY_NAME, ROOT_KEY, expiry=expiry)
        path = f"/$hc/hc?sb-hc-action=listen&sb-hc-token={quote(token, safe='')}"
        assert (await handshake_status(relay, path))[0] == 101, audience
    # A token for a path below the entity does not open the entity (PROTOCOL.md 3.5).
    below = create_token(f"sb://127.0.0.1:{port}/hc/suffix", ROOT_KEY_NAME, ROOT_KEY, expiry=expiry)
    path = f"/$hc/hc?sb-hc-action=listen&sb-hc-token={quote(below, safe='')}"
    assert (await handshake_status(relay, path))[0] == 403
    # Lower-case hex in sr (older docs): the raw text is signed, so it must still verify.
    sr = "http%3a%2f%2f127.0.0.1%2fhc"
    import base64
    import hashlib
    import hmac

    sig = base64.b64encode(
        hmac.new(ROOT_KEY.encode(), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    ).decode()
    token = (
        f"SharedAccessSignature sr={sr}&sig={quote(sig, safe='')}&se={expiry}&skn={ROOT_KEY_NAME}"
    )
    assert (await handshake_status(relay, "/$hc/hc?sb-hc-action=listen", {AUTH: token}))[0] == 101


async def test_unknown_entity_and_bad_requests(relay: Relay) -> None:
    assert (
        await handshake_status(relay, "/$hc/nope?sb-hc-action=listen", {AUTH: relay.token("nope")})
    )[0] == 404
    assert (await handshake_status(relay, "/$hc/nope?sb-hc-action=connect"))[0] == 404
    assert (await handshake_status(relay, "/$hc/hc?sb-hc-action=dance"))[0] == 400
    async with session() as s:
        response = await s.get(relay.http_url + "/$hc/hc?sb-hc-action=listen")
        assert response.status == 400  # not an upgrade


async def test_connect_without_listener_fails_promptly(make_relay: RelayFactory) -> None:
    # Promptly: answered at once, not after the rendezvous timeout, which is set far beyond
    # the time this test allows itself.
    async with make_relay(limits={"rendezvous_timeout": 120}) as relay, asyncio.timeout(20):
        status, reason = await handshake_status(relay, "/$hc/anon?sb-hc-action=connect")
    assert status == 404 and "no listeners" in reason


async def test_sender_needs_send_right_unless_anonymous(relay: Relay) -> None:
    async with session() as s:
        control = await open_listener(s, relay, "hc")
        listen_only = relay.token("hc", LISTEN_KEY_NAME, LISTEN_KEY)
        assert (await handshake_status(relay, "/$hc/hc?sb-hc-action=connect", {AUTH: listen_only}))[
            0
        ] == 403
        assert (await handshake_status(relay, "/$hc/hc?sb-hc-action=connect"))[0] == 401
        await control.close()


async def test_listener_limit(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"max_listeners_per_connection": 2}) as relay, session() as s:
        first = await open_listener(s, relay)
        second = await open_listener(s, relay)
        status, reason = await handshake_status(
            relay, "/$hc/hc?sb-hc-action=listen", {AUTH: relay.token("hc")}
        )
        assert status == 429 and "QuotaExceeded" in reason
        await first.close()
        await asyncio.sleep(0)  # let the relay see the close
        await eventually(lambda: relay.server.broker.listener_count("hc") < 2)
        third = await open_listener(s, relay)
        await second.close()
        await third.close()


# -- the rendezvous ----------------------------------------------------------------------------


async def test_accept_message_and_splice(relay: Relay) -> None:
    async with session() as s:
        control = await open_listener(s, relay, "a/b")
        sender_task = asyncio.create_task(
            s.ws_connect(
                f"{relay.base_url}/$hc/a/b/x/y?app=1&sb-hc-action=connect&sb-hc-id=my-id",
                headers={AUTH: relay.token("a/b"), "X-App": "hello"},
                protocols=("kit.v2", "kit.v1"),
                autoclose=False,
            )
        )
        accept = await next_accept(control)
        assert accept["id"] == "my-id"
        address = str(accept["address"])
        assert address.startswith(f"{relay.base_url}/$hc/a/b/x/y?app=1&sb-hc-action=accept")
        assert "sb-hc-rendezvous=" in address
        headers = accept["connectHeaders"]
        assert isinstance(headers, dict)
        assert headers["X-App"] == "hello" and "Sec-WebSocket-Key" in headers
        assert headers["Sec-WebSocket-Protocol"] == "kit.v2,kit.v1"
        assert AUTH not in headers
        assert isinstance(accept["remoteEndpoint"], dict)
        rendezvous = await s.ws_connect(address, protocols=("kit.v2",), autoclose=False)
        sender = await sender_task
        assert sender.protocol == "kit.v2" and rendezvous.protocol == "kit.v2"
        # No extension is ever negotiated.
        assert "Sec-WebSocket-Extensions" not in rendezvous._response.headers
        # Types and boundaries are preserved both ways.
        await sender.send_str("text ✓")
        await sender.send_bytes(b"\x00" * 100_000)
        await sender.send_bytes(b"")
        assert (await rendezvous.receive()).data == "text ✓"
        assert (await rendezvous.receive()).data == b"\x00" * 100_000
        assert (await rendezvous.receive()).data == b""
        await rendezvous.send_bytes(b"reply")
        assert (await sender.receive()).data == b"reply"
        # Close codes and reasons are forwarded.
        await sender.send_frame((4001).to_bytes(2, "big") + b"app reason", aiohttp.WSMsgType.CLOSE)
        closing = await rendezvous.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert (closing.data, closing.extra) == (4001, "app reason")
        # Half-close: the listener can still send after the sender's close frame.
        await rendezvous.send_bytes(b"late data")
        assert (await sender.receive()).data == b"late data"
        await rendezvous.close(code=1000)
        final = await sender.receive()
        assert final.type is aiohttp.WSMsgType.CLOSE and final.data == 1000
        await control.close()


async def test_rendezvous_address_is_single_use_and_secret(relay: Relay) -> None:
    async with session() as s:
        control = await open_listener(s, relay)
        sender_task = asyncio.create_task(
            s.ws_connect(
                f"{relay.base_url}/$hc/hc?sb-hc-action=connect", headers={AUTH: relay.token("hc")}
            )
        )
        address = str((await next_accept(control))["address"])
        forged = address.split("&sb-hc-rendezvous=")[0] + "&sb-hc-rendezvous=guess"
        assert (await handshake_status(relay, forged[len(relay.base_url) :]))[0] == 403
        rendezvous = await s.ws_connect(address)
        sender = await sender_task
        assert (await handshake_status(relay, address[len(relay.base_url) :]))[0] == 403
        await asyncio.gather(sender.close(), rendezvous.close())
        await control.close()


async def test_reject_reaches_the_sender(relay: Relay) -> None:
    async with session() as s:
        control = await open_listener(s, relay)
        sender_task = asyncio.create_task(
            handshake_status(relay, "/$hc/hc?sb-hc-action=connect", {AUTH: relay.token("hc")})
        )
        address = str((await next_accept(control))["address"])
        reject = (
            address
            + "&sb-hc-statusCode=401&sb-hc-statusDescription="
            + quote("Status Description from test")
        )
        assert (await handshake_status(relay, reject[len(relay.base_url) :]))[0] == 410
        assert await sender_task == (401, "Status Description from test")
        await control.close()


async def test_listener_that_never_answers(make_relay: RelayFactory) -> None:
    """The sender is answered 504 by the rendezvous timeout, and the address the listener was
    told is refused from then on (tests/server/test_broker.py: the broker waits for an answer
    that comes in time)."""
    async with make_relay(limits={"rendezvous_timeout": 0.5}) as relay, session() as s:
        control = await open_listener(s, relay)
        status, reason = await handshake_status(
            relay, "/$hc/hc?sb-hc-action=connect", {AUTH: relay.token("hc")}
        )
        assert status == 504
        assert reason.startswith("The listener did not accept the connection in time.")
        address = str((await next_accept(control))["address"])  # it was told, and ignored it
        assert (await handshake_status(relay, address[len(relay.base_url) :]))[0] == 403
        await control.close()


async def test_failover_between_listeners(relay: Relay) -> None:
    async with session() as s:
        first = await open_listener(s, relay)
        second = await open_listener(s, relay)
        await first.close()  # this one is gone; senders must always reach the other
        for _ in range(6):
            sender, rendezvous = await relayed_pair(s, relay, second)
            await sender.send_bytes(b"x")
            assert (await rendezvous.receive()).data == b"x"
            await asyncio.gather(sender.close(), rendezvous.close())
        await second.close()


async def test_dead_listener_is_skipped() -> None:
    """A listener whose TCP connection vanished without a close frame is never handed a sender.

    The broker is made to try the dead one first whenever it is still registered: each sender
    must still reach the live one (its accept arrives there and data crosses). The relay's
    default rendezvous timeout (30 s) is beyond the 10 s next_accept waits, so a sender left
    with the dead listener fails the test. Here the relay drops the dead channel as soon as its
    read fails, usually before the first sender; a channel found dead only on sending is
    tests/server/test_broker.py's test_a_dead_listener_is_skipped_and_dropped.
    """
    first_tried: list[str] = []

    def dead_first(channels: list[ControlChannel]) -> None:
        channels.sort(key=lambda c: c.listener_id != "dead")
        first_tried.append(channels[0].listener_id)

    broker = LocalBroker(shuffle=dead_first)
    async with RelayServer(relay_config(), broker=broker) as server, session() as s:
        relay = Relay(server, None)
        alive = await open_listener(s, relay, listener_id="alive")
        dead = await open_listener(s, relay, listener_id="dead")
        await eventually(lambda: broker.listener_count("hc") == 2)
        dead._response.connection.transport.abort()  # type: ignore[union-attr]
        for i in range(4):
            sender, rendezvous = await relayed_pair(s, relay, alive)
            await sender.send_bytes(bytes([i]))
            assert (await rendezvous.receive()).data == bytes([i])
            await asyncio.gather(sender.close(), rendezvous.close())
        assert broker.listener_count("hc") == 1
        assert [c.listener_id for c in broker.channels()] == ["alive"]
        assert first_tried  # every offer went through the injected order
        await alive.close()


# -- control-channel life ----------------------------------------------------------------------


async def test_expired_token_closes_the_control_channel(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"token_grace_period": 0}) as relay, session() as s:
        control = await open_listener(s, relay, token=relay.token("hc", ttl=2))
        async with asyncio.timeout(10):
            message = await control.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008


async def test_renew_token_keeps_the_channel(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"token_grace_period": 0}) as relay, session() as s:
        control = await open_listener(s, relay, token=relay.token("hc", ttl=2))
        await control.send_str(json.dumps({"renewToken": {"token": relay.token("hc", ttl=60)}}))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):
                await control.receive()
        # A bad renewal closes with 1008.
        await control.send_str(
            json.dumps({"renewToken": {"token": relay.token("hc", key="bad-key-0123456789abcdef")}})
        )
        async with asyncio.timeout(5):
            message = await control.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008


async def test_garbage_on_the_control_channel_closes_it(relay: Relay) -> None:
    async with session() as s:
        control = await open_listener(s, relay)
        await control.send_str("{not json")
        async with asyncio.timeout(5):
            message = await control.receive()
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1002
        # ... and the relay keeps serving.
        again = await open_listener(s, relay)
        await again.send_str(json.dumps({"someFutureMessage": {}}))  # unknown: ignored
        await again.send_bytes(b"")  # stray empty binary: ignored
        sender_task = asyncio.create_task(handshake_status(relay, "/$hc/anon?sb-hc-action=connect"))
        await again.close()
        await sender_task


async def test_half_open_listener_is_detected(make_relay: RelayFactory) -> None:
    """A listener that stops answering pings is dropped: the broker offers it nothing more."""
    async with make_relay(limits={"keep_alive_interval": 0.4}) as relay, session() as s:
        await open_listener(s, relay, autoping=False)
        assert relay.server.broker.listener_count("hc") == 1
        await eventually(lambda: relay.server.broker.listener_count("hc") == 0)


async def test_tls_relay(tls_relay: Relay) -> None:
    import ssl

    context = ssl.create_default_context(cafile=tls_relay.ca_file)
    assert tls_relay.base_url.startswith("wss://")
    async with session() as s:
        control = await open_listener(s, tls_relay, ssl=context)
        sender_task = asyncio.create_task(
            s.ws_connect(
                f"{tls_relay.base_url}/$hc/hc?sb-hc-action=connect",
                headers={AUTH: tls_relay.token("hc")},
                ssl=context,
            )
        )
        address = str((await next_accept(control))["address"])
        assert address.startswith("wss://")
        rendezvous = await s.ws_connect(address, ssl=context)
        sender = await sender_task
        await sender.send_bytes(b"secure")
        assert (await rendezvous.receive()).data == b"secure"
        await asyncio.gather(sender.close(), rendezvous.close())
        await control.close()
        # TLS 1.1 and older are refused.
        with warnings.catch_warnings():  # setting TLS 1.1 is deprecated, which is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old = ssl.create_default_context(cafile=tls_relay.ca_file)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with pytest.raises(aiohttp.ClientError):
            await s.ws_connect(f"{tls_relay.base_url}/$hc/hc?sb-hc-action=listen", ssl=old)


async def test_public_base_url() -> None:
    from dataclasses import replace

    config = relay_config(limits={"rendezvous_timeout": 0.5})
    config = replace(
        config, server=replace(config.server, public_base_url="wss://relay.example.com")
    )
    async with RelayServer(config) as server, session() as s:
        relay = Relay(server, None)
        control = await open_listener(s, relay, "anon")
        sender_task = asyncio.create_task(handshake_status(relay, "/$hc/anon?sb-hc-action=connect"))
        address = str((await next_accept(control))["address"])
        assert address.startswith("wss://relay.example.com/$hc/anon?")
        await control.close()
        assert (await sender_task)[0] == 504


async def test_failed_listen_storm_is_throttled_and_others_still_served(relay: Relay) -> None:
    statuses = [
        (await handshake_status(relay, "/$hc/hc?sb-hc-action=listen"))[0] for _ in range(25)
    ]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    # The relay keeps serving: a sender from the same source still gets a real answer.
    assert (await handshake_status(relay, "/$hc/anon?sb-hc-action=connect"))[0] == 404


async def test_no_secret_reaches_the_logs(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    token = relay.token("hc")
    signature = token.split("sig=")[1].split("&")[0]
    async with session() as s:
        control = await open_listener(s, relay, token=token)
        query_token = quote(relay.token("hc", ttl=99), safe="")
        sender_task = asyncio.create_task(
            s.ws_connect(f"{relay.base_url}/$hc/hc?sb-hc-action=connect&sb-hc-token={query_token}")
        )
        address = str((await next_accept(control))["address"])
        secret = address.split("sb-hc-rendezvous=")[1].split("&")[0]
        rendezvous = await s.ws_connect(address)
        sender = await sender_task
        await asyncio.gather(sender.close(), rendezvous.close())
        await handshake_status(relay, "/$hc/hc?sb-hc-action=listen", {AUTH: token + "x"})
        await control.close()
    text = caplog.text
    assert "listener" in text  # the relay did log the flow ...
    for needle in (signature, secret, query_token, "sig=", ROOT_KEY):
        assert needle not in text  # ... and none of its secrets


async def test_shutdown_closes_everything_with_1001(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The grace for unanswered close frames is set far beyond what this test allows itself:
    # the shutdown must end because every peer answered, not because the grace ran out.
    monkeypatch.setattr("hybridrelay.server.app._SHUTDOWN_GRACE", 120.0)
    async with make_relay() as relay, session() as s:
        control = await open_listener(s, relay)
        sender_task = asyncio.create_task(
            s.ws_connect(
                f"{relay.base_url}/$hc/hc?sb-hc-action=connect",
                headers={AUTH: relay.token("hc")},
            )
        )
        rendezvous = await s.ws_connect(str((await next_accept(control))["address"]))
        sender = await sender_task
        closing = asyncio.create_task(relay.server.aclose())
        for ws in (control, sender, rendezvous):
            async with asyncio.timeout(5):
                message = await ws.receive()
            assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1001, message
        async with asyncio.timeout(20):  # ordered: the 120 s grace is not waited for
            await closing
        await control.close()
        # New requests are refused while closed.
        with pytest.raises(aiohttp.ClientError):
            await s.ws_connect(f"{relay.base_url}/$hc/hc?sb-hc-action=listen")


async def test_new_connections_are_spread_across_listeners(relay: Relay) -> None:
    async with session() as s:
        listeners = [await open_listener(s, relay) for _ in range(3)]
        counts = [0, 0, 0]

        async def serve(index: int) -> None:
            while True:
                accept = await next_accept(listeners[index])
                counts[index] += 1
                rendezvous = await s.ws_connect(str(accept["address"]))
                await rendezvous.close()

        servers = [asyncio.create_task(serve(i)) for i in range(3)]
        try:
            for _ in range(45):
                sender = await s.ws_connect(
                    f"{relay.base_url}/$hc/hc?sb-hc-action=connect",
                    headers={AUTH: relay.token("hc")},
                )
                await sender.receive()  # the listener's close
                await sender.close()
        finally:
            for task in servers:
                task.cancel()
            await asyncio.gather(*servers, return_exceptions=True)
        assert sum(counts) == 45
        assert min(counts) >= 3, counts  # random choice: P(any listener < 3 of 45) ~ 1e-5
        for control in listeners:
            await control.close()


async def test_sender_host_header_cannot_redirect_the_rendezvous(relay: Relay) -> None:
    """The accept address is built from the listener's own connection, not the sender's Host."""
    attacker_token = create_token(
        "http://attacker.example/hc", ROOT_KEY_NAME, ROOT_KEY, expiry=int(time.time()) + 600
    )
    async with session() as s:
        control = await open_listener(s, relay)
        sender_task = asyncio.create_task(
            handshake_status(
                relay,
                "/$hc/hc?sb-hc-action=connect",
                # The token names the Host it came by, as a client's would (the audience check).
                {AUTH: attacker_token, "Host": "attacker.example:443"},
            )
        )
        address = str((await next_accept(control))["address"])
        assert address.startswith(relay.base_url + "/$hc/hc?"), address
        rendezvous = await s.ws_connect(address)
        # Reading answers the sender's close, which would otherwise wait for its timeout.
        answering = asyncio.create_task(rendezvous.receive())
        assert await sender_task == (101, "Switching Protocols")
        await answering
        await rendezvous.close()
        await control.close()
    async with session() as s:  # the same holds for HTTP requests
        control = await open_listener(s, relay, "anon")
        request_task = asyncio.create_task(
            s.get(relay.http_url + "/anon/x", headers={"Host": "attacker.example"})
        )
        async with asyncio.timeout(10):
            message = await control.receive()
        request = json.loads(message.data)["request"]
        assert str(request["address"]).startswith(relay.base_url + "/$hc/anon?")
        await control.close()
        response = await request_task
        assert response.status == 502  # the listener left without answering
        response.release()


async def test_sender_moves_on_when_its_listener_dies_before_answering(
    make_relay: RelayFactory,
) -> None:
    # The rendezvous timeout is far beyond what the test allows itself (20 s): the sender is
    # offered to the survivor at once, not after the timeout.
    async with (
        make_relay(limits={"rendezvous_timeout": 120}) as relay,
        session() as s,
        asyncio.timeout(20),
    ):
        first, second = await open_listener(s, relay), await open_listener(s, relay)
        sender_task = asyncio.create_task(
            s.ws_connect(
                f"{relay.base_url}/$hc/hc?sb-hc-action=connect&sb-hc-id=moving",
                headers={AUTH: relay.token("hc")},
            )
        )
        told = [asyncio.create_task(next_accept(c)) for c in (first, second)]
        done, _ = await asyncio.wait(told, return_when=asyncio.FIRST_COMPLETED)
        loser = first if told[0] in done else second
        survivor = second if loser is first else first
        # The listener that was told vanishes without answering (its TCP connection drops).
        loser._response.connection.transport.abort()  # type: ignore[union-attr]
        other = told[1] if loser is first else told[0]
        accept = await other  # offered again, to the survivor
        assert accept["id"] == "moving"
        rendezvous = await s.ws_connect(str(accept["address"]))
        sender = await sender_task
        await sender.send_bytes(b"made it")
        assert (await rendezvous.receive()).data == b"made it"
        await asyncio.gather(sender.close(), rendezvous.close())
        await survivor.close()


async def test_a_connection_without_a_request_is_closed_after_the_idle_timeout(
    make_relay: RelayFactory,
) -> None:
    """``limits.idle_timeout`` bounds the wait for a connection's first request (no idle
    connections kept for ever); WebSockets, a control channel among them, are not touched."""
    async with make_relay(limits={"idle_timeout": 0.3, "keep_alive_interval": 60}) as relay:
        async with session() as s:
            control = await open_listener(s, relay)
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # closed by the relay, nothing sent
            writer.close()
            assert not control.closed
            sender, rendezvous = await relayed_pair(s, relay, control)
            await sender.send_bytes(b"still served")
            assert (await rendezvous.receive()).data == b"still served"
            await asyncio.gather(sender.close(), rendezvous.close(), control.close())
