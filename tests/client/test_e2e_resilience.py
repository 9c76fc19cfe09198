"""Listener resilience: relay restarts, token renewal, several listeners."""

from __future__ import annotations

import asyncio

from hybridrelay.client import (
    HybridConnectionListener,
    SharedAccessKeyTokenProvider,
    SharedAccessSignatureTokenProvider,
)
from hybridrelay.exceptions import RelayConnectionError
from tests.client.helpers import accept_one, make_client, open_listener, root_provider
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, RelayFactory


class StatusLog:
    """Records status events and lets a test await a given status."""

    def __init__(self) -> None:
        self.events: list[tuple[str, BaseException | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, status: str, error: BaseException | None) -> None:
        self.events.append((status, error))
        self._changed.set()

    async def wait_for(self, status: str, after: int = 0) -> tuple[str, BaseException | None]:
        while True:
            for event in self.events[after:]:
                if event[0] == status:
                    return event
            self._changed.clear()
            await self._changed.wait()


async def echo_once(relay: Relay, listener: HybridConnectionListener, payload: bytes) -> None:
    async with make_client(relay) as client:
        sender_task = asyncio.create_task(client.create_connection())
        stream = await accept_one(listener)
        sender = await sender_task
        await sender.write(payload)
        await sender.write_eof()
        assert await stream.read() == payload
        assert await stream.read() == b""
        await stream.write_eof()
        assert await sender.read() == b""
        await asyncio.gather(sender.aclose(), stream.aclose())


async def test_listener_reconnects_after_relay_restart(make_relay: RelayFactory) -> None:
    log = StatusLog()
    async with asyncio.timeout(40):
        async with make_relay() as first:
            port = first.server.port
            listener = HybridConnectionListener(first.base_url, "hc", root_provider())
            listener.on_status(log)
            await listener.open()
            await echo_once(first, listener, b"before")
            mark = len(log.events)
        try:
            status, error = await log.wait_for("offline", mark)
            assert isinstance(error, RelayConnectionError)
            mark = len(log.events)
            async with make_relay(port=port) as second:
                await log.wait_for("online", mark)
                assert listener.status == "online"
                await echo_once(second, listener, b"after restart")
                # Closed while the relay is up: its own close is the last status change.
                await listener.aclose()
        finally:
            await listener.aclose()
        assert log.events[-1] == ("offline", None)
        assert any(event[0] == "connecting" for event in log.events[mark:])


class CountingProvider:
    """Signs real tokens and counts them; wakes waiters on every token."""

    def __init__(self) -> None:
        self._inner = SharedAccessKeyTokenProvider(ROOT_KEY_NAME, ROOT_KEY)
        self.count = 0
        self.issued = asyncio.Event()

    async def get_token(self, audience: str, ttl: float) -> str:
        self.count += 1
        self.issued.set()
        return await self._inner.get_token(audience, ttl)


async def test_token_is_renewed_before_expiry(make_relay: RelayFactory) -> None:
    log = StatusLog()
    provider = CountingProvider()
    async with asyncio.timeout(40), make_relay(limits={"token_grace_period": 0}) as relay:
        listener = HybridConnectionListener(relay.base_url, "hc", provider, token_ttl=3)
        listener.on_status(log)
        async with listener:
            # Three tokens = two renewals: about 5 s, well past the first token's expiry.
            while provider.count < 3:
                provider.issued.clear()
                await provider.issued.wait()
            await echo_once(relay, listener, b"still listening")
            assert [event[0] for event in log.events] == ["connecting", "online"]


async def test_fixed_token_expires_and_listener_goes_offline(make_relay: RelayFactory) -> None:
    # The counterpart of the test above: without renewal the relay drops the channel.
    log = StatusLog()
    async with asyncio.timeout(40), make_relay(limits={"token_grace_period": 0}) as relay:
        token = relay.token("hc", ttl=2)
        listener = HybridConnectionListener(
            relay.base_url, "hc", SharedAccessSignatureTokenProvider(token)
        )
        listener.on_status(log)
        async with listener:
            status, error = await log.wait_for("offline")
            assert "1008" in str(error)


async def test_two_listeners_one_closed_connections_keep_working(relay: Relay) -> None:
    async with asyncio.timeout(30):
        async with open_listener(relay) as survivor:
            doomed = HybridConnectionListener(relay.base_url, "hc", root_provider())
            await doomed.open()
            accepted: list[str] = []

            async def drain(listener: HybridConnectionListener, name: str) -> None:
                async for stream in listener:
                    accepted.append(name)
                    data = await stream.read()
                    await stream.write(data)
                    await stream.write_eof()
                    assert await stream.read() == b""
                    await stream.aclose()

            async with asyncio.TaskGroup() as group:
                group.create_task(drain(survivor, "survivor"))
                group.create_task(drain(doomed, "doomed"))
                async with make_client(relay) as client:
                    for round_ in range(2):
                        for i in range(10):
                            sender = await client.create_connection()
                            await sender.write(b"x%d" % i)
                            await sender.write_eof()
                            assert await sender.read() == b"x%d" % i
                            assert await sender.read() == b""
                            await sender.aclose()
                        if round_ == 0:
                            await doomed.aclose()
                            accepted.clear()
                assert accepted == ["survivor"] * 10
                await survivor.aclose()


async def test_open_listener_iterates_until_closed(relay: Relay) -> None:
    async with asyncio.timeout(20):
        listener = HybridConnectionListener(relay.base_url, "hc", root_provider())
        await listener.open()
        waiter = asyncio.create_task(listener.accept_connection())
        await asyncio.sleep(0)
        await listener.aclose()
        assert await waiter is None
        assert listener.status == "offline"
