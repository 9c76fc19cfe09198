"""``python3 -m bench.reconnect_storm {real,model}``: a node of a cluster dies, its listeners
reconnect (docs/SCALING.md, "The reconnect storm").

* ``real``: N ``hybridrelay serve --cluster`` nodes on a redis-server it starts, M listeners,
  node1 SIGKILLed; prints the storm and the per-accept costs that calibrate the model.
* ``model``: the discrete-event model at internet scale, with and without the SDK's jitter,
  with the endpoint choice of the SDK and the shared-list order it replaced, and with an
  optional server-side accept limit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import sys

from bench.reconnect_storm.model import ModelParams, ModelResult, run_model
from bench.reconnect_storm.real import RealParams, run_real
from bench.reconnect_storm.storm import format_summary

#: CPU-ms per listener control-channel accept with TLS: the model's default, calibrated from
#: ``real --listeners 900 --tls`` on the development machine (1.00-1.20 over four runs; plain
#: 0.41-0.90; docs/SCALING.md)
ACCEPT_MS_TLS = 1.2
#: Redis commands per moved listener, measured the same way (3.01-3.04, one hybrid connection
#: per listener: HSET and SADD on the new node, HDEL of the dead node's route)
REDIS_OPS_PER_ACCEPT = 3.0


def _real(args: argparse.Namespace) -> int:
    if args.redis_url is None and shutil.which("redis-server") is None:
        print("reconnect_storm real: redis-server is not installed (apt-get install redis-server)")
        return 2
    params = RealParams(
        nodes=args.nodes,
        listeners=args.listeners,
        kill=args.kill,
        entities=args.entities,
        tls=args.tls,
        redis_url=args.redis_url,
    )
    # Each listener logs its loss and return: thousands of lines the summary says better.
    logging.getLogger("hybridrelay").setLevel(logging.ERROR)
    result = asyncio.run(run_real(params))
    scheme = "wss" if params.tls else "ws"
    print(
        f"real: {params.nodes} nodes ({scheme}), {params.listeners} listeners on "
        f"{params.entities or params.listeners} hybrid connections; "
        + ("node1" if params.kill == 1 else f"node1..node{params.kill}")
        + " SIGKILLed"
    )
    print(format_summary(result.summary, timeline_buckets=args.buckets))
    print(
        f"  calibration: {result.accept_cpu_ms:.2f} CPU-ms per accepted control channel on the "
        f"survivors; Redis {result.redis_ops_per_moved:.2f} commands and "
        f"{result.redis_bytes_per_moved:,.0f} bytes per moved listener "
        f"(idle: {result.redis_idle_ops_per_node_min:.0f} commands per node per minute); "
        f"node RSS {result.rss_kib_at_start / 1024:.1f} MiB at start, "
        f"{result.rss_kib_per_listener:.1f} KiB per idle listener"
    )
    print("  Redis commands of the storm: " + ", ".join(
        f"{name} {calls}" for name, calls in result.redis_commands.items()
    ))  # fmt: skip
    return 0 if result.summary.full_recovery is not None else 1


def _line(label: str, result: ModelResult) -> str:
    s = result.summary
    recovery = f"{s.full_recovery:.2f}" if s.full_recovery is not None else "never"
    return (
        f"| {label} | {s.peak_per_bucket:,} ({s.peak_per_bucket * 10:,}/s) | {s.max_in_flight:,} "
        f"| {recovery} | {s.attempts_per_listener_mean:.2f} / {s.attempts_per_listener_max} "
        f"| {result.timed_out:,} / {result.refused:,} | {result.busiest_cpu_s:.1f} "
        f"| {result.redis_peak_ops_s:,.0f} |"
    )


def _model(args: argparse.Namespace) -> int:
    base = ModelParams(
        nodes=args.nodes,
        listeners=args.listeners,
        lost=args.lost,
        accept_ms=args.accept_ms,
        cores=args.cores,
        redis_ops_per_accept=args.redis_ops,
        seed=args.seed,
    )
    runs = [
        ("no jitter", dataclasses.replace(base, jitter=0.0)),
        ("SDK: jitter, the other nodes in random order", base),
        (
            "SDK jitter, the next node of one shared list, one a delay (before)",
            dataclasses.replace(base, order="list"),
        ),
    ]
    if args.accept_limit is not None:
        runs.append(
            (
                f"SDK + accept limit {args.accept_limit}",
                dataclasses.replace(base, accept_limit=args.accept_limit),
            )
        )
    print(
        f"model: {base.nodes:,} nodes x {base.cores} core(s), {base.listeners:,} listeners; "
        f"{base.lost} node(s) lost = {base.listeners // base.nodes * base.lost:,} listeners; "
        f"{base.accept_ms} CPU-ms per "
        f"accept, {base.redis_ops_per_accept} Redis commands per accept"
    )
    print(
        "| policy | peak attempts per 100 ms on one node | max in flight on one node "
        "| all back after, s | attempts per listener mean / max | timed out / refused "
        "| busiest node's CPU-s | Redis peak commands/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, params in runs:
        print(_line(label, run_model(params)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.reconnect_storm", description=__doc__)
    sub = parser.add_subparsers(dest="part", required=True)
    real = sub.add_parser("real", help="real nodes, real listeners, one node SIGKILLed")
    real.add_argument("--nodes", type=int, default=3)
    real.add_argument("--listeners", type=int, default=30)
    real.add_argument("--kill", type=int, default=1, help="nodes SIGKILLed at once")
    real.add_argument("--entities", type=int, default=None, help="default: one per listener")
    real.add_argument("--tls", action="store_true", help="wss:// nodes (a trustme CA)")
    real.add_argument("--redis-url", default=None, help="default: start a redis-server")
    real.add_argument("--buckets", type=int, default=15, help="100 ms buckets to print")
    model = sub.add_parser("model", help="the discrete-event model")
    model.add_argument("--nodes", type=int, default=100)
    model.add_argument("--listeners", type=int, default=1_000_000)
    model.add_argument("--lost", type=int, default=1, help="nodes that die at once")
    model.add_argument("--accept-ms", type=float, default=ACCEPT_MS_TLS)
    model.add_argument("--cores", type=int, default=1, help="accepting processes per node")
    model.add_argument("--redis-ops", type=float, default=REDIS_OPS_PER_ACCEPT)
    model.add_argument("--accept-limit", type=int, default=None)
    model.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return _real(args) if args.part == "real" else _model(args)


if __name__ == "__main__":
    sys.exit(main())
