"""A link that goes silent (issue 17, "Faults to survive"): packets stop, no FIN, no RST.

A small proxy of our own sits between an SDK listener and the relay and is paused: it stops
forwarding in both directions while keeping both TCP connections open, which is what a cut
cable or a dead NAT entry looks like to each end. Keep-alive must detect it on both ends within
its configured interval (pings every ``INTERVAL`` s; a missing pong fails the link), the relay
must stop routing to the listener and release it, and the listener must come back once the path
works again. The detection times are logged for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

import pytest

from hybridrelay import HybridConnectionListener
from tests.conftest import RelayFactory, eventually

report = logging.getLogger("tests.reliability")

INTERVAL = 0.5
#: A ping's interval, then its pong's deadline (at most the interval again), plus scheduling.
DETECTED_WITHIN = 3 * INTERVAL + 1.0


class PausableProxy:
    """Forwards TCP to ``port``; :meth:`pause` stops every byte both ways, sending nothing."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.running = asyncio.Event()
        self.running.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += [writer, up_writer]
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while True:
                await self.running.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self.running.wait()  # bytes read just before the pause are held too
                writer.write(data)
                await writer.drain()
        with suppress(ConnectionError, RuntimeError):
            writer.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()


@pytest.mark.timeout(60)
async def test_keep_alive_detects_a_silent_link_on_both_ends(make_relay: RelayFactory) -> None:
    async with make_relay(limits={"keep_alive_interval": INTERVAL}) as relay:
        proxy = PausableProxy(relay.server.port)
        proxy_port = await proxy.start()
        connection_string = relay.connection_string("hc").replace(
            f":{relay.server.port}/", f":{proxy_port}/"
        )
        listener = HybridConnectionListener.from_connection_string(
            connection_string, keep_alive_interval=INTERVAL
        )
        changes: list[tuple[float, str]] = []
        listener.on_status(lambda status, _: changes.append((time.monotonic(), status)))
        try:
            await listener.open()
            broker = relay.server.broker
            await eventually(lambda: broker.listener_count("hc") == 1)
            proxy.pause()
            paused_at = time.monotonic()
            await eventually(lambda: broker.listener_count("hc") == 0, DETECTED_WITHIN + 5)
            relay_detected = time.monotonic() - paused_at
            await eventually(
                lambda: any(t > paused_at and s != "online" for t, s in changes),
                DETECTED_WITHIN + 5,
            )
            listener_detected = next(t for t, s in changes if t > paused_at) - paused_at
            report.info(
                "silent link (keep-alive %.1f s): the relay dropped the listener after %.2f s, "
                "the listener noticed after %.2f s",
                INTERVAL,
                relay_detected,
                listener_detected,
            )
            assert relay_detected <= DETECTED_WITHIN
            assert listener_detected <= DETECTED_WITHIN
            proxy.resume()  # the path works again: the listener is back by itself
            await eventually(lambda: broker.listener_count("hc") == 1, 15)
            await eventually(lambda: listener.status == "online", 15)
        finally:
            await listener.aclose()
            await proxy.aclose()
