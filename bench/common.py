"""Small helpers shared by the benchmark's processes."""

from __future__ import annotations

import asyncio
import math
import os
import resource
import time
from collections.abc import Sequence

__all__ = ["CpuClock", "install_loop", "percentile", "raise_nofile"]


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
