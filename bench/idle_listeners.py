"""``python -m bench.idle_listeners``: hold ``--count`` SDK listeners open on one hybrid
connection (the cluster scenario's idle listeners), print ``OPEN n`` once all are connected,
close them on a line on stdin (or at ``--hold`` seconds)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from hybridrelay.client import HybridConnectionListener, SharedAccessKeyTokenProvider


async def hold(args: argparse.Namespace) -> None:
    provider = SharedAccessKeyTokenProvider(args.key_name, args.key)
    listeners = [
        HybridConnectionListener(args.endpoint, args.entity, provider) for _ in range(args.count)
    ]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(listener.open() for listener in listeners))
        print(f"OPEN {len(listeners)}", flush=True)
        loop = asyncio.get_running_loop()
        with_line = loop.run_in_executor(None, sys.stdin.readline)
        await asyncio.wait([with_line], timeout=args.hold)
    finally:
        await asyncio.gather(*(listener.aclose() for listener in listeners))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_listeners")
    parser.add_argument("--endpoint", required=True, help="ws://host:port of a relay")
    parser.add_argument("--key-name", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--entity", required=True)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--hold", type=float, default=600.0)
    asyncio.run(hold(parser.parse_args()))


if __name__ == "__main__":
    main()
