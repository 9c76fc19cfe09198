"""``hybridrelay serve --cluster ... --workers 2`` as a real subprocess on a real redis-server:
both workers take connections on the shared port, a listener on one serves senders that land on
either (cross-worker rendezvous through the worker's own port), a worker killed with SIGKILL is
restarted and its listener comes back, SIGTERM drains both and exits 0; ``--workers 2`` without
``--cluster`` is a one-line error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from hybridrelay.auth.sas import create_token
from hybridrelay.server.cluster_broker import routes_key
from tests.cluster.conftest import RedisServer
from tests.cluster.test_cluster import listening, until
from tests.cluster.test_cluster_failures import try_round_trip
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME
from tests.serve_process import CLI, Lines, ServeProcess, relay_document, write_config

ROUTES = routes_key("hybridrelay", "hc")
READY = re.compile(r"^worker (\d+) \(pid (\d+)\) ready: rendezvous (\S+)")
MANAGEMENT = re.compile(r"^\[worker (\d+)\] management .* on (http://\S+);")


class Workers(ServeProcess):
    """The supervisor: its stderr as :class:`ServeProcess` reads it, and its stdout lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        super().__init__(process, "")
        assert process.stdout is not None
        self.stdout = Lines(process.stdout)
        self.out = self.stdout.lines

    async def expect_out(self, pattern: str, *, after: int = 0, within: float = 30.0) -> str:
        return await self.stdout.expect(pattern, after=after, within=within)

    def pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest ready process."""
        found = {}
        for line in self.out:
            if match := READY.match(line):
                found[int(match.group(1))] = int(match.group(2))
        return found

    def management(self) -> dict[int, str]:
        found = {}
        for line in self.out:
            if match := MANAGEMENT.match(line):
                found[int(match.group(1))] = match.group(2)
        return found


@contextlib.asynccontextmanager
async def workers(config: Path, redis_url: str, count: int = 2) -> AsyncIterator[Workers]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--config",
        str(config),
        "--cluster",
        redis_url,
        "--workers",
        str(count),
        "--shutdown-grace-period",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Workers(process)
    try:
        line = await running.expect_out(r"workers ready; relay listening on ")
        running.base_url = line.rsplit(" ", 1)[1]
        for index in range(count):
            await running.expect_out(rf"^\[worker {index}\] management ")
        yield running
    finally:
        if process.returncode is None:
            process.kill()  # the workers get SIGTERM (parent-death signal)
            await process.wait()
        for pid in running.pids().values():  # none outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def counter(text: str, name: str) -> float:
    """The sum of a metric's samples in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def metric(management_url: str, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(management_url + "/metrics")
    return counter(answer.text, name)


async def http_post(base_url: str, body: bytes) -> httpx.Response:
    url = base_url.replace("ws://", "http://") + "/hc/x"
    token = create_token(url, ROOT_KEY_NAME, ROOT_KEY, expiry=2**31 - 1)
    async with httpx.AsyncClient(timeout=15) as client:  # a new connection each time
        return await client.post(url, content=body, headers={"ServiceBusAuthorization": token})


async def registered(redis_url: str) -> None:
    """Wait for the listener's worker to write its route (others read it from Redis)."""
    raw = aioredis.from_url(redis_url)

    async def route_written() -> bool:
        return bool(await raw.hgetall(ROUTES))

    try:
        await until(route_written, 15.0)
    finally:
        await raw.aclose()


def config_file(tmp_path: Path) -> Path:
    document = relay_document()
    document["management"] = {"port": 0}
    return write_config(tmp_path / "relay.yaml", document)


@pytest.mark.timeout(90)
async def test_two_workers_share_the_port_and_serve_a_listener_on_either(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with workers(config_file(tmp_path), redis_server.url) as supervisor:
        assert set(supervisor.pids()) == {0, 1}
        management = supervisor.management()
        assert set(management) == {0, 1}, supervisor.out
        async with listening(supervisor.base_url):
            await registered(redis_server.url)
            # New connections each: the kernel spreads them over both workers.
            for i in range(16):
                payload = f"hello {i}".encode()
                assert await try_round_trip(supervisor.base_url, payload)
                answer = await http_post(supervisor.base_url, payload)
                assert answer.status_code == 200, answer.text
                assert answer.content == payload[::-1]
            senders = [
                await metric(management[i], "hybridrelay_sender_connections") for i in (0, 1)
            ]
            requests = [await metric(management[i], "hybridrelay_http_requests") for i in (0, 1)]
            listeners = [
                await metric(management[i], "hybridrelay_listeners_online") for i in (0, 1)
            ]
            # Both took senders, one holds the listener: the other's went across workers.
            assert all(n > 0 for n in senders), senders
            assert all(n > 0 for n in requests), requests
            assert sorted(listeners) == [0, 1], listeners
            mark = len(supervisor.lines)
            supervisor.signal(signal.SIGTERM)
            assert await supervisor.wait(within=30) == 0
        assert "hybridrelay: relay stopped" in supervisor.out
        drains = [line for line in supervisor.lines[mark:] if "drain over" in line]
        assert len(drains) == 2, supervisor.text
        # Each worker's log lines name it (they share the supervisor's stderr).
        named = {m.group(1) for line in drains if (m := re.search(r" \[worker (\d+)\] ", line))}
        assert named == {"0", "1"}, drains
        told = [line for line in supervisor.lines[mark:] if "1 listener(s) told" in line]
        assert len(told) == 1, supervisor.text


@pytest.mark.timeout(90)
async def test_a_killed_worker_is_restarted_and_its_listener_comes_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with workers(config_file(tmp_path), redis_server.url) as supervisor:
        management = supervisor.management()
        async with listening(supervisor.base_url):
            await registered(redis_server.url)
            holding = [
                i for i in (0, 1) if await metric(management[i], "hybridrelay_listeners_online") > 0
            ]
            assert len(holding) == 1
            victim = holding[0]
            old_pid = supervisor.pids()[victim]
            mark = len(supervisor.out)
            os.kill(old_pid, signal.SIGKILL)
            await supervisor.expect(
                rf"worker {victim} \(pid {old_pid}\) exited with signal SIGKILL"
            )
            await supervisor.expect_out(rf"^worker {victim} \(pid \d+\) ready", after=mark)
            assert supervisor.pids()[victim] != old_pid

            # The listener reconnects (to either worker); senders get through again.
            async def back() -> bool:
                return await try_round_trip(supervisor.base_url, b"back")

            await until(back, 20.0)
            for _ in range(8):  # on both workers
                assert await try_round_trip(supervisor.base_url, b"again")


def test_workers_without_cluster_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--config", str(config_file(tmp_path)), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--cluster redis://" in lines[0]
