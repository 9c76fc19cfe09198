"""Slow or stalled readers on either end (issue 17, "Faults to survive"): memory stays bounded,
and the other connections on the same listener keep flowing.

A real ``hybridrelay serve`` (and, for the bridge, a real ``hybridrelay bridge -L -R``
process) carries connections whose one end stops reading while the other keeps writing, in
both directions at once. Backpressure must stop the writers (the bytes in flight are the
sockets' and transports' buffers, not a queue that grows), the processes' resident memory
must stay within a bound while the writers push, and a canary connection on the same
listener must keep echoing. The figures (peak RSS over the baseline, bytes the writers got
out before they were held, canary round trips) are logged for docs/RELIABILITY.md.

Memory is read from ``/proc/PID/status`` (``VmRSS``) every 50 ms while the writers push.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hybridrelay import HybridConnectionClient, HybridConnectionListener, HybridConnectionStream
from tests.reliability.test_churn import RunningRelay, relay_process

report = logging.getLogger("tests.reliability")

#: How long the writers push against stalled readers (the span under test).
STALL_SECONDS = 2.0
#: What the relay (or the bridge) may grow by while they do: its transports' write buffers
#: (64 KiB high-water marks) and the allocator's slack, not the bytes written.
RSS_BOUND = 24 * 2**20
CHUNK = b"\xa5" * 65536


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Writer:
    """Writes ``CHUNK`` after ``CHUNK`` with ``write`` until cancelled, counting bytes out."""

    def __init__(self, write: Callable[[bytes], Coroutine[Any, Any, None]]) -> None:
        self.written = 0
        self._write = write
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self._write(CHUNK)
            self.written += len(CHUNK)


async def push_while(
    pids: dict[str, int],
    start_writers: Callable[[], list[Writer]],
    canary: Callable[[], Coroutine[Any, Any, None]],
) -> tuple[dict[str, int], list[int], int, list[float]]:
    """Start the writers and for ``STALL_SECONDS`` sample the processes' RSS and run canary
    round trips. Returns the peak growth per process over its RSS before the writers started,
    the bytes each writer had out at the half-way point and at the end (as one list:
    half-way ones first), the canary's round trips and their latencies."""
    baseline = {name: rss(pid) for name, pid in pids.items()}
    writers = start_writers()
    peak = dict(baseline)
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STALL_SECONDS

    async def sample() -> None:
        while True:
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss(pid))
            await asyncio.sleep(0.05)  # the sampling period

    async def trips() -> None:
        while loop.time() < deadline:
            started = time.perf_counter()
            await canary()
            latencies.append(time.perf_counter() - started)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.sleep(STALL_SECONDS / 2)  # the first half of the span under test
        halfway = [w.written for w in writers]
        async with asyncio.timeout(STALL_SECONDS + 10):
            await trips()
        ended = [w.written for w in writers]
    finally:
        sampler.cancel()
        for writer in writers:
            writer.task.cancel()
    for writer in writers:
        assert not writer.task.done() or writer.task.cancelled(), writer.task
    growth = {name: peak[name] - baseline[name] for name in pids}
    return growth, halfway + ended, len(latencies), latencies


def _held(out: list[int]) -> bool:
    """Every writer was held by backpressure: nothing more went out in the second half."""
    half = len(out) // 2
    return out[:half] == out[half:]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


async def echo_once(stream: HybridConnectionStream, far: HybridConnectionStream) -> None:
    await stream.write(b"c" * 1024)
    received = b""
    while len(received) < 1024:
        received += await far.read(65536)
    await far.write(received)
    back = b""
    while len(back) < 1024:
        back += await stream.read(65536)


@pytest.mark.timeout(120)
async def test_stalled_readers(tmp_path: Path) -> None:
    """Both cases against one relay process (its start-up is most of the time)."""
    async with relay_process(tmp_path) as relay:
        await websocket_stream_case(relay)
        await bridge_case(relay)


async def websocket_stream_case(relay: RunningRelay) -> None:
    """One sender that stops reading while its listener writes, one listener that stops
    reading while its sender writes, and a canary connection, all on one listener."""
    listener = HybridConnectionListener.from_connection_string(relay.connection_string)
    await listener.open()
    client = HybridConnectionClient.from_connection_string(relay.connection_string)
    streams: list[HybridConnectionStream] = []

    async def pair() -> tuple[HybridConnectionStream, HybridConnectionStream]:
        stream = await client.create_connection()
        async with asyncio.timeout(10):
            far = await listener.accept_connection()
        assert far is not None
        streams.extend((stream, far))
        return stream, far

    try:
        canary, canary_far = await pair()
        for _ in range(20):  # warm-up: the relay's buffers and the allocator's arenas
            await echo_once(canary, canary_far)
        stalled_sender, to_sender = await pair()
        from_sender, stalled_listener = await pair()
        growth, out, trips, latencies = await push_while(
            {"relay": relay.process.pid},
            lambda: [Writer(to_sender.write), Writer(from_sender.write)],
            lambda: echo_once(canary, canary_far),
        )
    finally:
        for stream in streams:
            stream._socket.abort()
        await client.aclose()
        await listener.aclose()
    report.info(
        "stalled readers (WebSocket stream, %.0f s): relay RSS +%.1f MiB at its peak; "
        "writers held after %.1f / %.1f MiB; canary %d round trips (each must succeed), "
        "p99 %.1f ms",
        STALL_SECONDS,
        growth["relay"] / 2**20,
        out[-2] / 2**20,
        out[-1] / 2**20,
        trips,
        p99(latencies),
    )
    assert _held(out), out
    assert growth["relay"] < RSS_BOUND
    assert trips >= 10


@asynccontextmanager
async def bridge_process(relay: RunningRelay, destination: int) -> AsyncIterator[tuple[int, int]]:
    """``hybridrelay bridge -L 127.0.0.1:PORT:churn -R churn:127.0.0.1:destination``, ready:
    (its pid, the -L port)."""
    # The relay creates the hybrid connection on its first listen; the -L forward checks that
    # it exists before it binds.
    creating = HybridConnectionListener.from_connection_string(relay.connection_string)
    await creating.open()
    await creating.aclose()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hybridrelay",
        "bridge",
        "-L",
        f"127.0.0.1:{port}:churn",
        "-R",
        f"churn:127.0.0.1:{destination}",
        "--shutdown-grace-period",
        "0.5",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HYBRIDRELAY_CONNECTION_STRING": relay.connection_string},
    )
    assert process.stderr is not None
    drain: asyncio.Task[None] | None = None
    try:
        seen = ""
        async with asyncio.timeout(30):
            while "all forwards are up" not in seen:
                line = (await process.stderr.readline()).decode()
                assert line, f"bridge exited before it was ready: {seen}"
                seen += line
        drain = asyncio.create_task(_drain(process.stderr))
        yield process.pid, port
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()
        if drain is not None:
            drain.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def bridge_case(relay: RunningRelay) -> None:
    """client -> bridge -L -> relay -> bridge -R -> destination: a client that stops reading
    while its destination writes, a destination that stops reading while its client writes,
    and a canary connection echoing through the same edge."""
    stop = asyncio.Event()

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            role = await reader.readexactly(1)
            if role == b"W":  # writes to a client that never reads
                while True:
                    writer.write(CHUNK)
                    await writer.drain()
            elif role == b"S":  # never reads what its client writes
                await stop.wait()
            else:  # the canary's echo
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(destination, "127.0.0.1", 0)
    dest_port = int(server.sockets[0].getsockname()[1])
    clients: list[asyncio.StreamWriter] = []
    try:
        async with bridge_process(relay, dest_port) as (bridge_pid, port):

            async def connect(role: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                clients.append(writer)
                writer.write(role)
                return reader, writer

            canary_reader, canary_writer = await connect(b"E")

            async def canary() -> None:
                canary_writer.write(b"c" * 1024)
                await canary_reader.readexactly(1024)

            for _ in range(20):  # warm-up
                await canary()
            await connect(b"W")  # never read
            _, to_stalled_destination = await connect(b"S")

            async def write(data: bytes) -> None:
                to_stalled_destination.write(data)
                await to_stalled_destination.drain()

            growth, out, trips, latencies = await push_while(
                {"relay": relay.process.pid, "bridge": bridge_pid},
                lambda: [Writer(write)],
                canary,
            )
            for client in clients:  # before the bridge's and the relay's drain at shutdown
                client.transport.abort()
    finally:
        for client in clients:
            client.transport.abort()
        stop.set()
        server.close()
    report.info(
        "stalled readers (bridge, %.0f s): relay RSS +%.1f MiB, bridge (-L and -R) +%.1f MiB "
        "at their peaks; the client's writes held after %.1f MiB; canary %d round trips, "
        "p99 %.1f ms",
        STALL_SECONDS,
        growth["relay"] / 2**20,
        growth["bridge"] / 2**20,
        out[-1] / 2**20,
        trips,
        p99(latencies),
    )
    assert _held(out), out
    assert growth["relay"] < RSS_BOUND and growth["bridge"] < RSS_BOUND
    assert trips >= 10


#: Loaded by the relay's interpreter (``sitecustomize`` on ``PYTHONPATH``): its splice ignores
#: backpressure, so a stalled reader's bytes pile up in the relay's write buffers.
IGNORES_BACKPRESSURE = """
import hybridrelay.transport.splice as splice
splice._Leg.pause_writing = lambda self: None
"""


@pytest.mark.soak
@pytest.mark.timeout(120)
async def test_the_bound_finds_a_relay_that_ignores_backpressure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check itself, against a relay with a planted fault: it must fail."""
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "sitecustomize.py").write_text(IGNORES_BACKPRESSURE)
    monkeypatch.setenv("PYTHONPATH", str(planted))
    with pytest.raises(AssertionError):
        async with relay_process(tmp_path) as relay:
            await websocket_stream_case(relay)
