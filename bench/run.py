"""The benchmark suite: ``python -m bench [--quick | --full] [--only SCENARIO ...]``.

Each path (:mod:`bench.topologies`) is started once, warmed up (``path_warmup`` seconds of
the connection-rate load, unmeasured: a JIT such as wstunnel's V8 sets up connections 1.6x
faster once warm, and our processes fill their pools), and kept for every run; in each run
(``--runs``, medians reported) every path in turn has every scenario it supports measured by a
fresh :mod:`bench.loadgen` process. Scenario (4) gets fresh processes. Everything is stopped by
PID. CPU of every process is
sampled at the load generator's window marks (``/proc/PID/stat``); memory is VmRSS and Pss
from ``/proc``. Results go to ``bench/results/<stamp>/`` (``results.json``, ``table.md`` and,
when matplotlib is installed, ``bench.png``); the table is also printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cluster import CLUSTER_PROFILES, render_cluster, run_cluster
from bench.common import raise_nofile
from bench.httpload import WRK_MISSING, parse_wrk, wrk_argv, wrk_path
from bench.procs import CpuSample, Proc, ProcGroup
from bench.report import render_plot, render_table
from bench.topologies import (
    ALL_TOPOLOGIES,
    DEFAULT_TOPOLOGIES,
    MODES,
    CpuLayout,
    Topology,
    available,
    start_topology,
)

__all__ = ["SCENARIOS", "main"]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

#: Scenario -> load generator modes it runs.
SCENARIOS: dict[str, list[str]] = {
    "throughput": ["down", "up"],  # (1), and (7) relay CPU per GB
    "latency": ["lat"],  # (2)
    "rr": ["rr"],  # (3)
    "idle": ["idle"],  # (4)
    "connrate": ["connrate"],  # (5)
    "http": ["http"],  # (6) wrk: HTTP GETs, direct vs through relay + bridge -H
    "cluster": [],  # (8) bench/cluster.py: workers, cross-node latency, Redis costs
}

#: How many file descriptors a tunneled connection costs the relay (sender + rendezvous WS).
_RELAY_FDS_PER_TUNNEL = 2


@dataclass(frozen=True)
class Profile:
    runs: int
    duration: float
    warmup: float
    lat_count: int
    idle_count: int
    peer_idle_count: int
    rr_conns: int = 100
    connrate_workers: int = 50
    #: Seconds of connection-rate load on a path before its first measurement.
    path_warmup: float = 2.0
    #: Scenario (6): wrk connections, measured seconds (whole seconds: wrk's -d), warm-up.
    http_conns: int = 50
    http_seconds: int = 2
    http_warmup: bool = True  # a 1 s wrk run first (warms the bridge's upstream pool)


PROFILES = {
    "quick": Profile(
        runs=1,
        duration=0.6,
        warmup=0.2,
        lat_count=100,
        idle_count=300,
        peer_idle_count=300,
        http_seconds=1,
        http_warmup=False,
        path_warmup=1.0,
    ),
    "default": Profile(
        runs=3,
        duration=1.0,
        warmup=0.2,
        lat_count=200,
        idle_count=1000,
        peer_idle_count=1000,
        # Both keep the run under 3 minutes with 7 paths: the warm-up made no difference
        # (4,422 vs 4,402 req/s), nor did 1 s of wrk against 2 s (medians of 3 back to back,
        # `--only http --topology direct --topology hybridrelay`: 5,885 vs 5,723 req/s).
        http_seconds=1,
        http_warmup=False,
    ),
    "full": Profile(
        runs=5,
        duration=3.0,
        warmup=0.5,
        lat_count=500,
        idle_count=10000,
        peer_idle_count=1000,
        http_seconds=5,
        path_warmup=3.0,
    ),
}


class Sampler:
    """Samples CPU of a set of processes when the load generator marks its window."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.start: dict[str, CpuSample] = {}
        self.end: dict[str, CpuSample] = {}
        self.lock = threading.Lock()

    def on_line(self, line: str) -> None:
        if line == "MARK start":
            samples = {name: p.cpu() for name, p in self.procs.items()}
            with self.lock:
                self.start = samples
        elif line == "MARK end":
            samples = {name: p.cpu() for name, p in self.procs.items()}
            with self.lock:
                self.end = samples

    def percents(self) -> dict[str, float]:
        with self.lock:
            return {
                f"cpu_{name}": self.end[name].percent_since(self.start[name])
                for name in self.procs
                if name in self.start and name in self.end
            }


def _loadgen_argv(topo: Topology, mode: str, prof: Profile, extra: list[str]) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        mode,
        "--port",
        str(topo.port),
        "--duration",
        str(prof.duration),
        "--warmup",
        str(prof.warmup),
        *extra,
    ]
    if topo.ws_path is not None:
        argv += ["--ws", topo.ws_path]
    return argv


def run_loadgen(
    procs: ProcGroup,
    topo: Topology,
    watched: dict[str, Proc],
    mode: str,
    prof: Profile,
    extra: list[str],
    cpus: CpuLayout,
    timeout: float,
) -> dict[str, Any]:
    sampler = Sampler(watched)
    m = procs.result_line(
        f"loadgen-{mode}",
        _loadgen_argv(topo, mode, prof, extra),
        r"^RESULT (.*)$",
        timeout,
        cpus=cpus.loadgen,
        on_line=sampler.on_line,
        env={"PYTHONPATH": str(REPO)},
    )
    result: dict[str, Any] = json.loads(m.group(1))
    result.update(sampler.percents())
    return result


def run_wrk(
    procs: ProcGroup,
    topo: Topology,
    watched: dict[str, Proc],
    prof: Profile,
    cpus: CpuLayout,
) -> dict[str, Any]:
    """Scenario (6): an optional 1 s wrk warm-up, then the measured wrk run (CPU sampled)."""
    assert topo.http_url is not None

    def wrk(seconds: int) -> str:
        argv = wrk_argv(
            topo.http_url or "",
            seconds=seconds,
            connections=prof.http_conns,
            headers=topo.http_headers,
        )
        proc = procs.start("wrk", argv, cpus=cpus.loadgen)
        try:
            proc.wait_line(r"^Transfer/sec", timeout=seconds + 30)  # wrk's last line
            proc.wait(timeout=10)
        finally:
            proc.stop()
            procs.procs.remove(proc)
        return "\n".join(proc.output)

    if prof.http_warmup:
        wrk(1)
    before = {name: p.cpu() for name, p in watched.items()}
    text = wrk(prof.http_seconds)
    after = {name: p.cpu() for name, p in watched.items()}
    result = parse_wrk(text)
    for name in watched:
        result[f"cpu_{name}"] = after[name].percent_since(before[name])
    result["conns"] = prof.http_conns
    if result["non_2xx"] or not result.get("requests"):
        result["error"] = f"{result['non_2xx']} non-2xx answers of {result.get('requests')}"
    return result


def run_idle(
    procs: ProcGroup,
    topo: Topology,
    watched: dict[str, Proc],
    prof: Profile,
    count: int,
    cpus: CpuLayout,
) -> dict[str, Any]:
    before = {name: p.mem_kib() for name, p in watched.items()}
    argv = _loadgen_argv(topo, "idle", prof, ["--count", str(count), "--conns", "200"])
    proc = procs.start(
        "loadgen-idle", argv, cpus=cpus.loadgen, stdin=True, env={"PYTHONPATH": str(REPO)}
    )
    try:
        m = proc.wait_line(r"^OPEN (.*)$", timeout=max(90.0, count / 50))
        opened = json.loads(m.group(1))
        time.sleep(1.0)  # let buffers settle
        after = {name: p.mem_kib() for name, p in watched.items()}
        proc.send_line("close")
        m = proc.wait_line(r"^RESULT (.*)$", timeout=60)
        result: dict[str, Any] = json.loads(m.group(1))
    finally:
        proc.stop()
        procs.procs.remove(proc)
    n = max(1, int(opened["open"]))
    result["requested"] = count
    for name in watched:
        result[f"rss_kib_{name}_before"] = before[name][0]
        result[f"rss_kib_{name}_after"] = after[name][0]
        result[f"rss_kib_per_conn_{name}"] = (after[name][0] - before[name][0]) / n
        result[f"pss_kib_per_conn_{name}"] = (after[name][1] - before[name][1]) / n
    return result


def _log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class RunningPath:
    """A path's processes, started once and measured in every run."""

    name: str
    procs: ProcGroup
    topo: Topology
    dest: Proc
    watched: dict[str, Proc]


@contextlib.contextmanager
def running_path(
    name: str,
    scenarios: list[str],
    prof: Profile,
    cpus: CpuLayout,
    workdir: Path,
    records: list[dict[str, Any]],
    *,
    warm: bool = True,
) -> Iterator[RunningPath | None]:
    """Start path ``name`` (and its destination); None, with an error record, if it cannot
    start. With ``warm``, it first carries ``prof.path_warmup`` s of connection-rate load."""
    with ProcGroup() as procs:
        dest = procs.start(
            "dest",
            [sys.executable, "-m", "bench.dest"],
            cpus=cpus.dest,
            env={"PYTHONPATH": str(REPO)},
        )
        dport = int(dest.wait_line(r"dest listening on 127\.0\.0\.1:(\d+)").group(1))
        httpdest: Proc | None = None
        hport: int | None = None
        if "http" in scenarios and "http" in MODES[name]:
            httpdest = procs.start(
                "httpdest",
                [sys.executable, "-m", "bench.httpdest"],
                cpus=cpus.dest,
                env={"PYTHONPATH": str(REPO)},
            )
            pattern = r"httpdest listening on 127\.0\.0\.1:(\d+)"
            hport = int(httpdest.wait_line(pattern).group(1))
        try:
            topo = start_topology(name, procs, dport, workdir, cpus, http_port=hport)
        except (OSError, TimeoutError, ValueError) as exc:
            _log(f"{name}: could not start: {exc}")
            records.append({"topology": name, "mode": "start", "run": 0, "error": str(exc)})
            yield None
            return
        watched = {**topo.roles, "dest": dest}
        if httpdest is not None:
            watched["httpdest"] = httpdest
        if warm and prof.path_warmup > 0 and "connrate" in topo.modes:
            t0 = time.monotonic()
            warmup = Profile(**{**prof.__dict__, "duration": prof.path_warmup, "warmup": 0.0})
            try:
                result = _measure(procs, topo, dest, watched, "connrate", warmup, cpus, 0)
            except (OSError, TimeoutError, ValueError) as exc:
                result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            took = time.monotonic() - t0
            _log(f"{name:16} warm-up   {_brief(result)} ({took:.1f} s, not recorded)")
        yield RunningPath(name, procs, topo, dest, watched)
        # Health: did the path's processes survive?
        for role, proc in topo.roles.items():
            if proc.popen.poll() is not None:
                _log(f"WARNING: {name}/{role} exited with {proc.popen.returncode}")


def measure_path(
    path: RunningPath,
    scenarios: list[str],
    prof: Profile,
    cpus: CpuLayout,
    run_index: int,
    idle_count: int,
) -> list[dict[str, Any]]:
    """One run of ``scenarios`` on a running path."""
    records: list[dict[str, Any]] = []
    topo = path.topo
    for scenario in scenarios:
        for mode in SCENARIOS[scenario]:
            if mode not in topo.modes:
                continue
            t0 = time.monotonic()
            try:
                result = _measure(
                    path.procs, topo, path.dest, path.watched, mode, prof, cpus, idle_count
                )
            except (OSError, TimeoutError, ValueError) as exc:
                result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            result.update(
                topology=path.name, scenario=scenario, mode=mode, run=run_index, note=topo.note
            )
            records.append(result)
            took = time.monotonic() - t0
            _log(f"run {run_index} {path.name:16} {mode:9} {_brief(result)} ({took:.1f} s)")
    return records


def _measure(
    procs: ProcGroup,
    topo: Topology,
    dest: Proc,
    watched: dict[str, Proc],
    mode: str,
    prof: Profile,
    cpus: CpuLayout,
    idle_count: int,
) -> dict[str, Any]:
    if mode == "idle":
        return run_idle(procs, topo, topo.roles or {"dest": dest}, prof, idle_count, cpus)
    if mode == "http":
        return run_wrk(procs, topo, watched, prof, cpus)
    extra = {
        # websockify forks a process per connection (~60 ms each here): 50 of them, not 200.
        "lat": [
            "--count",
            str(min(prof.lat_count, 50) if topo.name == "websockify" else prof.lat_count),
        ],
        "rr": ["--conns", str(prof.rr_conns), "--size", "1024"],
        "connrate": ["--conns", str(prof.connrate_workers)],
    }.get(mode, [])
    timeout = prof.warmup + prof.duration + 90
    return run_loadgen(procs, topo, watched, mode, prof, extra, cpus, timeout)


def _brief(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    for key, unit in (
        ("MBps", "MB/s"),
        ("req_per_s", "req/s"),
        ("rt_per_s", "RT/s"),
        ("conns_per_s", "conn/s"),
        ("p50_ms", "ms p50"),
    ):
        if key in r:
            return f"{r[key]:,.1f} {unit}"
    per = {k: v for k, v in r.items() if k.startswith("rss_kib_per_conn_")}
    return f"{r.get('open')} open; " + ", ".join(f"{k[17:]} {v:.1f} KiB" for k, v in per.items())


#: (path, scenario) measured in the first run only: websockify forks a process per connection,
#: so opening the 100 connections of scenario (3) takes it ~8 s a run (its median is then one
#: run's value; it is at 0.3-0.4x our round trips, far from any comparison it could flip).
FIRST_RUN_ONLY = {("websockify", "rr")}


def _idle_count_for(name: str, idle_count: int, prof: Profile) -> int:
    if name.startswith("hybridrelay") or name == "direct":
        return idle_count
    if name == "websockify":  # forks a process per connection, ~10 connections/s here
        return min(idle_count, 100)
    return min(idle_count, prof.peer_idle_count)


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpu": cpu,
        "ncpu": str(len(__import__("os").sched_getaffinity(0))),
    }
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        info["commit"] = rev + (" + uncommitted src changes" if dirty else "")
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 run, short windows (~1 min)")
    size.add_argument("--full", action="store_true", help="5 runs, 3 s windows, 10,000 idle")
    parser.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="scenario(s) to run"
    )
    parser.add_argument(
        "--topology", action="append", choices=ALL_TOPOLOGIES, help="path(s) to run"
    )
    parser.add_argument("--runs", type=int, help="override the profile's number of runs")
    parser.add_argument("--idle-count", type=int, help="override the idle connection count")
    parser.add_argument("--out", type=Path, help="results directory")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes (taskset)")
    parser.add_argument(
        "--cluster-profile",
        choices=sorted(CLUSTER_PROFILES),
        help="scenario cluster's sizes (default: the profile's name; smoke: seconds, for tests)",
    )
    args = parser.parse_args(argv)

    prof = PROFILES["quick" if args.quick else "full" if args.full else "default"]
    if args.runs:
        prof = Profile(**{**prof.__dict__, "runs": args.runs})
    scenarios = args.only or list(SCENARIOS)
    skipped: dict[str, str] = {}
    cluster = "cluster" in scenarios  # its own processes and table (bench/cluster.py)
    scenarios = [s for s in scenarios if s != "cluster"]
    if "http" in scenarios and wrk_path() is None:
        scenarios = [s for s in scenarios if s != "http"]
        skipped["(6) HTTP relaying"] = WRK_MISSING
        _log(f"skipping scenario http: {WRK_MISSING}")
    topologies = args.topology or DEFAULT_TOPOLOGIES
    cpus = CpuLayout(None, None, None, None, None, None) if args.no_pin else CpuLayout()
    nofile = raise_nofile()
    # The relay holds two sockets per tunneled connection: the open-files limit caps the count.
    cap = (nofile - 100) // _RELAY_FDS_PER_TUNNEL
    idle_count = min(args.idle_count or prof.idle_count, cap)
    if idle_count < (args.idle_count or prof.idle_count):
        _log(f"idle connections capped at {idle_count} by the open-files limit ({nofile})")
    runnable = []
    for name in topologies:
        why = available(name)
        if why:
            skipped[name] = why
            _log(f"skipping {name}: {why}")
        else:
            runnable.append(name)

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or BENCH_DIR / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    plain = [s for s in scenarios if s != "idle"]
    with tempfile.TemporaryDirectory(prefix="hybridrelay-bench-") as tmp:
        if plain:
            with contextlib.ExitStack() as paths:
                running: dict[str, RunningPath | None] = {}
                for run_index in range(prof.runs):
                    for name in runnable:
                        wanted = [
                            s for s in plain if run_index == 0 or (name, s) not in FIRST_RUN_ONLY
                        ]
                        if not wanted:
                            continue
                        if name not in running:
                            running[name] = paths.enter_context(
                                running_path(name, plain, prof, cpus, Path(tmp), records)
                            )
                        path = running[name]
                        if path is not None:
                            records += measure_path(path, wanted, prof, cpus, run_index, idle_count)
                        (out / "partial.json").write_text(json.dumps(records))
        if "idle" in scenarios:  # one fresh set of processes per path, first run only
            for name in runnable:
                count = (
                    idle_count
                    if name.startswith("hybridrelay") or name == "direct"
                    else min(idle_count, prof.peer_idle_count)
                )
                with running_path(
                    name, ["idle"], prof, cpus, Path(tmp), records, warm=False
                ) as fresh:
                    if fresh is not None:
                        records += measure_path(fresh, ["idle"], prof, cpus, 0, count)
        if cluster:
            name = args.cluster_profile or (
                "quick" if args.quick else "full" if args.full else "default"
            )
            try:
                records += run_cluster(Path(tmp), CLUSTER_PROFILES[name], _log)
            except FileNotFoundError as exc:
                skipped["(8) cluster"] = str(exc)
                _log(f"skipping scenario cluster: {exc}")
    elapsed = time.monotonic() - started
    meta = {
        "machine": machine_info(),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "profile": prof.__dict__,
        "elapsed_s": elapsed,
        "skipped": skipped,
        "cpu_layout": cpus.__dict__,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (out / "partial.json").unlink(missing_ok=True)
    table = render_table(records, meta) + render_cluster(records)
    (out / "table.md").write_text(table)
    print(table)
    if not args.no_plot:
        plot = render_plot(records, out / "bench.png")
        _log(plot)
    _log(f"done in {elapsed:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
