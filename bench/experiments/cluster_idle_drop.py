"""Diagnosis of the cluster scenario's "idle listener" row (docs/PERFORMANCE.md, "Found
2026-12-04"): its ``measure_nodes`` part alone, every process's output kept.

``PYTHONPATH=$PWD/src python -m bench.experiments.cluster_idle_drop OUT [--profile default]``

Runs :func:`bench.cluster.measure_nodes` (two single-worker nodes, the ``-R`` agent on node A,
the latency chunks, then the idle listeners' windows) as ``python -m bench --only cluster``
does in its last run, with the relays and the agent at ``--log-level debug`` through
``keepalive_trace_wrapper.py`` (each relay control channel's last reads and keep-alive ticks
logged when it is dropped or ends). Each process's output goes to ``OUT/<name>.log``, each line
prefixed with the wall-clock time it was read; the records are printed, then the lines about
dropped control channels.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import IO, Any

import bench.procs as procs_module
from bench import cluster

WRAPPER = Path(__file__).resolve().with_name("keepalive_trace_wrapper.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for the processes' logs")
    parser.add_argument("--profile", default="default", choices=sorted(cluster.CLUSTER_PROFILES))
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_HYBRIDRELAY"] = str(WRAPPER)
    files: list[IO[str]] = []
    start = procs_module.ProcGroup.start

    def logged_start(
        self: procs_module.ProcGroup, name: str, argv: Any, **kwargs: Any
    ) -> procs_module.Proc:
        log = (out / f"{name}.log").open("a", buffering=1)
        files.append(log)
        previous = kwargs.get("on_line")

        def on_line(line: str) -> None:
            log.write(f"{time.time():.3f} {line}\n")
            if previous is not None:
                previous(line)

        kwargs["on_line"] = on_line
        return start(self, name, argv, **kwargs)

    procs_module.ProcGroup.start = logged_start  # type: ignore[method-assign]
    prof = cluster.CLUSTER_PROFILES[args.profile]
    try:
        with procs_module.ProcGroup() as procs:
            _, redis_port = cluster.start_redis(procs, out)
            dest, dest_port, http, http_port = cluster._destinations(procs)
            bed = cluster.Bed(
                procs, out, dest_port, http_port, redis_port, cluster.RedisMeter(redis_port)
            )
            bed.destinations = {"dest": dest, "httpdest": http}
            for record in cluster.measure_nodes(bed, prof, 0, True):
                print(json.dumps(record))
    finally:
        for log in files:
            log.close()
    for path in sorted(out.glob("relay-*.log")):
        for line in path.read_text().splitlines():
            if "control channel dropped" in line or "KEEPALIVE-TRACE dropped" in line:
                print(f"{path.name}: {line}")


if __name__ == "__main__":
    main()
