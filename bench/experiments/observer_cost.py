"""What one relayed HTTP request costs the relay's observer: ``RelayObserver.http_request``
(metrics, access-log line, the error path for a refused request) called in a loop.

``python -m bench.experiments.observer_cost [--calls 50000] [--repeat 10] [--log-format text]
[--log-level info] [--statuses 200]`` prints the best and median CPU µs per call of
``--repeat`` rounds: the process' CPU time, its log writer thread's included (wall time, on a
shared machine, counts the other processes' turns too). Logging is set up as ``hybridrelay
serve`` sets it up (``install_batched_stderr`` with the format, ``configure_logging`` with the
level), its stderr sent to ``/dev/null``: the line is formatted and batched as in the relay,
and the write costs next to nothing.

The code measured is whichever ``hybridrelay`` is first on ``sys.path``: to compare two
revisions run this same file with ``PYTHONPATH=<checkout>/src`` for each (it prints which it
imported), alternating, on the same machine in the same minutes (docs/DECISIONS.md D24).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--statuses",
        default="200",
        help="comma-separated statuses cycled through (e.g. 200,404: every other request "
        "takes the error path)",
    )
    parser.add_argument("--entities", type=int, default=4, help="hybrid connections cycled")
    args = parser.parse_args()

    # stderr to /dev/null before the handler is made: it keeps the stream it was given.
    devnull = open(os.devnull, "w")  # lives as long as the process
    sys.stderr = devnull
    import hybridrelay
    from hybridrelay.cli.logs import configure_logging, install_batched_stderr
    from hybridrelay.server.observer import RelayObserver

    install_batched_stderr(args.log_format)
    configure_logging(args.log_level)
    observer = RelayObserver()
    statuses = [int(s) for s in args.statuses.split(",")]
    entities = [f"tenant-{i}/api" for i in range(args.entities)]
    # Realistic arguments: request ids are 32 hex digits (server/http_relay.tracking_id),
    # the sender's address what aiohttp's request.remote gives.
    calls = [
        (
            f"{i:032x}",
            entities[i % len(entities)],
            statuses[i % len(statuses)],
            0.0005 + (i % 97) * 0.0001,
            (i % 3) * 512 or None,
            13 + i % 7,
        )
        for i in range(1009)
    ]
    http_request = observer.http_request

    def one_round(n: int) -> float:
        started = time.process_time()
        for i in range(n):
            tracking, entity, status, seconds, request_bytes, response_bytes = calls[i % 1009]
            http_request(
                tracking,
                entity,
                method="GET",
                status=status,
                seconds=seconds,
                request_bytes=request_bytes,
                response_bytes=response_bytes,
                remote="127.0.0.1",
            )
        return (time.process_time() - started) / n * 1e6

    one_round(min(args.calls, 20_000))  # warm-up: every label series exists before timing
    rounds = [one_round(args.calls) for _ in range(args.repeat)]
    sys.stdout.write(
        f"{os.path.dirname(hybridrelay.__file__)}: observer.http_request "
        f"log={args.log_format}/{args.log_level} statuses={args.statuses}: "
        f"best {min(rounds):.2f}, median {statistics.median(rounds):.2f} CPU µs per call "
        f"({args.repeat} rounds of {args.calls})\n"
    )


if __name__ == "__main__":
    main()
