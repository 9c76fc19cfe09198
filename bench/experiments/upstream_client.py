"""``-H``'s two clients to its upstream, alone: ``python -m bench.experiments.upstream_client
[--requests N] [--concurrency C]``.

The web-app of ``tests/webapps`` under uvicorn (h11) in a process of its own; in this process,
on uvloop, N small GETs (``/small``) C at a time through the httptools pool
(``bridge/upstream_http.UpstreamPool``) and through aiohttp's client (``AiohttpUpstream``),
alternately, 3 rounds. Prints per client and round: this process' CPU time per 1,000
requests (``time.process_time``, the client's own cost: uvicorn runs elsewhere) and the p50
latency of one request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
import uvloop
from tests.webapps.harness import uvicorn_process

from hybridrelay.bridge.upstream_http import AiohttpUpstream, UpstreamClient, UpstreamPool


async def load(client: UpstreamClient, url: str, requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    todo = iter(range(requests))

    async def worker() -> None:
        for _ in todo:
            started = time.perf_counter()
            response = await client.request("GET", url + "/small", [("Host", "bench")], None)
            try:
                async for _chunk in response.chunks():
                    pass
            finally:
                response.release()
            if response.status != 200:
                raise RuntimeError(f"GET /small answered {response.status}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def main(requests: int, concurrency: int) -> None:
    async with uvicorn_process(http="h11") as (_, url):
        pool = UpstreamPool(url, connect_timeout=10, read_timeout=60)
        session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)
        clients: dict[str, UpstreamClient] = {
            "httptools pool": pool,
            "aiohttp": AiohttpUpstream(lambda: session),
        }
        try:
            for client in clients.values():
                await load(client, url, 200, concurrency)  # warm: connections, imports
            for round_ in range(1, 4):
                for name, client in clients.items():
                    cpu = time.process_time()
                    latencies = await load(client, url, requests, concurrency)
                    spent = (time.process_time() - cpu) * 1e6 / requests
                    p50 = statistics.median(latencies) * 1000
                    print(
                        f"round {round_}: {name:15s} {spent:6.1f} CPU-ms / 1,000 requests,"
                        f" p50 {p50:.2f} ms"
                    )
        finally:
            await pool.aclose()
            await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.upstream_client")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    uvloop.run(main(args.requests, args.concurrency))
