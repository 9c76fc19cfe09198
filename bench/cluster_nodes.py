"""A cluster for a measurement: a redis-server, N ``hybridrelay serve --cluster`` nodes, and
Redis' own counters (``INFO commandstats``, ``INFO stats``). Processes are owned by a
:class:`bench.procs.ProcGroup` and stopped by their PIDs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Proc, ProcGroup, free_port
from bench.topologies import _hybridrelay_command

__all__ = [
    "KEY_NAME",
    "redis_counters",
    "start_nodes",
    "start_redis",
    "store_bytes",
    "write_relay_config",
]

KEY_NAME = "root"


def write_relay_config(
    workdir: Path,
    key: str,
    entities: Sequence[str],
    tls: tuple[Path, Path] | None = None,
    *,
    open_entities: bool = False,
) -> Path:
    """A node's file: loopback, port 0, one rule ``KEY_NAME`` with every right, ``entities``
    (``open_entities``: senders need no token)."""
    server = f"  tls: {{cert: {tls[0]}, key: {tls[1]}}}\n" if tls else "  plaintext: true\n"
    auth = ", requires_client_authorization: false" if open_entities else ""
    text = (
        "server:\n  host: 127.0.0.1\n  port: 0\n"
        + server
        + "namespace:\n  authorization_rules:\n"
        + f'    - {{name: {KEY_NAME}, primary_key: "{key}", rights: [Listen, Send, Manage]}}\n'
        + "  hybrid_connections:\n"
        + "".join(f"    - {{name: {name}{auth}}}\n" for name in entities)
    )
    path = workdir / "relay.yaml"
    path.write_text(text)
    return path


def start_redis(group: ProcGroup, workdir: Path) -> str:
    """A redis-server on a free loopback port (no persistence); its ``redis://`` URL once it
    says it is ready."""
    port = free_port()
    redis = group.start(
        "redis-server",
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
    )  # fmt: skip
    redis.wait_line(r"Ready to accept connections", timeout=15)
    return f"redis://127.0.0.1:{port}/0"


async def start_nodes(
    group: ProcGroup, config: Path, redis_url: str, count: int
) -> list[tuple[Proc, str]]:
    """``count`` nodes (node1, node2, ...), started together; each with its base URL once it
    prints the line naming it."""
    argv = [*_hybridrelay_command(), "serve", "--config", str(config), "--cluster", redis_url]
    procs = [group.start(f"node{i + 1}", argv) for i in range(count)]
    nodes = []
    for proc in procs:
        match = await asyncio.to_thread(proc.wait_line, r"relay listening on (\S+)", 30)
        nodes.append((proc, match.group(1)))
    return nodes


async def redis_counters(url: str) -> tuple[dict[str, int], int]:
    """(calls per command, bytes in + out) from Redis' own INFO; INFO itself left out."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=5)
    try:
        stats = await client.info("commandstats")
        net = await client.info("stats")
    finally:
        await client.aclose()
    calls = {
        name.removeprefix("cmdstat_"): int(v["calls"])
        for name, v in stats.items()
        if name != "cmdstat_info"
    }
    return calls, int(net["total_net_input_bytes"]) + int(net["total_net_output_bytes"])


async def store_bytes(url: str) -> int:
    """What the namespaces' store hashes take in Redis (``MEMORY USAGE``, all their fields)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_timeout=5)
    try:
        total = 0
        async for key in client.scan_iter(match="hybridrelay:*:store"):
            total += int(await client.memory_usage(key, samples=0) or 0)
        return total
    finally:
        await client.aclose()
