"""Accepting and rejecting: what the accept handler sees and what the sender gets back."""

from __future__ import annotations

import asyncio

import pytest

from hybridrelay.client import (
    AcceptContext,
    HybridConnectionClient,
    HybridConnectionListener,
    SharedAccessKeyTokenProvider,
)
from hybridrelay.exceptions import (
    AuthorizationError,
    ConnectionRejectedError,
    EndpointNotFoundError,
    ListenerRejectedError,
    StreamClosedError,
)
from tests.client.helpers import accept_one, make_client, open_listener, root_provider
from tests.conftest import LISTEN_KEY, LISTEN_KEY_NAME, ROOT_KEY_NAME, Relay


async def test_handler_sees_headers_path_and_query(relay: Relay) -> None:
    seen: list[AcceptContext] = []

    def handler(ctx: AcceptContext) -> bool:
        seen.append(ctx)
        return True

    async with asyncio.timeout(20):
        async with open_listener(relay, accept_handler=handler) as listener:
            async with make_client(relay) as client:
                sender = await client.create_connection(
                    headers={"X-App-Header": "hello world"},
                    path="/sub/dir",
                    query="a=1&b=two%20words",
                )
                stream = await accept_one(listener)
                assert len(seen) == 1
                ctx = seen[0]
                assert ctx.id == stream.id == sender.id
                assert ctx.path == "/sub/dir"
                assert ctx.query == "a=1&b=two%20words"
                headers = {name.lower(): value for name, value in ctx.connect_headers.items()}
                assert headers["x-app-header"] == "hello world"
                assert "servicebusauthorization" not in headers
                assert "address" not in repr(ctx) and ctx.address not in repr(ctx)
                assert stream.connect_headers == ctx.connect_headers
                assert ctx.remote_endpoint is not None
                assert ctx.remote_endpoint[0] == "127.0.0.1"
                await sender.send_message("text stays text")
                await sender.send_message(b"\x00binary")
                assert await stream.receive_message() == "text stays text"
                assert await stream.receive_message() == b"\x00binary"
                await sender.write_eof()
                assert await stream.receive_message() is None
                assert stream.close_code == 1000
                await asyncio.gather(sender.aclose(), stream.aclose())


@pytest.mark.parametrize(
    ("verdict", "status", "description"),
    [
        ("false", 400, "Rejected by user code"),
        ("reject", 409, "Busy: try again & later (100%)"),
        ("raise", 502, None),
        ("async-false", 400, "Rejected by user code"),
    ],
)
async def test_rejection_reaches_sender(
    relay: Relay, verdict: str, status: int, description: str | None
) -> None:
    async def async_handler(ctx: AcceptContext) -> bool:
        await asyncio.sleep(0)
        return False

    def handler(ctx: AcceptContext) -> bool | None:
        if verdict == "false":
            return False
        if verdict == "reject":
            ctx.reject(409, "Busy: try again & later (100%)")
            return None
        raise RuntimeError("handler bug")

    chosen = async_handler if verdict == "async-false" else handler
    async with asyncio.timeout(20):
        async with open_listener(relay, accept_handler=chosen), make_client(relay) as client:
            with pytest.raises(ConnectionRejectedError) as info:
                await client.create_connection()
            assert info.value.status == status
            if description is not None:
                assert info.value.description == description
            else:
                assert "AcceptHandler" in info.value.description


async def test_subprotocol_first_offer_by_default(relay: Relay) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender = await client.create_connection(subprotocols=["kit.v2", "kit.v1"])
            stream = await accept_one(listener)
            assert sender.subprotocol == "kit.v2"
            assert stream.subprotocol == "kit.v2"
            await asyncio.gather(sender.aclose(), stream.aclose())


async def test_subprotocol_chosen_by_handler(relay: Relay) -> None:
    def handler(ctx: AcceptContext) -> bool:
        assert ctx.offered_subprotocols == ["kit.v2", "kit.v1"]
        ctx.subprotocol = "kit.v1"
        return True

    async with asyncio.timeout(20):
        async with open_listener(relay, accept_handler=handler) as listener:
            async with make_client(relay) as client:
                sender = await client.create_connection(subprotocols=["kit.v2", "kit.v1"])
                stream = await accept_one(listener)
                assert (sender.subprotocol, stream.subprotocol) == ("kit.v1", "kit.v1")
                await asyncio.gather(sender.aclose(), stream.aclose())


async def test_no_subprotocol_when_none_offered(relay: Relay) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay) as listener, make_client(relay) as client:
            sender = await client.create_connection()
            stream = await accept_one(listener)
            assert sender.subprotocol is None and stream.subprotocol is None
            await asyncio.gather(sender.aclose(), stream.aclose())


async def test_auth_errors(relay: Relay) -> None:
    async with asyncio.timeout(20):
        bad_key = SharedAccessKeyTokenProvider(ROOT_KEY_NAME, "not-the-key")
        listener = HybridConnectionListener(relay.base_url, "hc", bad_key)
        with pytest.raises(AuthorizationError) as info:
            await listener.open()
        assert info.value.status == 401
        assert listener.status == "offline"
        # A failed open() leaves a closed listener.
        assert await listener.accept_connection() is None

        async with open_listener(relay):
            listen_only = SharedAccessKeyTokenProvider(LISTEN_KEY_NAME, LISTEN_KEY)
            async with HybridConnectionClient(relay.base_url, "hc", listen_only) as client:
                with pytest.raises(AuthorizationError) as info:
                    await client.create_connection()
                assert info.value.status == 403
            async with HybridConnectionClient(relay.base_url, "hc", None) as client:
                with pytest.raises(AuthorizationError) as info:
                    await client.create_connection()
                assert info.value.status == 401

        missing = HybridConnectionListener(relay.base_url, "nope", root_provider())
        with pytest.raises(EndpointNotFoundError):
            await missing.open()
        async with make_client(relay, "nope") as client:
            with pytest.raises(EndpointNotFoundError):
                await client.create_connection()


@pytest.mark.parametrize("status", [401, 403, 409])
async def test_a_listeners_refusal_is_not_an_authorization_error(relay: Relay, status: int) -> None:
    """An application that refuses a WebSocket answers 403 (ASGI's close before accept): the
    relay marks it as the listener's (PROTOCOL.md 5.4), so the sender is not told to check its
    token; the relay's own 403 (a key without Send) still is."""

    def handler(ctx: AcceptContext) -> None:
        ctx.reject(status, "Forbidden by the application")

    async with asyncio.timeout(20):
        async with open_listener(relay, accept_handler=handler), make_client(relay) as client:
            with pytest.raises(ListenerRejectedError) as info:
                await client.create_connection()
        assert not isinstance(info.value, AuthorizationError)
        assert isinstance(info.value, ConnectionRejectedError)  # as before, for old callers
        assert (info.value.status, info.value.description) == (
            status,
            "Forbidden by the application",
        )
        assert info.value.hint is not None and "listener refused" in info.value.hint
        assert "token" not in str(info.value).replace("accepted the token", "")

        async with open_listener(relay, accept_handler=handler):
            listen_only = SharedAccessKeyTokenProvider(LISTEN_KEY_NAME, LISTEN_KEY)
            async with HybridConnectionClient(relay.base_url, "hc", listen_only) as client:
                with pytest.raises(AuthorizationError) as relays:
                    await client.create_connection()
        assert relays.value.status == 403
        assert not isinstance(relays.value, ConnectionRejectedError)
        assert relays.value.hint is not None and "Send right" in relays.value.hint


async def test_anonymous_sender(relay: Relay) -> None:
    async with asyncio.timeout(20):
        async with open_listener(relay, "anon") as listener:
            async with HybridConnectionClient(relay.base_url, "anon", None) as client:
                sender = await client.create_connection()
                stream = await accept_one(listener)
                await sender.write(b"ping")
                assert await stream.read() == b"ping"
                await asyncio.gather(sender.aclose(), stream.aclose())


async def test_full_queue_rejects_with_503_and_close_drains(relay: Relay) -> None:
    async with asyncio.timeout(20):
        async with make_client(relay) as client:
            listener = HybridConnectionListener(
                relay.base_url, "hc", root_provider(), max_pending=1
            )
            await listener.open()
            first = await client.create_connection()  # queued, nobody accepts it
            with pytest.raises(ConnectionRejectedError) as info:
                await client.create_connection()
            assert info.value.status == 503
            await listener.aclose()
            # The queued stream was closed by the listener ("going away").
            assert await first.read() == b""
            assert first.close_code == 1001
            assert await listener.accept_connection() is None
            await first.aclose()
            with pytest.raises(StreamClosedError):
                await first.read()
