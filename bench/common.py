"""Small helpers shared by the benchmark's processes."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import signal
import time
from collections.abc import Callable, Sequence

__all__ = ["CpuClock", "install_loop", "percentile", "raise_nofile", "serve_until_signalled"]


def install_loop(name: str) -> str:
    """Use uvloop when asked and installed; returns the loop actually used."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class CpuClock:
    """This process's CPU time against wall time, for "who was the limit" reporting."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        t = os.times()
        self._cpu = t.user + t.system
        self._wall = time.monotonic()

    def percent(self) -> float:
        t = os.times()
        wall = time.monotonic() - self._wall
        return 100.0 * (t.user + t.system - self._cpu) / wall if wall > 0 else 0.0


def serve_until_signalled(name: str, protocol: Callable[[], asyncio.Protocol]) -> None:
    """The main of a benchmark server process: ``python -m bench.NAME [--port] [--loop]``.

    Listens on 127.0.0.1 (port 0 by default), prints its readiness line
    ``NAME listening on 127.0.0.1:PORT`` and serves until SIGTERM/SIGINT.
    """
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    args = parser.parse_args()
    install_loop(args.loop)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, "127.0.0.1", args.port, backlog=4096)
        bound = server.sockets[0].getsockname()[1]
        print(f"{name} listening on 127.0.0.1:{bound}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(serve())
