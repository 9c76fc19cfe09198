"""Scenario ``cluster`` (``python -m bench --only cluster``): cluster mode on a real redis-server.

Measured in one run, each part ``runs`` times (interleaved where two things are compared):

* **workers**: new tunnels/s (the load generator's ``connrate`` on the relay's own ingress port,
  shared by the workers) and HTTP requests/s (wrk, ``GET /benchhttp/x`` answered by a bridge
  ``-H``) through ``serve --cluster --workers 1``, ``--workers 2`` and ``--workers 2`` with
  ``store.spread: local-first`` (:data:`VARIANTS`), with the CPU each role used (the relay is
  the supervisor and its workers) and the machine's busy share. The listener side is two
  bridge agents, one dialled to each worker's own port (with 1 worker: both on it), so each
  worker has a local listener (``weighted``: half the senders go to the other worker's).
* **latency**: connect-to-first-byte p50/p99 through node B's ingress port with the listener on
  node A (cross-node: the offer goes through Redis) against node A's port (same node), two
  single-worker nodes, sequential connects, alternated in chunks.
* **redis**: Redis operations and bytes per new tunnel (cross-node and same-node, from the
  latency runs), per HTTP request (the 2-worker wrk runs), and per idle listener per minute
  (K listeners held open against none, same window), from Redis' own ``INFO commandstats``
  (calls; our own INFO excluded) and ``INFO stats`` (``total_net_input_bytes`` /
  ``total_net_output_bytes``; our INFO's own request and reply bytes taken out). The nodes'
  background (lease renewals, version checks) is measured in an idle window just before and
  subtracted.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.httpload import parse_wrk, wrk_argv, wrk_path
from bench.procs import CLK_TCK, CpuSample, Proc, ProcGroup, free_port
from bench.topologies import (
    HC,
    HTTP_HC,
    KEY_NAME,
    _bridge_config,
    _http_token,
    _hybridrelay_command,
)

__all__ = ["REDIS_MISSING", "ClusterProfile", "render_cluster", "run_cluster"]

REDIS_MISSING = "redis-server is not installed (apt-get install redis-server)"
REPO = Path(__file__).resolve().parent.parent
#: ``INFO stats commandstats`` as RESP (its bytes are taken out of the input count).
_INFO_REQUEST = b"*3\r\n$4\r\nINFO\r\n$5\r\nstats\r\n$12\r\ncommandstats\r\n"


@dataclass(frozen=True)
class ClusterProfile:
    runs: int
    #: Seconds of connrate load per measurement (and its warm-up).
    seconds: float
    warmup: float
    #: wrk seconds (whole) and connections.
    http_seconds: int
    http_conns: int
    connrate_conns: int
    #: Sequential connects per latency chunk, and chunks per node per run.
    lat_count: int
    lat_chunks: int
    idle_listeners: int
    idle_seconds: float
    #: The idle window that measures the nodes' own Redis traffic before each measurement.
    background_seconds: float = 2.0
    #: How many of :data:`VARIANTS` to measure (the smoke profile leaves local-first out).
    variants: int = 3


CLUSTER_PROFILES = {
    "smoke": ClusterProfile(
        1, 0.3, 0.1, 1, 10, 10, 10, 1, 2, 1.2, background_seconds=0.3, variants=2
    ),
    "quick": ClusterProfile(1, 1.0, 0.3, 1, 50, 50, 100, 2, 25, 10.0),
    "default": ClusterProfile(3, 2.0, 0.5, 2, 50, 50, 100, 3, 50, 30.0),
    "full": ClusterProfile(5, 3.0, 0.5, 5, 50, 50, 200, 5, 200, 60.0),
}


# -- Redis' own counters ----------------------------------------------------------------------


@dataclass(frozen=True)
class RedisCounters:
    """Calls per command (our INFO excluded) and the network bytes, our INFO's own excluded."""

    calls: dict[str, int]
    input_bytes: int
    output_bytes: int

    @property
    def ops(self) -> int:
        return sum(self.calls.values())

    def minus(self, before: RedisCounters) -> RedisCounters:
        return RedisCounters(
            {
                k: v - before.calls.get(k, 0)
                for k, v in self.calls.items()
                if v != before.calls.get(k, 0)
            },
            self.input_bytes - before.input_bytes,
            self.output_bytes - before.output_bytes,
        )


def _read_bulk(sock: socket.socket) -> bytes:
    """One RESP bulk string reply (what INFO answers), whole, with its framing."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        data += chunk
    head, _, _ = data.partition(b"\r\n")
    if not head.startswith(b"$"):
        raise ConnectionError(f"unexpected INFO reply {head[:80]!r}")
    total = len(head) + 2 + int(head[1:]) + 2
    while len(data) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        data += chunk
    return data[:total]


class RedisMeter:
    """Snapshots of one redis-server's counters, each corrected for the snapshots' own traffic:
    a snapshot's request is counted by the next one, and its reply by the next one too."""

    def __init__(self, port: int) -> None:
        self._port = port
        #: Our requests and replies so far (constant offsets cancel out in a difference).
        self._requests = 0
        self._replies = 0

    def snapshot(self) -> RedisCounters:
        with socket.create_connection(("127.0.0.1", self._port), timeout=5) as sock:
            sock.sendall(_INFO_REQUEST)
            reply = _read_bulk(sock)
        fields: dict[str, str] = {}
        calls: dict[str, int] = {}
        for line in reply.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.startswith("cmdstat_"):
                name = key[len("cmdstat_") :]
                if name != "info":
                    stats = dict(part.split("=", 1) for part in value.split(","))
                    calls[name] = int(stats["calls"])
            else:
                fields[key] = value
        # Redis counts a request before it answers it, a reply once written: this snapshot's
        # request is in its own counts, its reply in the next snapshot's.
        self._requests += len(_INFO_REQUEST)
        counters = RedisCounters(
            calls,
            int(fields["total_net_input_bytes"]) - self._requests,
            int(fields["total_net_output_bytes"]) - self._replies,
        )
        self._replies += len(reply)
        return counters


# -- processes ----------------------------------------------------------------------------------


def start_redis(procs: ProcGroup, workdir: Path) -> tuple[Proc, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError(REDIS_MISSING)
    port = free_port()
    directory = workdir / "redis"
    directory.mkdir(exist_ok=True)
    proc = procs.start(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no"],
    )  # fmt: skip
    proc.wait_line(r"Ready to accept connections")
    return proc, port


def flush_redis(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$8\r\nFLUSHALL\r\n")
        if not sock.recv(64).startswith(b"+OK"):
            raise ConnectionError("FLUSHALL failed")


@dataclass
class Node:
    proc: Proc
    base_url: str
    ingress_port: int
    #: Each worker's own base URL (with 1 worker: the node's).
    worker_urls: list[str] = field(default_factory=list)


def _relay_config(
    workdir: Path, name: str, key: str, ingress_port: int, spread: str = "weighted"
) -> Path:
    text = (
        "server:\n  host: 127.0.0.1\n  port: 0\n  plaintext: true\n"
        f"store:\n  spread: {spread}\n"
        # The idle part holds up to 200 listeners of one hybrid connection on one node.
        "limits:\n  max_pending_rendezvous: 20000\n  max_listeners_per_connection: 1000\n"
        f'ingress:\n  - {{listen: "127.0.0.1:{ingress_port}", hybrid_connection: {HC}, '
        "max_connections: 20000}\n"
        "namespace:\n  authorization_rules:\n"
        f'    - {{name: {KEY_NAME}, primary_key: "{key}", rights: [Listen, Send, Manage]}}\n'
        "  hybrid_connections:\n"
        f"    - {{name: {HC}, requires_client_authorization: true}}\n"
        f"    - {{name: {HTTP_HC}, requires_client_authorization: true}}\n"
    )
    path = workdir / f"{name}.yaml"
    path.write_text(text)
    return path


def start_node(
    procs: ProcGroup,
    workdir: Path,
    name: str,
    key: str,
    redis_port: int,
    workers: int,
    spread: str = "weighted",
) -> Node:
    ingress_port = free_port()
    config = _relay_config(workdir, name, key, ingress_port, spread)
    argv = [*_hybridrelay_command(), "serve", "--config", str(config)]
    argv += ["--cluster", f"redis://127.0.0.1:{redis_port}/0", "--workers", str(workers)]
    proc = procs.start(name, argv)
    ready = proc.wait_line(r"relay listening on (ws://127\.0\.0\.1:\d+)", timeout=60)
    node = Node(proc, ready.group(1), ingress_port)
    if workers == 1:
        node.worker_urls = [node.base_url]
    else:
        for index in range(workers):
            m = proc.wait_line(rf"^worker {index} \(pid \d+\) ready: rendezvous (\S+)")
            node.worker_urls.append(m.group(1))
    return node


def start_agent(
    procs: ProcGroup,
    workdir: Path,
    name: str,
    endpoint: str,
    key: str,
    dest_port: int,
    http_port: int | None,
) -> Proc:
    cs = f"Endpoint={endpoint}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={key}"
    http = [f'http_forwards: ["{HTTP_HC}:http://127.0.0.1:{http_port}"]'] if http_port else []
    config = _bridge_config(
        workdir, name, cs, None, f'remote_forwards: ["{HC}:127.0.0.1:{dest_port}"]', *http
    )
    agent = procs.start(name, [*_hybridrelay_command(), "bridge", "-f", str(config)])
    agent.wait_line(r"all forwards are up" if http_port else r"listening for", timeout=30)
    return agent


# -- measurements -------------------------------------------------------------------------------


def machine_cpu() -> CpuSample:
    """CPU seconds the whole machine was busy (every process: other users' too; 100 % = one
    core), from ``/proc/stat``."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return CpuSample(time.monotonic(), (sum(ticks) - idle) / CLK_TCK)


def _cpu(procs: dict[str, Proc]) -> dict[str, CpuSample]:
    return {"machine": machine_cpu(), **{name: p.cpu() for name, p in procs.items()}}


def _percents(before: dict[str, CpuSample], after: dict[str, CpuSample]) -> dict[str, float]:
    return {f"cpu_{name}": after[name].percent_since(before[name]) for name in after}


def _loadgen(
    procs: ProcGroup,
    mode: str,
    port: int,
    extra: list[str],
    on_mark: Callable[[str], None],
    timeout: float,
) -> dict[str, Any]:
    def on_line(line: str) -> None:
        if line.startswith("MARK "):
            on_mark(line[5:])

    m = procs.result_line(
        f"loadgen-{mode}",
        [sys.executable, "-m", "bench.loadgen", mode, "--port", str(port), *extra],
        r"^RESULT (.*)$",
        timeout,
        on_line=on_line,
        env={"PYTHONPATH": str(REPO)},
    )
    result: dict[str, Any] = json.loads(m.group(1))
    return result


def _with_agents(percents: dict[str, float]) -> dict[str, float]:
    """``cpu_agents``: the two agents' CPU together."""
    agents = [v for k, v in percents.items() if k.startswith("cpu_agent")]
    return {**percents, "cpu_agents": sum(agents)}


def _background(meter: RedisMeter, seconds: float) -> tuple[float, float, float]:
    """The nodes' own Redis traffic per second (ops, input bytes, output bytes), measured idle."""
    before = meter.snapshot()
    time.sleep(seconds)  # a measurement window: nothing to wait for but the clock
    delta = meter.snapshot().minus(before)
    return delta.ops / seconds, delta.input_bytes / seconds, delta.output_bytes / seconds


def _per(
    delta: RedisCounters, seconds: float, background: tuple[float, float, float], count: float
) -> dict[str, float]:
    """Redis ops and bytes per unit of work, the nodes' background taken out."""
    if count <= 0:
        return {}
    ops = delta.ops - background[0] * seconds
    sent = delta.input_bytes - background[1] * seconds
    received = delta.output_bytes - background[2] * seconds
    return {
        "redis_ops": ops / count,
        "redis_in_bytes": sent / count,
        "redis_out_bytes": received / count,
    }


@dataclass
class Bed:
    """What every part shares: the processes, the destinations, redis and its meter."""

    procs: ProcGroup
    workdir: Path
    dest_port: int
    http_port: int
    redis_port: int
    meter: RedisMeter
    #: The echo destination and the HTTP upstream (their CPU is reported too).
    destinations: dict[str, Proc] = field(default_factory=dict)
    key: str = field(default_factory=lambda: base64.b64encode(os.urandom(32)).decode())


@contextmanager
def _processes(bed: Bed, started: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(started):
            proc.stop()
            if proc in bed.procs.procs:
                bed.procs.procs.remove(proc)
        flush_redis(bed.redis_port)


#: The relays compared: (label, workers, store.spread).
VARIANTS = (("1", 1, "weighted"), ("2", 2, "weighted"), ("2 local-first", 2, "local-first"))


def measure_workers(
    bed: Bed, variant: str, workers: int, spread: str, prof: ClusterProfile, run: int
) -> dict[str, Any]:
    """New tunnels/s and HTTP requests/s through ``--workers workers`` (``store.spread``)."""
    started: list[Proc] = []
    with _processes(bed, started):
        node = start_node(
            bed.procs, bed.workdir, f"relay-w{workers}", bed.key, bed.redis_port, workers, spread
        )
        started.append(node.proc)
        agents = {}
        for i in range(2):
            endpoint = node.worker_urls[i % len(node.worker_urls)]
            agent = start_agent(
                bed.procs, bed.workdir, f"agent{i}-w{workers}", endpoint, bed.key,
                bed.dest_port, bed.http_port,
            )  # fmt: skip
            started.append(agent)
            agents[f"agent{i}"] = agent
        watched = {"relay": node.proc, **agents, **bed.destinations}
        record: dict[str, Any] = {
            "part": "workers",
            "variant": variant,
            "workers": workers,
            "spread": spread,
            "run": run,
        }
        # New tunnels: connect, 1-byte echo, close, through the shared ingress port.
        marks: dict[str, dict[str, CpuSample]] = {}
        result = _loadgen(
            bed.procs,
            "connrate",
            node.ingress_port,
            ["--conns", str(prof.connrate_conns), "--duration", str(prof.seconds),
             "--warmup", str(prof.warmup)],
            lambda what: marks.__setitem__(what, _cpu(watched)),
            timeout=prof.seconds + prof.warmup + 60,
        )  # fmt: skip
        record["tunnels_per_s"] = result["conns_per_s"]
        record["tunnel_errors"] = result["errors"]
        record["tunnel_p50_ms"] = result["p50_ms"]
        record["tunnel_loadgen_cpu"] = result["loadgen_cpu"]
        if "start" in marks and "end" in marks:
            for name, value in _with_agents(_percents(marks["start"], marks["end"])).items():
                record[f"tunnel_{name}"] = value
        if "tunnel_cpu_relay" in record and result["conns_per_s"]:
            record["tunnel_relay_cpu_ms_per_k"] = (
                record["tunnel_cpu_relay"] * 10_000 / result["conns_per_s"]
            )
            record["tunnel_core_capacity_per_s"] = (
                workers * 1e6 / record["tunnel_relay_cpu_ms_per_k"]
                if record["tunnel_relay_cpu_ms_per_k"]
                else None
            )
        # HTTP requests: wrk through the shared port (its connections spread over the workers).
        background = _background(bed.meter, prof.background_seconds)
        url = f"{node.base_url.replace('ws://', 'http://')}/{HTTP_HC}/x"
        argv = wrk_argv(
            url,
            seconds=prof.http_seconds,
            connections=prof.http_conns,
            headers=[f"ServiceBusAuthorization: {_http_token(bed.key)}"],
        )
        cpu_before = _cpu(watched)
        redis_before = bed.meter.snapshot()
        t0 = time.monotonic()
        wrk = subprocess.run(
            argv, capture_output=True, text=True, timeout=prof.http_seconds + 60, check=False
        )
        seconds = time.monotonic() - t0
        redis_delta = bed.meter.snapshot().minus(redis_before)
        cpu_after = _cpu(watched)
        http = parse_wrk(wrk.stdout)
        record["http_req_per_s"] = http["req_per_s"]
        record["http_p50_ms"] = http.get("p50_ms")
        record["http_p99_ms"] = http.get("p99_ms")
        record["http_errors"] = http["non_2xx"] + http["socket_errors"]
        if http["req_per_s"]:
            record["http_relay_cpu_ms_per_k"] = (
                _percents(cpu_before, cpu_after)["cpu_relay"] * 10_000 / http["req_per_s"]
            )
            # What the workers would carry with a core each at the CPU cost measured.
            record["http_core_capacity_per_s"] = (
                workers * 1e6 / record["http_relay_cpu_ms_per_k"]
                if record["http_relay_cpu_ms_per_k"]
                else None
            )
        for name, value in _with_agents(_percents(cpu_before, cpu_after)).items():
            record[f"http_{name}"] = value
        for name, value in _per(redis_delta, seconds, background, http.get("requests", 0)).items():
            record[f"http_{name}"] = value
        return record


def measure_nodes(
    bed: Bed, prof: ClusterProfile, run: int, idle: bool = False
) -> list[dict[str, Any]]:
    """Two single-worker nodes A and B, a listener (agent) on A: connect latency through A's
    ingress port (same node) against B's (cross-node); with ``idle``, then the idle listeners'
    Redis cost on the same nodes."""
    started: list[Proc] = []
    records: list[dict[str, Any]] = []
    with _processes(bed, started):
        a = start_node(bed.procs, bed.workdir, "relay-a", bed.key, bed.redis_port, 1)
        started.append(a.proc)
        b = start_node(bed.procs, bed.workdir, "relay-b", bed.key, bed.redis_port, 1)
        started.append(b.proc)
        started.append(
            start_agent(bed.procs, bed.workdir, "agent-a", a.base_url, bed.key, bed.dest_port, None)
        )
        background = _background(bed.meter, prof.background_seconds)
        samples: dict[str, list[dict[str, Any]]] = {"same": [], "cross": []}
        for chunk in range(prof.lat_chunks * 2):
            where = "same" if chunk % 2 == 0 else "cross"
            port = a.ingress_port if where == "same" else b.ingress_port
            before = bed.meter.snapshot()
            t0 = time.monotonic()
            result = _loadgen(
                bed.procs, "lat", port,
                ["--count", str(prof.lat_count), "--duration", "60", "--gap", "0.002"],
                lambda what: None, timeout=120,
            )  # fmt: skip
            seconds = time.monotonic() - t0
            result.update(
                _per(bed.meter.snapshot().minus(before), seconds, background, result["n"])
            )
            samples[where].append(result)
        for where, results in samples.items():
            n = sum(r["n"] for r in results)
            records.append(
                {
                    "part": "latency",
                    "where": where,
                    "run": run,
                    "n": n,
                    "errors": sum(r["errors"] for r in results),
                    # Medians of the chunks' percentiles (each chunk: lat_count connects).
                    "p50_ms": statistics.median(r["p50_ms"] for r in results),
                    "p99_ms": statistics.median(r["p99_ms"] for r in results),
                    "redis_ops": statistics.median(r.get("redis_ops", 0.0) for r in results),
                    "redis_in_bytes": statistics.median(
                        r.get("redis_in_bytes", 0.0) for r in results
                    ),
                    "redis_out_bytes": statistics.median(
                        r.get("redis_out_bytes", 0.0) for r in results
                    ),
                }
            )
        if idle:
            records.append(measure_idle(bed, prof, a, started))
    return records


def measure_idle(bed: Bed, prof: ClusterProfile, a: Node, started: list[Proc]) -> dict[str, Any]:
    """Redis operations and bytes per idle listener per minute: K more listeners on node A
    against none, the same window each (``started`` takes the listeners' process)."""
    without = _window(bed.meter, prof.idle_seconds)
    holder = bed.procs.start(
        "idle-listeners",
        [sys.executable, "-m", "bench.idle_listeners", "--endpoint", a.base_url,
         "--key-name", KEY_NAME, "--key", bed.key, "--entity", HC,
         "--count", str(prof.idle_listeners)],
        stdin=True,
        env={"PYTHONPATH": str(REPO) + os.pathsep + str(REPO / "src")},
    )  # fmt: skip
    started.append(holder)
    holder.wait_line(r"^OPEN", timeout=60)
    # Their registration (one write per count change, coalesced) is not idle cost.
    registered(bed.redis_port, prof.idle_listeners + 1)  # and the agent's
    with_listeners = _window(bed.meter, prof.idle_seconds)
    count = prof.idle_listeners
    minutes = prof.idle_seconds / 60
    return {
        "part": "idle",
        "run": 0,
        "listeners": count,
        "seconds": prof.idle_seconds,
        "ops_without": without.ops,
        "ops_with": with_listeners.ops,
        "redis_ops": (with_listeners.ops - without.ops) / count / minutes,
        "redis_in_bytes": (with_listeners.input_bytes - without.input_bytes) / count / minutes,
        "redis_out_bytes": (with_listeners.output_bytes - without.output_bytes) / count / minutes,
        "node_ops_per_min": without.ops / 2 / minutes,
        # What differs between the two windows, per command (the lease's ZADD/ZRANGE every
        # second and the version GET every 5 s fall unevenly into short windows).
        "commands_without": without.calls,
        "commands_with": with_listeners.calls,
    }


def registered(redis_port: int, count: int, timeout: float = 30.0) -> None:
    """Wait until the routes in Redis count ``count`` listeners of the bench's entity."""
    import redis

    from hybridrelay.server.cluster_broker import routes_key  # imports redis too

    client = redis.Redis(port=redis_port, socket_timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            counts = client.hgetall(routes_key("hybridrelay", HC))
            if sum(int(v) for v in counts.values()) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} listeners not registered in {timeout} s: {counts}")
            time.sleep(0.05)  # another process's write: nothing to wait on
    finally:
        client.close()


def _window(meter: RedisMeter, seconds: float) -> RedisCounters:
    before = meter.snapshot()
    time.sleep(seconds)  # a measurement window: nothing to wait for but the clock
    return meter.snapshot().minus(before)


def _destinations(procs: ProcGroup) -> tuple[Proc, int, Proc, int]:
    """bench.dest (echo) and bench.httpdest, and their ports."""
    env = {"PYTHONPATH": str(REPO)}
    dest = procs.start("dest", [sys.executable, "-m", "bench.dest"], env=env)
    dport = int(dest.wait_line(r"dest listening on 127\.0\.0\.1:(\d+)").group(1))
    http = procs.start("httpdest", [sys.executable, "-m", "bench.httpdest"], env=env)
    hport = int(http.wait_line(r"httpdest listening on 127\.0\.0\.1:(\d+)").group(1))
    return dest, dport, http, hport


def run_cluster(
    workdir: Path, prof: ClusterProfile, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every part of the scenario, ``prof.runs`` times; the records.

    Raises:
        FileNotFoundError: redis-server or wrk is not installed (the message says so).
    """
    if wrk_path() is None:
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    with ProcGroup() as procs:
        return _run(procs, workdir, prof, log)


def _part(
    what: str, log: Callable[[str], None], measure: Callable[..., Any], *args: Any
) -> list[dict[str, Any]]:
    """``measure(*args)``'s record(s), or one error record (the other parts still run)."""
    try:
        result = measure(*args)
        return result if isinstance(result, list) else [result]
    except (OSError, TimeoutError, ValueError, KeyError) as exc:
        log(f"cluster {what}: failed: {type(exc).__name__}: {str(exc)[:500]}")
        return [{"part": "error", "what": what, "error": f"{type(exc).__name__}: {exc}"}]


def _run(
    procs: ProcGroup, workdir: Path, prof: ClusterProfile, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    _, redis_port = start_redis(procs, workdir)
    dest, dest_port, http, http_port = _destinations(procs)
    bed = Bed(procs, workdir, dest_port, http_port, redis_port, RedisMeter(redis_port))
    bed.destinations = {"dest": dest, "httpdest": http}
    records: list[dict[str, Any]] = []
    for run in range(prof.runs):
        # Interleaved: no variant has an order advantage.
        chosen = VARIANTS[: prof.variants]
        order = chosen if run % 2 == 0 else chosen[::-1]
        for variant, workers, spread in order:
            log(f"cluster run {run + 1}/{prof.runs}: {workers} worker(s), spread {spread}")
            records += _part(
                f"workers {variant}", log, measure_workers, bed, variant, workers, spread, prof, run
            )
        idle = run == prof.runs - 1
        log(
            f"cluster run {run + 1}/{prof.runs}: cross-node against same-node latency"
            + (
                f"; {prof.idle_listeners} idle listeners for {prof.idle_seconds:g} s"
                if idle
                else ""
            )
        )
        records += _part("nodes", log, measure_nodes, bed, prof, run, idle)
    for record in records:  # the suite's records name a path and a mode
        record["topology"] = "cluster"
        record["mode"] = f"cluster-{record['part']}"
    return records


# -- the table ------------------------------------------------------------------------------


def _spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if not values:
        return "—"
    median = statistics.median(values)
    if len(values) == 1:
        return fmt.format(median)
    return f"{fmt.format(median)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def render_cluster(records: list[dict[str, Any]]) -> str:
    """The scenario's table: medians of the runs (min–max), ratios and the goals."""
    workers = [r for r in records if r.get("part") == "workers"]
    latency = [r for r in records if r.get("part") == "latency"]
    idle = [r for r in records if r.get("part") == "idle"]
    if not (workers or latency or idle):
        return ""

    def col(part: list[dict[str, Any]], key: str, **match: Any) -> list[float]:
        return [
            float(r[key])
            for r in part
            if r.get(key) is not None and all(r.get(k) == v for k, v in match.items())
        ]

    lines = [
        "",
        "### Cluster (redis-server on loopback)",
        "",
        "| what | 1 worker | 2 workers (spread weighted) | 2 workers (local-first) "
        "| ratios to 1 worker |",
        "|---|---|---|---|---|",
    ]
    for label, key, fmt in (
        ("new tunnels/s (ingress port, connect + 1-byte echo + close)", "tunnels_per_s", "{:,.0f}"),
        ("HTTP requests/s (wrk, bridge -H)", "http_req_per_s", "{:,.0f}"),
        ("HTTP p50 ms", "http_p50_ms", "{:.2f}"),
        ("relay CPU-ms per 1,000 tunnels", "tunnel_relay_cpu_ms_per_k", "{:,.0f}"),
        ("relay CPU-ms per 1,000 HTTP requests", "http_relay_cpu_ms_per_k", "{:,.0f}"),
        (
            "new tunnels/s with a core per worker (workers x 1e6 / CPU-ms per 1,000)",
            "tunnel_core_capacity_per_s",
            "{:,.0f}",
        ),
        (
            "HTTP req/s with a core per worker (workers x 1e6 / CPU-ms per 1,000)",
            "http_core_capacity_per_s",
            "{:,.0f}",
        ),
        ("tunnels: CPU % relay (all workers)", "tunnel_cpu_relay", "{:.0f}"),
        ("tunnels: CPU % agents (2)", "tunnel_cpu_agents", "{:.0f}"),
        ("tunnels: CPU % load generator", "tunnel_loadgen_cpu", "{:.0f}"),
        ("tunnels: CPU % echo destination", "tunnel_cpu_dest", "{:.0f}"),
        ("tunnels: CPU % machine busy (of 200; other users too)", "tunnel_cpu_machine", "{:.0f}"),
        ("HTTP: CPU % relay (all workers)", "http_cpu_relay", "{:.0f}"),
        ("HTTP: CPU % agents (2)", "http_cpu_agents", "{:.0f}"),
        ("HTTP: CPU % upstream (httpdest)", "http_cpu_httpdest", "{:.0f}"),
        (
            "HTTP: CPU % machine busy (of 200; wrk and other users too)",
            "http_cpu_machine",
            "{:.0f}",
        ),
    ):
        one, two, local = (col(workers, key, variant=v) for v, _, _ in VARIANTS)
        ratios = (
            " / ".join(
                f"{statistics.median(other) / statistics.median(one):.2f}x"
                for other in (two, local)
                if other
            )
            if one and statistics.median(one) and key.endswith("_per_s")
            else ""
        )
        cells = " | ".join(_spread(values, fmt) for values in (one, two, local))
        lines.append(f"| {label} | {cells} | {ratios} |")
    errors = sum(int(r.get("tunnel_errors", 0)) + int(r.get("http_errors", 0)) for r in workers)
    lines.append(f"| errors (tunnels + HTTP, all runs) | | | | {errors} |")
    lines += [
        "",
        "| connect-to-first-byte | same node | cross-node | cross − same |",
        "|---|---|---|---|",
    ]
    for label, key in (("p50 ms", "p50_ms"), ("p99 ms", "p99_ms")):
        same, cross = col(latency, key, where="same"), col(latency, key, where="cross")
        extra = (
            f"{statistics.median(cross) - statistics.median(same):+.2f} ms"
            if same and cross
            else ""
        )
        lines.append(
            f"| {label} | {_spread(same, '{:.2f}')} | {_spread(cross, '{:.2f}')} | {extra} |"
        )
    lines += [
        "",
        "| Redis, per | ops | bytes in (to Redis) | bytes out (from Redis) |",
        "|---|---|---|---|",
    ]
    for label, part, key_prefix, match in (
        ("new tunnel, same node", latency, "", {"where": "same"}),
        ("new tunnel, cross-node", latency, "", {"where": "cross"}),
        ("HTTP request (2 workers, weighted)", workers, "http_", {"variant": "2"}),
        ("idle listener per minute", idle, "", {}),
    ):
        redis_cells = [
            _spread(
                col(part, f"{key_prefix}{k}", **match), "{:.2f}" if k == "redis_ops" else "{:,.0f}"
            )
            for k in ("redis_ops", "redis_in_bytes", "redis_out_bytes")
        ]
        lines.append(f"| {label} | " + " | ".join(redis_cells) + " |")
    if idle:
        lines.append(
            f"| (a node, idle, per minute) | {_spread(col(idle, 'node_ops_per_min'))} | | |"
        )
    lines += ["", *_goals(workers, latency, idle)]
    return "\n".join(lines) + "\n"


def _goals(
    workers: list[dict[str, Any]], latency: list[dict[str, Any]], idle: list[dict[str, Any]]
) -> list[str]:
    out = []

    def median(part: list[dict[str, Any]], key: str, **match: Any) -> float | None:
        values = [r[key] for r in part if key in r and all(r.get(k) == v for k, v in match.items())]
        return statistics.median(values) if values else None

    one = median(workers, "http_req_per_s", variant="1")
    for variant, _, spread in VARIANTS[1:]:
        two = median(workers, "http_req_per_s", variant=variant)
        if one and two:
            ok = two >= 1.6 * one
            out.append(
                f"- 2 workers ({spread}) >= 1.6x one worker's HTTP req/s: {two / one:.2f}x "
                f"({'met' if ok else 'NOT met'})"
            )
    same, cross = median(latency, "p50_ms", where="same"), median(latency, "p50_ms", where="cross")
    if same is not None and cross is not None:
        ok = cross - same <= 1.0
        out.append(
            f"- cross-node adds <= 1 ms p50: {cross - same:+.2f} ms ({'met' if ok else 'NOT met'})"
        )
    ops = median(idle, "redis_ops")
    if ops is not None:
        out.append(
            f"- an idle listener <= 2 Redis ops/min: {ops:.2f} ({'met' if ops <= 2 else 'NOT met'})"
        )
    return out
