"""Profile the relay, ingress and agent under one load-generator mode with py-spy.

``python -m bench.experiments.profile_path hybridrelay connrate --conns 50`` writes
``bench/results/profile-<path>-<mode>-<role>.txt`` (py-spy raw/collapsed stacks) and prints
the top self and inclusive frames of each. Mode ``http`` (scenario 6) runs wrk (50 keep-alive
connections) through relay + bridge ``-H`` instead of the load generator. ``PROFILE_NATIVE=1``
adds the C frames (py-spy then pauses the process for each sample).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.httpload import wrk_argv
from bench.procs import ProcGroup
from bench.topologies import CpuLayout, start_topology

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench" / "results"


def top(path: Path, n: int = 12) -> None:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for frame in set(frames):
            incl[frame] += k
    print(f"== {path.name} ({total} samples)")
    for frame, k in own.most_common(n):
        print(f"  self {100 * k / max(total, 1):5.1f}% {frame}")
    shown = [f for f in incl.most_common(300) if "hybridrelay/" in f[0] or "aiohttp/" in f[0]]
    for frame, k in shown[:n]:
        print(f"  incl {100 * k / max(total, 1):5.1f}% {frame}")


def main() -> None:
    name, mode, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    OUT.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(REPO)}
    with ProcGroup() as procs, tempfile.TemporaryDirectory() as tmp:
        dest = procs.start("dest", [sys.executable, "-m", "bench.dest"], cpus="0", env=env)
        port = int(dest.wait_line(r":(\d+)$").group(1))
        hport = None
        if mode == "http":
            hdest = procs.start(
                "httpdest", [sys.executable, "-m", "bench.httpdest"], cpus="0", env=env
            )
            hport = int(hdest.wait_line(r":(\d+)$").group(1))
        topo = start_topology(name, procs, port, Path(tmp), CpuLayout(), http_port=hport)
        if mode == "http":
            assert topo.http_url is not None
            argv = wrk_argv(topo.http_url, seconds=8, connections=50, headers=topo.http_headers)
            load = procs.start("wrk", argv, cpus="0")
            topo.roles.pop("ingress", None)
        else:
            argv = [sys.executable, "-m", "bench.loadgen", mode, "--port", str(topo.port)]
            load = procs.start(
                "loadgen", [*argv, "--duration", "8", "--warmup", "1", *extra], cpus="0", env=env
            )
        time.sleep(1.5)
        outs = []
        spies = []
        for role, proc in topo.roles.items():
            out = OUT / f"profile-{name}-{mode}-{role}.txt"
            outs.append(out)
            spies.append(
                subprocess.Popen(
                    ["py-spy", "record", "--pid", str(proc.pid), "--duration", "6"]
                    + ["--rate", "200", "--format", "raw", "-o", str(out)]
                    + (["--native"] if os.environ.get("PROFILE_NATIVE") else ["--nonblocking"]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for spy in spies:
            spy.wait(60)
        if mode == "http":
            load.wait_line(r"^Transfer/sec", timeout=60)
            print("\n".join(load.output))
        else:
            print(load.wait_line(r"^RESULT (.*)$", timeout=60).group(1))
    for out in outs:
        if out.exists():
            top(out)


if __name__ == "__main__":
    main()
