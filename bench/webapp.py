"""The web-app scenario: ``python -m bench.webapp [--quick] [--requests N] [--concurrency C]``.

One ASGI application (Starlette, ``tests/webapps/app.py``) three ways, in the same run:

* ``direct``: under uvicorn, called directly (the baseline);
* ``serve-app``: ``hybridrelay serve-app`` behind a relay (``hybridrelay serve``);
* ``bridge -H``: the same uvicorn behind ``hybridrelay bridge -H`` and a relay.

For each: requests per second and p50/p99 latency of a small GET (``C`` at a time), and the
latency from sending an SSE request to its first event (p50/p99 of ``--sse`` requests, one at a
time); then each relayed path's ratio against ``direct``. Every process is a subprocess (the
load generator is this one); numbers from a shared machine are only indicative (run it on a
quiet one, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from tests.webapps.harness import (
    AUTH,
    ENTITY,
    bridge_h,
    relay_process,
    serve_app,
    uvicorn_process,
)

from bench.common import percentile

PATHS = ("direct", "serve-app", "bridge -H")


@contextlib.asynccontextmanager
async def path_under_test(name: str, tmp: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """(base URL of the app's routes, headers to send) for one way of serving the app."""
    if name == "direct":
        async with uvicorn_process() as (_, url):
            yield url, {}
        return
    async with relay_process(tmp, None) as relay:
        headers = {AUTH: relay.token()}
        base = f"{relay.http_url}/{ENTITY}"
        if name == "serve-app":
            async with serve_app(relay, "--no-access-log"):
                yield base, headers
        else:
            async with uvicorn_process(root_path="/" + ENTITY) as (_, upstream):
                async with bridge_h(relay, upstream, "--no-access-log"):
                    yield base, headers


async def small_requests(
    http: httpx.AsyncClient, base: str, requests: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            response = await http.get(f"{base}/small")
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"GET /small answered {response.status_code}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "rps": requests / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


async def first_sse_event(http: httpx.AsyncClient, base: str, count: int) -> dict[str, float]:
    latencies: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        params = {"stream": uuid.uuid4().hex, "n": "1"}
        async with http.stream("GET", f"{base}/sse", params=params) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    latencies.append(time.perf_counter() - started)
                    break
    return {
        "sse_p50_ms": percentile(latencies, 50) * 1000,
        "sse_p99_ms": percentile(latencies, 99) * 1000,
    }


async def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with path_under_test(name, Path(tmp)) as (base, headers):
            limits = httpx.Limits(max_connections=args.concurrency)
            async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as http:
                await small_requests(http, base, min(args.requests, 50), args.concurrency)  # warm
                record: dict[str, Any] = {"path": name}
                record.update(await small_requests(http, base, args.requests, args.concurrency))
                record.update(await first_sse_event(http, base, args.sse))
                return record


def table(records: list[dict[str, Any]]) -> str:
    direct = next(r for r in records if r["path"] == "direct")
    lines = [
        "| path | req/s | p50 ms | p99 ms | first SSE event p50 / p99 ms | req/s vs direct "
        "| p50 vs direct | SSE p50 vs direct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['path']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['sse_p50_ms']:.2f} / {r['sse_p99_ms']:.2f} "
            f"| {r['rps'] / direct['rps']:.2f}x | {r['p50_ms'] / direct['p50_ms']:.2f}x "
            f"| {r['sse_p50_ms'] / direct['sse_p50_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webapp", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="small GETs per path")
    parser.add_argument("--concurrency", type=int, default=32, help="GETs at a time")
    parser.add_argument("--sse", type=int, default=200, help="SSE requests per path")
    parser.add_argument("--quick", action="store_true", help="a tiny run (the smoke test)")
    parser.add_argument("--only", action="append", choices=PATHS, help="path(s) besides direct")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.sse = 60, 4, 5
    paths = ["direct", *(p for p in PATHS[1:] if not args.only or p in args.only)]

    async def run() -> list[dict[str, Any]]:
        return [await measure(name, args) for name in paths]

    records = asyncio.run(run())
    print(table(records))
    if args.out is not None:
        args.out.write_text(json.dumps({"records": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
