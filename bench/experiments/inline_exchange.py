"""CPU per inline HTTP exchange in the relay, in one process: the relay's part alone.

``python -m bench.experiments.inline_exchange [--rounds 5] [--requests 10000] [--runs 6]
[--tree DIR ...]``

A :class:`~hybridrelay.server.app.RelayServer` is started (port 0), a fake listener's control
channel registered with its broker, and 50 fake senders (the front's ``InlineSender``) relayed
by :meth:`HttpRelay.relay_inline` per turn of a uvloop loop: the ``request`` message written to
the fake channel, the listener's ``response`` (one header) and body parsed and routed as the
control channel does (``parse_message``, ``on_control_message``, ``on_control_binary``), the
answer written to the fake sender in the next callback, the metrics counted. No sockets, no
frames, no HTTP parsing, the access log off (its level): what is left is the inline exchange,
which the saturated relay's CPU per request (``http_floor``: ±30 % between runs on the shared
machine) cannot resolve. Prints CPU microseconds per request: the median and the minimum of
the rounds of each run (the minimum is the steadier one on a shared machine).

``--tree DIR`` (repeatable) runs the measurement from ``DIR/src`` in a child process,
alternating the trees run by run (ABBA), then the median of each tree's minima.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]
_IN_FLIGHT = 50
_RESPONSE = (
    '{"response":{"requestId":"%s","statusCode":200,"statusDescription":"OK",'
    '"responseHeaders":{"Content-Type":"text/plain"},"body":true}}'
)


class FakeControlSocket:
    """A control channel's socket that keeps what is written."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    @property
    def write_paused(self) -> bool:
        return False

    def write_message(self, text: str, body: bytes | None = None) -> None:
        self.sent.append(text)

    async def drain(self) -> None:
        return None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        return None

    def abort(self) -> None:
        return None


class _Sender:
    """The front's request as ``relay_inline`` sees it (``InlineSender``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.method = "GET"
        self.host = "127.0.0.1:8080"
        from hybridrelay.protocol.messages import RemoteEndpoint

        self.peer = ("127.0.0.1", 5555)  # what trees before the front's remote_endpoint read
        self.remote_endpoint: RemoteEndpoint | None = RemoteEndpoint("127.0.0.1", 5555)
        self.remote: str | None = "127.0.0.1"
        self.content_length: int | None = None
        self.gone: asyncio.Future[None] = loop.create_future()
        self.answers = 0

    def answer(self, response: Any) -> int:
        self.answers += 1
        return 0

    def answer_head(self, head: Any, body: bytes) -> int:
        self.answers += 1
        return len(body)

    def sink(self, head: Any) -> Any:
        raise AssertionError("no response streams here")

    def done(self) -> None:
        return None


async def _measure(rounds: int, requests: int) -> list[float]:

    from hybridrelay.server.app import RelayServer
    from hybridrelay.server.channel import ControlChannel
    from hybridrelay.server.config import RelayConfig
    from hybridrelay.server.http_upgrade import sender_entity

    config = RelayConfig.from_dict(
        {
            "server": {"host": "127.0.0.1", "port": 0, "plaintext": True},
            "namespace": {
                "authorization_rules": [
                    {"name": "k", "primary_key": "a" * 44, "rights": ["Listen", "Send"]}
                ],
                "hybrid_connections": [{"name": "hc", "requires_client_authorization": False}],
            },
        }
    )
    async with RelayServer(config) as server:
        loop = asyncio.get_running_loop()
        http = server.http
        resolved = sender_entity("/hc/x", server._context)
        assert isinstance(resolved, tuple)
        entity = resolved[0]
        socket = FakeControlSocket()
        channel = ControlChannel(
            "hc", "L1", socket, time.time() + 3600, "127.0.0.1", "ws://127.0.0.1:1"
        )
        server.broker.register(channel, 10)
        senders = [_Sender(loop) for _ in range(_IN_FLIGHT)]
        headers = {"Host": "127.0.0.1:8080", "User-Agent": "wrk", "Accept": "*/*"}
        per_request: list[float] = []
        for round_ in range(rounds + 1):  # the first round warms up
            started = time.process_time()
            for _ in range(requests // _IN_FLIGHT):
                for sender in senders:
                    http.relay_inline(sender, entity, headers, "/hc/x", b"")
                await answer_all(http, channel, socket)
            if round_:
                per_request.append((time.process_time() - started) / requests * 1e6)
        answered = sum(sender.answers for sender in senders)
        assert answered == (rounds + 1) * (requests // _IN_FLIGHT) * _IN_FLIGHT, answered
        return per_request


async def answer_all(http: Any, channel: Any, socket: FakeControlSocket) -> None:
    """Answer every ``request`` written to ``socket`` as the listener on ``channel`` would
    (a ``response`` with one header, then its body), routed as the control channel routes
    them, and let the answers' callbacks run."""
    from hybridrelay.protocol.messages import parse_message

    sent, socket.sent = socket.sent, []
    for text in sent:
        message = parse_message(_RESPONSE % orjson.loads(text)["request"]["id"])
        assert message is not None
        http.on_control_message(channel, message)
        http.on_control_binary(channel, b"hello world")
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _child(rounds: int, requests: int) -> None:
    import uvloop

    rounds_us = uvloop.run(_measure(rounds, requests))
    print(f"{statistics.median(rounds_us):.2f} {min(rounds_us):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measurement_arguments(parser)
    args = parser.parse_args()
    if args.child or not args.tree:
        _child(args.rounds, args.requests)
        return
    alternate_trees(
        "bench.experiments.inline_exchange",
        args.tree,
        args.runs,
        ["--rounds", str(args.rounds), "--requests", str(args.requests)],
    )


def add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an in-process measurement that alternates trees (:func:`alternate_trees`)."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=10_000, help="per round")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--tree", action="append", help="measure DIR/src (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def alternate_trees(module: str, trees: list[str], runs: int, options: list[str]) -> None:
    """Run ``module --child options`` from each tree's ``src``, the trees alternated run by run
    (ABBA), each child printing its median and minimum; then each tree's median of minima."""
    minima: dict[str, list[float]] = {tree: [] for tree in trees}
    for run in range(runs):
        for tree in trees if run % 2 == 0 else list(reversed(trees)):
            env = {**os.environ, "PYTHONPATH": f"{Path(tree) / 'src'}{os.pathsep}{REPO}"}
            out = subprocess.run(
                [sys.executable, "-m", module, "--child", *options],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            ).stdout.split()
            minima[tree].append(float(out[-1]))
            print(f"run {run + 1} {tree}: median {out[-2]} min {out[-1]} CPU-us per request")
    for tree, values in minima.items():
        print(
            f"{tree}: median of minima {statistics.median(values):.2f} CPU-us per request "
            f"({', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
