"""Scenario (6) load: ``wrk`` (HTTP/1.1 keep-alive) against the direct server or the relay.

``wrk`` is a C load generator (epoll, one thread here), so the client is not the limit the
way a Python one would be next to a 150 k req/s direct server. It is optional: without it the
scenario is skipped with a note (``apt-get install wrk``). Its text report is parsed for
requests/s, the 50th/99th latency percentiles (``--latency``), non-2xx answers and socket
errors.
"""

from __future__ import annotations

import re
import shutil
from typing import Any

__all__ = ["WRK_MISSING", "parse_wrk", "wrk_argv", "wrk_path"]

WRK_MISSING = "wrk not installed (apt-get install wrk)"

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_argv(
    url: str, *, seconds: int, connections: int, headers: list[str], threads: int = 1
) -> list[str]:
    wrk = wrk_path()
    assert wrk is not None
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, seconds)}s",
        "--timeout",
        "10s",
        "--latency",
    ]
    for header in headers:
        argv += ["-H", header]
    return [*argv, url]


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """wrk's report -> ``req_per_s``, ``p50_ms``, ``p75_ms``, ``p90_ms``, ``p99_ms``, counts."""
    out: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m is None:
        raise ValueError("no Requests/sec in wrk's output: " + text[-500:])
    out["req_per_s"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m:
        out["requests"] = int(m.group(1))
        out["seconds"] = _ms(m.group(2), m.group(3)) / 1e3
    for q, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        out[f"p{q}_ms"] = _ms(value, unit)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return out
