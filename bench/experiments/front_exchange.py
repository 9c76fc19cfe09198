"""CPU per relayed HTTP request in the relay's Python, in one process: front, exchange, log.

``python -m bench.experiments.front_exchange [--rounds 5] [--requests 10000] [--runs 6]
[--tree DIR ...] [--profile]``

Where ``inline_exchange`` measures the inline exchange alone, this one adds what surrounds it
in the relay: a real :class:`~hybridrelay.server.app.RelayServer` (port 0), 50 sender
connections of its HTTP front (``server/sender_http._SenderConnection`` on a transport that
counts writes) each fed a keep-alive client's same ``GET`` with a SAS token, a fake listener's
control channel answering every ``request`` (one header, a body), and the access log on, at
INFO, through the commands' batched handler to ``/dev/null``. What is left out is the kernel
and uvloop: sockets, frames on the control channel, the event loop's reads. Prints CPU
microseconds per request (median and minimum of the rounds of each run). ``--profile`` runs
one tree under cProfile and prints the calls per request and the top functions by own time.

``--tree DIR`` (repeatable) runs ``DIR/src`` in a child process, alternating the trees run by
run (ABBA), then the median of each tree's minima.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.experiments.inline_exchange import (
    FakeControlSocket,
    add_measurement_arguments,
    alternate_trees,
    answer_all,
)

_CONNECTIONS = 50
_KEY = "a" * 44


class _Transport:
    """A sender connection's transport: counts what is written."""

    def __init__(self) -> None:
        self.writes = 0
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.writes += 1

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def _measure(rounds: int, requests: int, profile: bool) -> list[float]:

    from hybridrelay.auth.sas import create_token
    from hybridrelay.server.app import RelayServer
    from hybridrelay.server.channel import ControlChannel
    from hybridrelay.server.config import RelayConfig
    from hybridrelay.server.sender_http import SenderFront, _SenderConnection

    config = RelayConfig.from_dict(
        {
            "server": {"host": "127.0.0.1", "port": 0, "plaintext": True},
            "namespace": {
                "authorization_rules": [
                    {"name": "k", "primary_key": _KEY, "rights": ["Listen", "Send"]}
                ],
                "hybrid_connections": [{"name": "hc"}],
            },
        }
    )
    async with RelayServer(config) as server:
        audience = f"http://127.0.0.1:{server.port}/hc"
        token = create_token(audience, "k", _KEY, expiry=int(time.time()) + 3600)
        head = (
            f"GET /hc/x HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"ServiceBusAuthorization: {token}\r\n\r\n"
        ).encode()
        http = server.http
        socket = FakeControlSocket()
        channel = ControlChannel(
            "hc", "L1", socket, time.time() + 3600, "127.0.0.1", "ws://127.0.0.1:1"
        )
        server.broker.register(channel, 10)
        front = SenderFront(server._context, http, lambda: asyncio.Protocol())
        senders = []
        for _ in range(_CONNECTIONS):
            connection, transport = _SenderConnection(front), _Transport()
            connection.connection_made(transport)  # type: ignore[arg-type]
            senders.append((connection, transport))
        per_request: list[float] = []
        profiler: Any = None
        for round_ in range(rounds + 1):  # the first round warms up
            if round_ == 1 and profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            started = time.process_time()
            for _ in range(requests // _CONNECTIONS):
                for connection, _ in senders:
                    connection.data_received(head)
                await answer_all(http, channel, socket)
            if round_:
                per_request.append((time.process_time() - started) / requests * 1e6)
        if profiler is not None:
            profiler.disable()
            _print_profile(profiler, rounds * requests)
        answered = sum(transport.writes for _, transport in senders)
        assert answered == (rounds + 1) * (requests // _CONNECTIONS) * _CONNECTIONS, answered
        return per_request


def _print_profile(profiler: Any, requests: int) -> None:
    import pstats

    stats: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    calls = sum(row[1] for row in stats.values())
    print(f"calls per request {calls / requests:.1f}")
    for (path, line, name), row in sorted(stats.items(), key=lambda kv: -kv[1][2])[:40]:
        print(
            f"{row[1] / requests:6.2f} calls, own {row[2] / requests * 1e6:5.2f} us "
            f"{name[:40]} {Path(path).name}:{line}"
        )


def _child(rounds: int, requests: int, profile: bool) -> None:
    import uvloop

    from hybridrelay.cli.logs import BatchedStreamHandler, TextFormatter

    # The commands' log set-up (cli/logs.py), written to nowhere.
    handler = BatchedStreamHandler(open(os.devnull, "w"))
    handler.setFormatter(TextFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    rounds_us = uvloop.run(_measure(rounds, requests, profile))
    print(f"{statistics.median(rounds_us):.2f} {min(rounds_us):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measurement_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    args = parser.parse_args()
    if args.child or not args.tree:
        _child(args.rounds, args.requests, args.profile)
        return
    alternate_trees(
        "bench.experiments.front_exchange",
        args.tree,
        args.runs,
        ["--rounds", str(args.rounds), "--requests", str(args.requests)],
    )


if __name__ == "__main__":
    main()
