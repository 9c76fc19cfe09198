"""What cluster mode costs Redis and the nodes, per operation, counted from Redis' own
``INFO commandstats`` / ``INFO stats`` and the nodes' ``/proc`` CPU.

``python -m bench.experiments.cluster_redis_ops [--count 300] [--idle-listeners 200]
[--idle-seconds 20]``

Two ``serve --cluster`` nodes on a redis-server this starts, one listener on node1 (echo, and
an HTTP handler answering 200). Sequential operations, each case after the other: a new tunnel
(open, 1-byte echo, close) through node1 (same node) and through node2 (cross-node), an HTTP
GET through node1 and through node2. Then ``--idle-listeners`` more listeners, on as many
hybrid connections, held for ``--idle-seconds`` against as long a window without them. Every
figure is net of the idle cluster's own rate (lease renewals, version checks), measured in
the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.cluster_nodes import (
    KEY_NAME,
    redis_counters,
    start_nodes,
    start_redis,
    write_relay_config,
)
from bench.procs import ProcGroup, read_cpu
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
    SharedAccessKeyTokenProvider,
)
from hybridrelay.client.http import RelayedHttpContext

ENTITY = "ops"


async def _echo(listener: HybridConnectionListener) -> None:
    async def one(stream: HybridConnectionStream) -> None:
        async with asyncio.timeout(10):
            while data := await stream.read():
                await stream.write(data)
            await stream.write_eof()
        await stream.aclose()

    tasks: set[asyncio.Task[None]] = set()
    async for stream in listener:
        task = asyncio.get_running_loop().create_task(one(stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _answer(ctx: RelayedHttpContext) -> None:
    await ctx.read()
    await ctx.respond(200, "OK", {"content-type": "text/plain"})
    await ctx.write(b"ok")
    await ctx.finish()


async def _tunnel(base_url: str) -> None:
    async with asyncio.timeout(10):
        async with HybridConnectionClient(base_url, ENTITY, None) as client:
            stream = await client.create_connection()
            await stream.write(b"x")
            await stream.write_eof()
            while await stream.read():
                pass
            await stream.aclose()


class _Counters:
    """Redis calls and bytes, the nodes' CPU, and the idle rate of each to subtract."""

    def __init__(self, redis_url: str, pids: list[int]) -> None:
        self._url = redis_url
        self._pids = pids
        self.idle_calls_s = 0.0
        self.idle_bytes_s = 0.0
        self.idle_cpu_s = 0.0

    async def sample(self) -> tuple[float, int, int, float]:
        calls, traffic = await redis_counters(self._url)
        cpu = sum(read_cpu(pid).seconds for pid in self._pids)
        return time.monotonic(), sum(calls.values()), traffic, cpu

    async def idle(self, seconds: float) -> None:
        t0, c0, b0, u0 = await self.sample()
        await asyncio.sleep(seconds)  # the idle window being measured
        t1, c1, b1, u1 = await self.sample()
        self.idle_calls_s, self.idle_bytes_s = (c1 - c0) / (t1 - t0), (b1 - b0) / (t1 - t0)
        self.idle_cpu_s = (u1 - u0) / (t1 - t0)

    async def per_op(
        self, count: int, op: Callable[[], Awaitable[object]]
    ) -> tuple[float, float, float]:
        """(Redis calls, Redis bytes, node CPU-ms) per op, net of the idle rates."""
        t0, c0, b0, u0 = await self.sample()
        for _ in range(count):
            await op()
        t1, c1, b1, u1 = await self.sample()
        wall = t1 - t0
        return (
            (c1 - c0 - self.idle_calls_s * wall) / count,
            (b1 - b0 - self.idle_bytes_s * wall) / count,
            1000.0 * (u1 - u0 - self.idle_cpu_s * wall) / count,
        )


async def _until_routed(base_url: str) -> None:
    """Node2 routes to node1's listener once its route cache has the entity: poll a tunnel."""
    async with asyncio.timeout(15):
        while True:
            try:
                await _tunnel(base_url)
                return
            except Exception:
                await asyncio.sleep(0.1)  # poll interval of a readiness check


async def run(count: int, idle_listeners: int, idle_seconds: float) -> None:
    key = secrets.token_urlsafe(32)
    idle_entities = [f"idle-{i}" for i in range(idle_listeners)]
    with tempfile.TemporaryDirectory(prefix="cluster-ops-") as tmp, ProcGroup() as group:
        workdir = Path(tmp)
        url = await asyncio.to_thread(start_redis, group, workdir)
        config = write_relay_config(workdir, key, [ENTITY, *idle_entities], open_entities=True)
        (one, one_url), (two, two_url) = await start_nodes(group, config, url, 2)
        provider = SharedAccessKeyTokenProvider(KEY_NAME, key)
        listener = HybridConnectionListener(one_url, ENTITY, provider, request_handler=_answer)
        counters = _Counters(url, [one.pid, two.pid])
        async with listener, aiohttp.ClientSession() as http:
            echo = asyncio.get_running_loop().create_task(_echo(listener))
            await _until_routed(two_url)
            await counters.idle(3.0)
            print(
                f"idle cluster: {counters.idle_calls_s * 60 / 2:.0f} Redis commands and "
                f"{counters.idle_bytes_s * 60 / 2:,.0f} bytes per node per minute"
            )

            def get(base: str) -> Callable[[], Awaitable[object]]:
                target = base.replace("ws", "http", 1) + f"/{ENTITY}/x"

                async def op() -> None:
                    async with http.get(target, timeout=aiohttp.ClientTimeout(10)) as answer:
                        answer.raise_for_status()
                        await answer.read()

                return op

            cases = [
                ("new tunnel, same node", lambda: _tunnel(one_url)),
                ("new tunnel, cross-node", lambda: _tunnel(two_url)),
                ("HTTP request, same node", get(one_url)),
                ("HTTP request, cross-node", get(two_url)),
            ]
            print(
                f"| operation ({count} sequential) | Redis commands | Redis bytes "
                "| CPU-ms, both nodes |"
            )
            print("|---|---|---|---|")
            for label, op in cases:
                calls, traffic, cpu = await counters.per_op(count, op)
                print(f"| {label} | {calls:.2f} | {traffic:,.0f} | {cpu:.2f} |")
            echo.cancel()

            if idle_listeners:
                idle = [HybridConnectionListener(one_url, name, provider) for name in idle_entities]
                await counters.idle(idle_seconds)
                for chunk in range(0, len(idle), 20):
                    await asyncio.gather(*(x.open() for x in idle[chunk : chunk + 20]))
                await asyncio.sleep(2.0)  # their coalesced route writes are not the idle cost
                before = counters.idle_calls_s, counters.idle_bytes_s
                await counters.idle(idle_seconds)
                per_minute = (counters.idle_calls_s - before[0]) * 60 / idle_listeners
                bytes_minute = (counters.idle_bytes_s - before[1]) * 60 / idle_listeners
                print(
                    f"idle listener ({idle_listeners} on node1, {idle_seconds:.0f} s windows): "
                    f"{per_minute:+.3f} Redis commands and {bytes_minute:+,.1f} bytes per "
                    "listener per minute"
                )
                await asyncio.gather(*(x.aclose() for x in idle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--idle-listeners", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    asyncio.run(run(args.count, args.idle_listeners, args.idle_seconds))


if __name__ == "__main__":
    main()
