"""Floods while serving (issue 17): a legitimate listener/sender pair keeps working while
clients without a token (or with their own, noisy entity) flood a real `hybridrelay serve`.

Each flood runs for a few seconds from several source addresses (Linux routes all of 127/8 to
loopback) while the canary, from 127.0.0.1, opens a connection through the relay, echoes 1 KiB
and closes it, over and over. The canary must keep at least 99 % success; its latencies are
logged (``--log-cli-level=INFO`` shows them) for docs/RELIABILITY.md, not asserted: speed is
the benchmarks' business. The relay's limits are scaled down so that every flood reaches them
within its seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hybridrelay import HybridConnectionClient, HybridConnectionListener, HybridConnectionStream

report = logging.getLogger("tests.reliability")

KEY = "flood-test-key-0123456789abcdefghijklmnop"
ATTACKERS = [f"127.0.0.{i}" for i in range(10, 20)]
FLOOD_SECONDS = 3.0

CONFIG = f"""
server:
  host: 127.0.0.1
  port: 0
  plaintext: true
limits:
  max_connections: 600
  max_connections_per_source: 40
  header_timeout: 2
  max_pending_per_connection: 50
  max_pending_rendezvous: 400
  rendezvous_timeout: 30
namespace:
  authorization_rules:
    - name: root
      primary_key: {KEY}
      rights: [Listen, Send, Manage]
  hybrid_connections:
    - name: canary
    - name: noisy
      requires_client_authorization: false
"""


@dataclass
class Relay:
    port: int

    @property
    def connection_string(self) -> str:
        return (
            f"Endpoint=ws://127.0.0.1:{self.port}/;SharedAccessKeyName=root;"
            f"SharedAccessKey={KEY};EntityPath=canary"
        )


@asynccontextmanager
async def relay_process(tmp_path: Path) -> AsyncIterator[Relay]:
    config = tmp_path / "relay.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    env = {**os.environ, "HYBRIDRELAY_DATA_DIR": str(tmp_path / "data")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridrelay", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    port = 0
    async with asyncio.timeout(30):
        while not port:  # readiness: the "listening on" line
            line = (await process.stdout.readline()).decode()
            assert line, "serve exited before it was ready"
            if found := re.search(r"relay listening on ws://127\.0\.0\.1:(\d+)", line):
                port = int(found.group(1))

    async def discard_output() -> None:  # the relay's log must not fill the pipe
        assert process.stdout is not None
        while await process.stdout.read(65536):
            pass

    draining = asyncio.create_task(discard_output())
    try:
        yield Relay(port)
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()
        await draining


# -- the canary ----------------------------------------------------------------------------------


@dataclass
class CanaryResult:
    ok: int
    failed: int
    latencies: list[float]

    @property
    def success(self) -> float:
        return self.ok / max(1, self.ok + self.failed)

    def __str__(self) -> str:
        if not self.latencies:
            return f"{self.ok}/{self.ok + self.failed} ok"
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        return (
            f"{self.ok}/{self.ok + self.failed} ok ({self.success:.1%}), "
            f"p50 {statistics.median(ordered) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
        )


async def echo(listener: HybridConnectionListener) -> None:
    async def one(stream: HybridConnectionStream) -> None:
        try:
            while data := await stream.read(65536):
                await stream.write(data)
        finally:
            await stream.aclose()

    async with asyncio.TaskGroup() as group:
        async for stream in listener:
            group.create_task(one(stream))


async def canary(client: HybridConnectionClient, stop: asyncio.Event) -> CanaryResult:
    result = CanaryResult(0, 0, [])
    payload = os.urandom(1024)
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with asyncio.timeout(10):
                stream = await client.create_connection()
                try:
                    await stream.write(payload)
                    received = b""
                    while len(received) < len(payload):
                        chunk = await stream.read(65536)
                        if not chunk:
                            break
                        received += chunk
                finally:
                    await stream.aclose()
            if received != payload:
                raise AssertionError("echo differs")
        except Exception as exc:  # a failed round trip is what is counted
            result.failed += 1
            report.info("canary round trip failed: %r", exc)
            continue
        result.ok += 1
        result.latencies.append(time.monotonic() - started)
    return result


# -- the floods ----------------------------------------------------------------------------------


async def open_from(relay: Relay, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", relay.port, local_addr=(source, 0))


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Flood = Callable[[Relay, asyncio.Event], Coroutine[Any, Any, int]]


async def repeatedly(
    relay: Relay, stop: asyncio.Event, attempt: Callable[[str], Awaitable[None]], workers: int
) -> int:
    """``attempt(source)`` by ``workers`` at a time until ``stop``; how many were made."""
    made = 0

    async def worker(index: int) -> None:
        nonlocal made
        source = ATTACKERS[index % len(ATTACKERS)]
        while not stop.is_set():
            made += 1
            with suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
                await attempt(source)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return made


async def connection_flood(relay: Relay, stop: asyncio.Event) -> int:
    """Idle connections that never send a byte, as many as the relay will take."""
    held: list[asyncio.StreamWriter] = []

    async def attempt(source: str) -> None:
        _, writer = await open_from(relay, source)
        held.append(writer)
        await asyncio.sleep(0.01)

    try:
        return await repeatedly(relay, stop, attempt, workers=50)
    finally:
        for writer in held:
            reset(writer)


async def slowloris(relay: Relay, stop: asyncio.Event) -> int:
    """Request heads that trickle in a byte at a time and never end."""

    async def attempt(source: str) -> None:
        reader, writer = await open_from(relay, source)
        try:
            writer.write(b"GET /$hc/canary?sb-hc-action=connect HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while not stop.is_set() and not reader.at_eof():
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.5)
        finally:
            reset(writer)

    return await repeatedly(relay, stop, attempt, workers=200)


async def header_flood(relay: Relay, stop: asyncio.Event) -> int:
    """Heads of 128 headers of 1 KiB, sent as fast as the relay takes them."""
    big = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(128))

    async def attempt(source: str) -> None:
        reader, writer = await open_from(relay, source)
        try:
            writer.write(b"GET /canary/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + big + b"\r\n")
            async with asyncio.timeout(5):
                await reader.read(4096)
        finally:
            reset(writer)

    return await repeatedly(relay, stop, attempt, workers=30)


async def upgrade_flood(relay: Relay, stop: asyncio.Event) -> int:
    """WebSocket upgrades with a bad token, answered 401, on fresh connections."""

    async def attempt(source: str) -> None:
        reader, writer = await open_from(relay, source)
        try:
            writer.write(
                b"GET /$hc/canary?sb-hc-action=connect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"ServiceBusAuthorization: SharedAccessSignature "
                b"sr=x&sig=bad&se=9999999999&skn=root\r\n\r\n"
            )
            async with asyncio.timeout(5):
                await reader.read(4096)
        finally:
            reset(writer)

    return await repeatedly(relay, stop, attempt, workers=30)


async def pending_flood(relay: Relay, stop: asyncio.Event) -> int:
    """Senders to the attacker's own entity, whose listener never answers, that reset their
    connection at once: each would hold a pending slot for 30 s if the relay let it."""
    control_reader, control_writer = await open_from(relay, ATTACKERS[0])
    control_writer.write(
        b"GET /$hc/noisy?sb-hc-action=listen HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + b"ServiceBusAuthorization: "
        + _token("noisy").encode()
        + b"\r\n\r\n"
    )

    async def read_and_ignore() -> None:  # reads what it is told, answers nothing
        while await control_reader.read(65536):
            pass

    ignoring = asyncio.create_task(read_and_ignore())

    async def attempt(source: str) -> None:
        _, writer = await open_from(relay, source)
        writer.write(
            b"GET /$hc/noisy?sb-hc-action=connect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    try:
        return await repeatedly(relay, stop, attempt, workers=60)
    finally:
        ignoring.cancel()
        reset(control_writer)


def _token(entity: str) -> str:
    from hybridrelay.auth.sas import create_token

    return create_token(f"http://127.0.0.1/{entity}", "root", KEY, expiry=int(time.time()) + 600)


FLOODS: dict[str, Flood] = {
    "connections": connection_flood,
    "slowloris": slowloris,
    "headers": header_flood,
    "upgrades": upgrade_flood,
    "pending": pending_flood,
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(FLOODS))
async def test_the_canary_keeps_working_through_a_flood(tmp_path: Path, name: str) -> None:
    async with relay_process(tmp_path) as relay:
        listener = HybridConnectionListener.from_connection_string(relay.connection_string)
        await listener.open()
        serving = asyncio.create_task(echo(listener))
        client = HybridConnectionClient.from_connection_string(relay.connection_string)
        try:
            quiet = asyncio.Event()
            warm = asyncio.create_task(canary(client, quiet))
            await asyncio.sleep(0.5)  # a short run without a flood, for comparison
            quiet.set()
            before = await warm
            stop = asyncio.Event()
            flooding = asyncio.create_task(FLOODS[name](relay, stop))
            measured = asyncio.create_task(canary(client, stop))
            await asyncio.sleep(FLOOD_SECONDS)  # the flood's duration, not a readiness wait
            stop.set()
            made = await flooding
            during = await measured
        finally:
            await client.aclose()
            await listener.aclose()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    report.info("flood %s (%d attempts): canary without %s; during %s", name, made, before, during)
    assert during.ok + during.failed > 0
    assert during.success >= 0.99, str(during)
