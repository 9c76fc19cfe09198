"""The web-app scenario: ``python -m bench.webapp [--quick] [--requests N] [--concurrency C]``.

One ASGI application (Starlette, ``tests/webapps/app.py``) three ways, in the same run:

* ``direct``: under uvicorn, called directly (the baseline);
* ``serve-app``: ``hybridrelay serve-app`` behind a relay (``hybridrelay serve``);
* ``bridge -H``: the same uvicorn behind ``hybridrelay bridge -H`` and a relay.

For each: requests per second and p50/p99 latency of a small GET (``C`` at a time), and the
latency from sending an SSE request (``Accept: text/event-stream``, as EventSource) to its
first event (p50/p99 of ``--sse`` requests, one at a time); then each relayed path's ratio
against ``direct`` and issue 14's targets (relay + serve-app >= 0.5x direct req/s, relay +
bridge -H >= 0.35x, p99 <= 3x direct, first SSE event <= direct + 5 ms). The small GETs are
made by ``wrk`` where it is installed (a C load generator: the numbers are the servers', as in
``python -m bench --only http``), else by httpx in this process (``--load httpx``), which then
is the limit of every path and hides the relay's cost. uvicorn runs on h11 unless
``--uvicorn-http httptools`` (the direct baseline is ~2.5x faster on it). The CPU time the
relay and the listener (serve-app, or bridge -H plus its uvicorn) spent during the small-GET
window is reported per 1,000 requests (``/proc``), and for ``bridge -H`` the bridge's own
share. Every process is a subprocess; numbers from a shared machine are only indicative (run
it on a quiet one, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
from bench.httpload import parse_wrk, wrk_argv, wrk_path

PATHS = ("direct", "serve-app", "bridge -H")


#: issue 14's targets, against direct in the same run.
MIN_RPS_RATIO = {"serve-app": 0.5, "bridge -H": 0.35}
MAX_P99_RATIO = 3.0
MAX_SSE_EXTRA_MS = 5.0


@contextlib.asynccontextmanager
async def path_under_test(
    name: str, tmp: Path, uvicorn_http: str = "h11"
) -> AsyncIterator[tuple[str, dict[str, str], dict[str, list[int]]]]:
    """(base URL of the app's routes, headers to send, PIDs by role: ``relay``, ``listener``)
    for one way of serving the app."""
    if name == "direct":
        async with uvicorn_process(http=uvicorn_http) as (app, url):
            yield url, {}, {"listener": [app.pid]}
        return
    async with relay_process(tmp, None) as relay:
        headers = {AUTH: relay.token()}
        base = f"{relay.http_url}/{ENTITY}"
        if name == "serve-app":
            async with serve_app(relay, "--no-access-log") as listener:
                yield base, headers, {"relay": [relay.process.pid], "listener": [listener.pid]}
        else:
            async with uvicorn_process("/" + ENTITY, uvicorn_http) as (app, upstream):
                async with bridge_h(relay, upstream, "--no-access-log") as bridge:
                    pids = {"relay": [relay.process.pid], "listener": [bridge.pid, app.pid]}
                    yield base, headers, pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far (``/proc/PID/stat``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def small_requests_wrk(
    base: str, headers: dict[str, str], seconds: int, concurrency: int
) -> dict[str, float]:
    argv = wrk_argv(
        f"{base}/small",
        seconds=seconds,
        connections=concurrency,
        headers=[f"{name}: {value}" for name, value in headers.items()],
    )
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(seconds + 30):
            out, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    result = parse_wrk(out.decode(errors="replace"))
    if result["non_2xx"] or result["socket_errors"] or not result.get("requests"):
        raise RuntimeError(f"wrk: {result['non_2xx']} non-2xx, {result['socket_errors']} errors")
    return {
        "rps": result["req_per_s"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "requests": result["requests"],
    }


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
        "requests": requests,
    }


async def first_sse_event(http: httpx.AsyncClient, base: str, count: int) -> dict[str, float]:
    latencies: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        params = {"stream": uuid.uuid4().hex, "n": "1"}
        # What a browser's EventSource sends (the listener then opens the rendezvous at once).
        accept = {"Accept": "text/event-stream"}
        async with http.stream("GET", f"{base}/sse", params=params, headers=accept) as response:
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
        async with path_under_test(name, Path(tmp), args.uvicorn_http) as (base, headers, pids):
            limits = httpx.Limits(max_connections=args.concurrency)
            async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as http:
                await small_requests(http, base, min(args.requests, 50), args.concurrency)  # warm
                record: dict[str, Any] = {
                    "path": name,
                    "load": args.load,
                    "uvicorn_http": args.uvicorn_http,
                }
                before = {role: cpu_seconds(p) for role, p in pids.items()}
                bridge_before = cpu_seconds(pids["listener"][:1])
                if args.load == "wrk":
                    small = await small_requests_wrk(base, headers, args.seconds, args.concurrency)
                else:
                    small = await small_requests(http, base, args.requests, args.concurrency)
                for role, p in pids.items():
                    spent = cpu_seconds(p) - before[role]
                    record[f"{role}_cpu_ms_per_1000"] = spent * 1e6 / small["requests"]
                if len(pids["listener"]) > 1:  # bridge -H alone, without its uvicorn
                    spent = cpu_seconds(pids["listener"][:1]) - bridge_before
                    record["bridge_cpu_ms_per_1000"] = spent * 1e6 / small["requests"]
                record.update(small)
            # A client of its own: the warm-up's pooled connections may have idled past the
            # server's keep-alive (uvicorn's is 5 s) while wrk ran, and one closed just as it
            # is reused fails the request.
            async with httpx.AsyncClient(headers=headers, timeout=60) as http:
                record.update(await first_sse_event(http, base, args.sse))
            return record


def targets(records: list[dict[str, Any]]) -> list[str]:
    """issue 14's targets, each with this run's figure and whether it is met."""
    direct = next(r for r in records if r["path"] == "direct")
    lines: list[str] = []
    for r in records[1:]:
        rps, p99 = r["rps"] / direct["rps"], r["p99_ms"] / direct["p99_ms"]
        sse_extra = r["sse_p50_ms"] - direct["sse_p50_ms"]
        checks = [
            (
                f"req/s {rps:.2f}x direct (>= {MIN_RPS_RATIO[r['path']]}x)",
                rps >= MIN_RPS_RATIO[r["path"]],
            ),
            (f"p99 {p99:.2f}x direct (<= {MAX_P99_RATIO:g}x)", p99 <= MAX_P99_RATIO),
            (
                f"first SSE event p50 direct {sse_extra:+.2f} ms (<= +{MAX_SSE_EXTRA_MS:g} ms)",
                sse_extra <= MAX_SSE_EXTRA_MS,
            ),
        ]
        lines.extend(
            f"- {r['path']}: {text}: {'met' if met else 'NOT met'}" for text, met in checks
        )
    return lines


def table(records: list[dict[str, Any]]) -> str:
    direct = next(r for r in records if r["path"] == "direct")
    lines = [
        "| path | req/s | p50 ms | p99 ms | first SSE event p50 / p99 ms | req/s vs direct "
        "| p50 vs direct | p99 vs direct | SSE p50 vs direct "
        "| relay CPU-ms / 1,000 req | listener CPU-ms / 1,000 req |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        relay = r.get("relay_cpu_ms_per_1000")
        bridge = r.get("bridge_cpu_ms_per_1000")
        own = "" if bridge is None else f" (bridge {bridge:.0f})"
        lines.append(
            f"| {r['path']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['sse_p50_ms']:.2f} / {r['sse_p99_ms']:.2f} "
            f"| {r['rps'] / direct['rps']:.2f}x | {r['p50_ms'] / direct['p50_ms']:.2f}x "
            f"| {r['p99_ms'] / direct['p99_ms']:.2f}x "
            f"| {r['sse_p50_ms'] / direct['sse_p50_ms']:.2f}x "
            f"| {'-' if relay is None else f'{relay:.0f}'} "
            f"| {r['listener_cpu_ms_per_1000']:.0f}{own} |"
        )
    load = records[0]["load"]
    lines.append("")
    lines.append(
        f"Small GETs by {load}"
        + (" (in this process: it is the limit)" if load == "httpx" else "")
        + f"; uvicorn on {records[0]['uvicorn_http']}."
    )
    lines.append("")
    lines.extend(targets(records))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webapp", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="small GETs per path (httpx)")
    parser.add_argument("--concurrency", type=int, default=50, help="GETs at a time")
    parser.add_argument("--sse", type=int, default=200, help="SSE requests per path")
    parser.add_argument("--seconds", type=int, default=5, help="wrk's window per path")
    parser.add_argument(
        "--load",
        choices=("wrk", "httpx"),
        default="wrk" if wrk_path() else "httpx",
        help="what makes the small GETs (default wrk where installed)",
    )
    parser.add_argument(
        "--uvicorn-http",
        choices=("h11", "httptools"),
        default="h11",
        help="uvicorn's HTTP implementation, for direct and behind -H (default h11, what the "
        "test extra installs; httptools makes direct ~2.5x faster here)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (the smoke test)")
    parser.add_argument("--only", action="append", choices=PATHS, help="path(s) besides direct")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.concurrency, args.sse, args.seconds = 60, 4, 5, 1
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
