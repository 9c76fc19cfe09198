"""The listener side's CPU per relayed small GET, without a relay's noise.

``python -m bench.experiments.listener_cpu [--path serve-app|"bridge -H"] [--seconds 5]
[--in-flight 50] [--runs 3] [--headers wrk|browser] [--tree DIR ...]``

``bench.webapp`` measures the listener behind the real relay and wrk, whose own CPU use and
batching (how many requests reach the listener per read) move with the load on a shared
machine, and with them the listener's CPU per request. Here a *stub relay* in this process
takes the listener's control channel (the WebSocket upgrade, then raw frames) and keeps
``--in-flight`` inline ``request`` messages outstanding (a new one for each response, written
together per read, as the relay's front batches them); each runs the listener's whole path
(``hybridrelay serve-app`` with the web-app tests' Starlette app, or ``hybridrelay bridge -H``
to it under uvicorn on httptools). The listener's CPU-ms per 1,000 responses (``/proc``, the
bridge alone and with its uvicorn) and its responses per second are printed per run.

``--tree DIR`` (repeatable) runs the listener from ``DIR/src`` (another worktree: before and
after a change), alternating the trees run by run; then the median, minimum and maximum per
tree. ``--headers browser`` gives each request the headers a browser sends (the relay strips
``Host`` and its token, so what wrk sends arrives empty: the default).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import uvloop
from tests.webapps.harness import ENTITY, RelayProcess, bridge_h, serve_app, uvicorn_process

from bench.experiments.http_floor import _frame, _Frames
from bench.webapp import cpu_seconds

PATHS = ("serve-app", "bridge -H")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BROWSER_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language": "en-US,en;q=0.9",
    "Accept-Encoding": "gzip, deflate, br",
    "Cookie": "session=0123456789abcdef; theme=dark",
    "Referer": "https://relay.example.com/hc/",
    "Sec-Fetch-Mode": "navigate",
    "Cache-Control": "max-age=0",
}


class StubRelay(asyncio.Protocol):
    """The relay's end of one control channel: answers the upgrade, then keeps requests in
    flight and counts the responses."""

    def __init__(self, port: int, in_flight: int, headers: dict[str, str]) -> None:
        self.port = port
        self.in_flight = in_flight
        self.headers = headers
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.frames: _Frames | None = None
        self.answered = 0
        self.failed = 0
        self.next_id = 0
        self.awaiting_body = False
        self.online = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self) -> bytes:
        self.next_id += 1
        rid = f"{self.next_id:032x}"
        message = {
            "request": {
                "address": f"ws://127.0.0.1:{self.port}/$hc/{ENTITY}?sb-hc-action=request"
                f"&sb-hc-id={rid}&sb-hc-secret=0123456789abcdef0123456789abcdef",
                "id": rid,
                "requestTarget": f"/{ENTITY}/small",
                "method": "GET",
                "remoteEndpoint": {"address": "127.0.0.1", "port": 50000},
                "requestHeaders": self.headers,
                "body": False,
            }
        }
        return _frame(0x1, orjson.dumps(message), mask=False)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.frames is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            key = next(
                line.split(b":", 1)[1].strip()
                for line in self.head[:end].split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.frames = _Frames()
            self.online.set_result(None)
            return
        more: list[bytes] = []
        for opcode, payload in self.frames.feed(data):
            if opcode == 0x9:  # a keep-alive ping
                more.append(_frame(0xA, payload, mask=False))
            elif opcode == 0x1:
                response = orjson.loads(payload)["response"]
                if response["statusCode"] != 200:
                    self.failed += 1
                if response.get("body"):
                    self.awaiting_body = True
                    continue
                self.answered += 1
                more.append(self.request())
            elif opcode == 0x2 and self.awaiting_body:
                self.awaiting_body = False
                self.answered += 1
                more.append(self.request())
        if more:
            self.transport.write(b"".join(more))

    def start(self) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(self.request() for _ in range(self.in_flight)))


@contextlib.asynccontextmanager
async def listener_path(
    name: str, relay: RelayProcess
) -> AsyncIterator[tuple[list[int], list[int]]]:
    """(the listener's PIDs, its upstream's) for one way of serving the app."""
    if name == "serve-app":
        async with serve_app(relay, "--no-access-log") as listener:
            yield [listener.pid], []
        return
    async with uvicorn_process("/" + ENTITY, "httptools") as (app, upstream):
        async with bridge_h(relay, upstream, "--no-access-log") as bridge:
            yield [bridge.pid], [app.pid]


async def run_once(args: argparse.Namespace, tree: str | None) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    headers = BROWSER_HEADERS if args.headers == "browser" else {}
    channels: list[StubRelay] = []
    stub_port = [0]

    def channel() -> StubRelay:
        channels.append(StubRelay(stub_port[0], args.in_flight, headers))
        return channels[-1]

    server = await loop.create_server(channel, "127.0.0.1", 0)
    stub_port[0] = server.sockets[0].getsockname()[1]
    relay = RelayProcess(None, f"ws://127.0.0.1:{stub_port[0]}", None)  # type: ignore[arg-type]
    saved = os.environ.get("PYTHONPATH")
    if tree is not None:  # the harness passes this on to the listener's processes
        os.environ["PYTHONPATH"] = str(Path(tree) / "src")
    try:
        async with listener_path(args.path, relay) as (own, upstream):
            stub = channels[0]
            await stub.online
            stub.start()
            await asyncio.sleep(1.0)  # warm: connections to the upstream, caches
            before, answered = cpu_seconds(own), stub.answered
            before_up = cpu_seconds(upstream)
            await asyncio.sleep(args.seconds)
            count = stub.answered - answered
            spent, spent_up = cpu_seconds(own) - before, cpu_seconds(upstream) - before_up
            if stub.failed:
                raise RuntimeError(f"{stub.failed} responses were not 200")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        server.close()
    return {
        "rps": count / args.seconds,
        "cpu_ms_per_1000": spent * 1e6 / max(count, 1),
        "with_upstream_cpu_ms_per_1000": (spent + spent_up) * 1e6 / max(count, 1),
    }


async def main_async(args: argparse.Namespace) -> None:
    trees: list[str | None] = list(args.tree) if args.tree else [None]
    results: dict[str | None, list[dict[str, float]]] = {tree: [] for tree in trees}
    for run in range(args.runs):
        order = trees if run % 2 == 0 else list(reversed(trees))
        for tree in order:
            record = await run_once(args, tree)
            results[tree].append(record)
            print(
                f"run {run + 1} {tree or 'this tree'}: {record['rps']:,.0f} req/s, "
                f"{record['cpu_ms_per_1000']:.1f} CPU-ms / 1,000"
                + (
                    f" ({record['with_upstream_cpu_ms_per_1000']:.1f} with uvicorn)"
                    if args.path == "bridge -H"
                    else ""
                ),
                flush=True,
            )
    for tree, records in results.items():
        cpu = [r["cpu_ms_per_1000"] for r in records]
        rps = [r["rps"] for r in records]
        print(
            f"{tree or 'this tree'}: {args.path} CPU-ms / 1,000 median {statistics.median(cpu):.1f}"
            f" (min {min(cpu):.1f}, max {max(cpu):.1f}); req/s median {statistics.median(rps):,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.listener_cpu")
    parser.add_argument("--path", choices=PATHS, default="serve-app")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--headers", choices=("wrk", "browser"), default="wrk")
    parser.add_argument("--tree", action="append", help="run the listener from DIR/src")
    args = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
