"""Churn leaves nothing behind (issue 17, "Churn"): after thousands of connect / transfer /
close cycles and hundreds of listener reconnects, the relay's RSS, asyncio tasks and file
descriptors are back at their baseline. The relay runs as a real `hybridrelay serve`; its
figures are read from its own /metrics (process_resident_memory_bytes, process_open_fds,
hybridrelay_asyncio_tasks).

The default run is a fast subset; ``python3 -m pytest -m soak tests/reliability`` runs the
full counts (10,000 cycles, 1,000 reconnects). The check itself is tested against a relay with
a planted leak (one task kept per relayed connection), so it is known to fail on one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from hybridrelay import HybridConnectionClient, HybridConnectionListener, HybridConnectionStream

#: The figures, for the closing note: ``--log-cli-level=INFO`` shows them.
report = logging.getLogger("tests.reliability")

#: Started in the relay's process before `serve`: keeps one never-ending task and 64 KiB per
#: relayed connection, the kind of leak the check must see.
PLANTED_LEAK = """
import asyncio, sys
from hybridrelay.server.observer import RelayObserver
kept = []
joined = RelayObserver.connection_joined
def leaking(self, *args, **kwargs):
    kept.append((asyncio.get_running_loop().create_task(asyncio.Event().wait()), bytes(65536)))
    return joined(self, *args, **kwargs)
RelayObserver.connection_joined = leaking
from hybridrelay.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

#: What may remain after the churn, beyond the baseline: a few descriptors and tasks that come
#: and go on their own (a keep-alive timer's, a scrape's), and memory the allocator keeps.
SLACK_FDS = 3
SLACK_TASKS = 3
SLACK_RSS = 12 * 1024 * 1024


@dataclass(frozen=True)
class Figures:
    rss: int
    fds: int
    tasks: int

    def __str__(self) -> str:
        return f"RSS {self.rss / 2**20:.1f} MiB, {self.fds} fds, {self.tasks} tasks"


@dataclass
class RunningRelay:
    process: asyncio.subprocess.Process
    connection_string: str
    metrics_url: str


@asynccontextmanager
async def relay_process(
    tmp_path: Path, *, planted_leak: bool = False
) -> AsyncIterator[RunningRelay]:
    env = {**os.environ, "HYBRIDRELAY_DATA_DIR": str(tmp_path / "data")}
    command = (
        [sys.executable, "-c", PLANTED_LEAK]
        if planted_leak
        else [sys.executable, "-m", "hybridrelay"]
    )
    process = await asyncio.create_subprocess_exec(
        *command,
        "serve",
        "--port",
        "0",
        "--management-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    assert process.stdout is not None
    base_url = management = ""
    async with asyncio.timeout(30):
        while not (base_url and management):  # readiness: the banner's lines
            line = (await process.stdout.readline()).decode()
            assert line, "serve exited before it was ready"
            if found := re.search(r"relay listening on (ws://\S+)", line):
                base_url = found.group(1)
            if found := re.search(r"\) on (http://127\.0\.0\.1:\d+)", line):
                management = found.group(1)
    try:
        cs = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hybridrelay",
            "connection-string",
            "--entity",
            "churn",
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        async with asyncio.timeout(30):
            out, _ = await cs.communicate()
        yield RunningRelay(process, out.decode().strip(), management + "/metrics")
    finally:
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()


async def figures(relay: RunningRelay) -> Figures:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(relay.metrics_url) as response:
            text = await response.text()

    def value(name: str) -> float:
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, name
        return float(found.group(1))

    return Figures(
        int(value("process_resident_memory_bytes")),
        int(value("process_open_fds")),
        int(value("hybridrelay_asyncio_tasks")),
    )


async def settled(relay: RunningRelay, baseline: Figures, seconds: float = 15.0) -> Figures:
    """The relay's figures once its descriptors and tasks stop falling toward the baseline
    (connections close asynchronously), or after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    now = await figures(relay)
    while loop.time() < deadline and (
        now.fds > baseline.fds + SLACK_FDS or now.tasks > baseline.tasks + SLACK_TASKS
    ):
        await asyncio.sleep(0.2)  # polling the relay's own gauges, not waiting for a guess
        now = await figures(relay)
    return now


def leaks(baseline: Figures, after: Figures) -> list[str]:
    found = []
    if after.fds > baseline.fds + SLACK_FDS:
        found.append(f"file descriptors {baseline.fds} -> {after.fds}")
    if after.tasks > baseline.tasks + SLACK_TASKS:
        found.append(f"asyncio tasks {baseline.tasks} -> {after.tasks}")
    if after.rss > baseline.rss + SLACK_RSS:
        found.append(f"RSS {baseline.rss / 2**20:.1f} -> {after.rss / 2**20:.1f} MiB")
    return found


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


async def cycles(client: HybridConnectionClient, count: int, concurrency: int = 16) -> None:
    """``count`` connect / 1 KiB each way / close cycles, ``concurrency`` at a time."""
    payload = os.urandom(1024)
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            stream = await client.create_connection()
            try:
                await stream.write(payload)
                received = b""
                async with asyncio.timeout(10):
                    while len(received) < len(payload):
                        chunk = await stream.read(65536)
                        assert chunk, "the echo ended early"
                        received += chunk
                assert received == payload
            finally:
                await stream.aclose()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def reconnects(connection_string: str, count: int) -> None:
    """``count`` listeners that open their control channel and close it again."""
    for _ in range(count):
        listener = HybridConnectionListener.from_connection_string(connection_string)
        await listener.open()
        await listener.aclose()


async def churn(relay: RunningRelay, connections: int, listeners: int) -> tuple[Figures, Figures]:
    listener = HybridConnectionListener.from_connection_string(relay.connection_string)
    await listener.open()
    serving = asyncio.create_task(echo(listener))
    client = HybridConnectionClient.from_connection_string(relay.connection_string)
    try:
        await cycles(client, 200)  # warm-up: caches, pools and the allocator's first arenas
        baseline = await settled(relay, await figures(relay), seconds=5)
        await cycles(client, connections)
        await reconnects(relay.connection_string, listeners)
    finally:
        await client.aclose()
    after = await settled(relay, baseline)
    await listener.aclose()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    return baseline, after


@pytest.mark.timeout(240)
async def test_churn_returns_to_baseline(tmp_path: Path) -> None:
    async with relay_process(tmp_path) as relay:
        baseline, after = await churn(relay, connections=1_000, listeners=100)
    report.info("churn 1,000 connections / 100 listener reconnects: %s -> %s", baseline, after)
    assert not leaks(baseline, after), (baseline, after)


@pytest.mark.soak
@pytest.mark.timeout(1800)
async def test_churn_soak_returns_to_baseline(tmp_path: Path) -> None:
    async with relay_process(tmp_path) as relay:
        baseline, after = await churn(relay, connections=10_000, listeners=1_000)
    report.info("churn 10,000 connections / 1,000 reconnects: %s -> %s", baseline, after)
    assert not leaks(baseline, after), (baseline, after)


@pytest.mark.timeout(240)
async def test_the_check_finds_a_planted_leak(tmp_path: Path) -> None:
    async with relay_process(tmp_path, planted_leak=True) as relay:
        baseline, after = await churn(relay, connections=300, listeners=0)
    found = leaks(baseline, after)
    assert any(item.startswith("asyncio tasks") for item in found), (baseline, after)
