"""The reconnect storm for real: N ``hybridrelay serve --cluster`` nodes on a real redis-server,
M SDK listeners spread over them (each given every node's endpoint), node1 (or node1..K)
SIGKILLed.

Every reconnect attempt is recorded from the listeners' own status events (``connecting`` with
the node tried, then ``online`` or ``offline``). Measured on the way, to calibrate the model:
the surviving nodes' CPU per accepted control channel (``/proc``, above their idle rate) and
Redis' commands and bytes per moved listener (``INFO commandstats`` / ``INFO stats``), both
over the storm plus the time the dead node's lease takes to run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster_nodes import (
    KEY_NAME,
    redis_counters,
    start_nodes,
    start_redis,
    write_relay_config,
)
from bench.procs import ProcGroup, read_cpu, read_mem_kib
from bench.reconnect_storm.storm import Attempt, StormSummary, summarize
from bench.topologies import _tls_files
from hybridrelay.client import HybridConnectionListener, SharedAccessKeyTokenProvider

__all__ = ["RealParams", "RealResult", "run_real"]

#: after the last listener is back, how long the Redis and CPU counters keep counting: the dead
#: node's lease (3 s) and one renewal (1 s), after which a survivor removes its routes
AFTERMATH = 5.0
#: the window before the kill over which the nodes' idle CPU and Redis rates are measured
BASELINE = 2.0


@dataclass(frozen=True)
class RealParams:
    nodes: int = 3
    listeners: int = 30
    #: nodes SIGKILLed at once: node1 .. node{kill}
    kill: int = 1
    #: hybrid connections the listeners are spread over; None = one per listener (a site each)
    entities: int | None = None
    tls: bool = False
    #: all listeners must be back within this many seconds of the kill
    timeout: float = 60.0
    #: an existing redis-server (the tests' fixture); None starts one
    redis_url: str | None = None
    #: measure the idle rates before the kill and count on after the storm (BASELINE +
    #: AFTERMATH seconds more); the tests leave it off
    calibrate: bool = True


@dataclass
class RealResult:
    params: RealParams
    summary: StormSummary
    #: node base URL -> node1, node2, ...
    names: dict[str, str]
    #: every try, its target named node1, node2, ...
    attempts: list[Attempt]
    #: CPU-ms the surviving nodes spent per accepted control channel (above their idle rate)
    accept_cpu_ms: float
    redis_ops_per_moved: float
    redis_bytes_per_moved: float
    #: one node's RSS once it is ready (the file's hybrid connections loaded), KiB
    rss_kib_at_start: float
    #: the nodes' RSS growth per idle listener (control channel), KiB
    rss_kib_per_listener: float
    #: Redis commands per node per minute before the kill (idle cluster)
    redis_idle_ops_per_node_min: float
    #: command name -> calls during the storm window (above the idle rate)
    redis_commands: dict[str, int] = field(default_factory=dict)


class _Recorder:
    """Turns the listeners' status events into :class:`Attempt` records after the kill."""

    def __init__(self) -> None:
        self.killed_at: float | None = None
        self.stopped = False  # the run is over: the listeners' closing is not the storm
        self.attempts: list[Attempt] = []
        self.lost: set[int] = set()
        self.back: set[int] = set()
        self.expected: set[int] = set()
        self.all_back = asyncio.Event()
        self._open: dict[int, tuple[float, str]] = {}

    def watch(self, index: int, listener: HybridConnectionListener) -> None:
        def on_status(status: str, error: BaseException | None) -> None:
            if self.killed_at is None or self.stopped:
                return
            now = time.monotonic() - self.killed_at
            if status == "connecting":
                self._open[index] = (now, listener.relay_endpoint)
            elif index in self._open:
                start, target = self._open.pop(index)
                ok = status == "online"
                self.attempts.append(Attempt(index, target, start, now, ok))
                if ok:
                    self.back.add(index)
                    if self.expected <= self.lost <= self.back:
                        self.all_back.set()
            elif status == "offline":
                self.lost.add(index)

        listener.on_status(on_status)


async def _open_all(listeners: list[HybridConnectionListener], parallel: int = 20) -> None:
    gate = asyncio.Semaphore(parallel)

    async def one(listener: HybridConnectionListener) -> None:
        async with gate:
            await listener.open()

    async with asyncio.timeout(120):
        await asyncio.gather(*(one(listener) for listener in listeners))


async def run_real(params: RealParams) -> RealResult:
    if not 1 <= params.kill < params.nodes:
        raise ValueError("kill must be at least 1 and fewer than the nodes")
    entities = params.entities or params.listeners
    key = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp, ProcGroup() as group:
        workdir = Path(tmp)
        url = params.redis_url
        if url is None:
            url = await asyncio.to_thread(start_redis, group, workdir)
        cert, ca = None, None
        if params.tls:
            cert_file, key_file, ca = _tls_files(workdir)
            cert = (cert_file, key_file)
        names_of_entities = [f"storm-{i}" for i in range(entities)]
        config = write_relay_config(workdir, key, names_of_entities, cert)
        nodes = await start_nodes(group, config, url, params.nodes)
        procs = [proc for proc, _ in nodes]
        urls = [base for _, base in nodes]
        names = {u: f"node{i + 1}" for i, u in enumerate(urls)}
        rss_before = sum(read_mem_kib(p.pid)[0] for p in procs)

        provider = SharedAccessKeyTokenProvider(KEY_NAME, key)
        listeners = []
        for i in range(params.listeners):
            first = i % params.nodes  # spread: listener i starts on node i mod N
            endpoints = urls[first:] + urls[:first]
            ca_file = str(ca) if ca else None
            entity = f"storm-{i % entities}"
            listeners.append(HybridConnectionListener(endpoints, entity, provider, ca_file=ca_file))
        recorder = _Recorder()
        try:
            await _open_all(listeners)
            if params.calibrate:  # the coalesced route writes are done, the heap settled
                await asyncio.sleep(1.0)
            rss_idle = sum(read_mem_kib(p.pid)[0] for p in procs)
            for index, listener in enumerate(listeners):
                recorder.watch(index, listener)
            victims, survivors = procs[: params.kill], procs[params.kill :]
            recorder.expected = {
                i
                for i, listener in enumerate(listeners)
                if listener.relay_endpoint in urls[: params.kill]
            }

            cpu_start = [read_cpu(p.pid) for p in survivors]
            calls_start, bytes_start = await redis_counters(url)
            if params.calibrate:  # the idle rates, measured (not a readiness wait)
                await asyncio.sleep(BASELINE)
            cpu_idle = [read_cpu(p.pid) for p in survivors]
            calls_idle, bytes_idle = await redis_counters(url)

            for victim in victims:
                os.kill(victim.pid, signal.SIGKILL)
            recorder.killed_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(params.timeout):
                    await recorder.all_back.wait()
            if params.calibrate:  # the dead node's lease runs out meanwhile
                await asyncio.sleep(AFTERMATH)
            cpu_end = [read_cpu(p.pid) for p in survivors]
            calls_end, bytes_end = await redis_counters(url)
        finally:
            recorder.stopped = True
            async with asyncio.timeout(30):
                await asyncio.gather(*(listener.aclose() for listener in listeners))

    survivor_urls = urls[params.kill :]
    attempts = [
        Attempt(a.listener, names.get(a.target, a.target), a.start, a.end, a.ok)
        for a in recorder.attempts
    ]
    summary = summarize(
        attempts,
        len(recorder.lost | recorder.expected),
        [names[u] for u in survivor_urls],
    )
    # Both counters: what the storm window saw, less the idle rate measured just before.
    idle_s = max(cpu_idle[0].at - cpu_start[0].at, 1e-3)
    window = cpu_end[0].at - cpu_idle[0].at
    idle_cpu = sum(i.seconds - s.seconds for i, s in zip(cpu_idle, cpu_start, strict=True))
    storm_cpu = sum(e.seconds - i.seconds for e, i in zip(cpu_end, cpu_idle, strict=True))
    storm_cpu -= idle_cpu / idle_s * window
    accepted = sum(1 for a in recorder.attempts if a.ok and a.target in survivor_urls)
    moved = max(summary.moved, 1)
    # The idle window had the dead nodes too: their share of the idle Redis traffic goes.
    share = (params.nodes - params.kill) / params.nodes
    idle_calls = {k: v * share for k, v in _delta(calls_idle, calls_start).items()}
    storm_calls = _delta(calls_end, calls_idle)
    commands = {
        k: max(0, round(v - idle_calls.get(k, 0) / idle_s * window)) for k, v in storm_calls.items()
    }
    storm_bytes = (bytes_end - bytes_idle) - (bytes_idle - bytes_start) * share / idle_s * window
    return RealResult(
        params=params,
        summary=summary,
        names=names,
        attempts=attempts,
        accept_cpu_ms=1000.0 * max(storm_cpu, 0.0) / max(accepted, 1),
        redis_ops_per_moved=sum(commands.values()) / moved,
        redis_bytes_per_moved=max(0.0, storm_bytes) / moved,
        rss_kib_at_start=rss_before / params.nodes,
        rss_kib_per_listener=(rss_idle - rss_before) / max(params.listeners, 1),
        redis_idle_ops_per_node_min=sum(idle_calls.values()) / idle_s * 60 / len(survivor_urls),
        redis_commands={k: v for k, v in sorted(commands.items()) if v},
    )


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}
