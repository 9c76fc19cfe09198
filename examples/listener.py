"""A listener: accepts connections on a hybrid connection and echoes what each sender sends.

    export HYBRIDRELAY_CONNECTION_STRING="Endpoint=ws://127.0.0.1:9400/;SharedAccessKeyName=...;SharedAccessKey=..."
    python3 examples/listener.py demo        # then: python3 examples/sender.py demo hello

The connection string's rule needs the Listen right (relay-local.yaml's comments print one).
It prints ``listening on demo`` once the relay has it online, and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from hybridrelay import HybridConnectionListener, HybridConnectionStream


async def echo(stream: HybridConnectionStream) -> None:
    """Send back everything the sender sends, until it half-closes; then close our side."""
    async with stream:
        while data := await stream.read():
            await stream.write(data)
        await stream.write_eof()


async def main(entity: str) -> None:
    # Ctrl-C or SIGTERM (systemd, docker stop) stop it: the listener closes cleanly.
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    listener = HybridConnectionListener.from_connection_string(
        os.environ["HYBRIDRELAY_CONNECTION_STRING"], entity
    )
    tasks: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        async for stream in listener:  # ends when the listener closes
            task = asyncio.create_task(echo(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async with listener:  # open() returns once the relay has the listener online
        sys.stdout.write(f"listening on {listener.entity_path}\n")
        sys.stdout.flush()  # the line a supervisor (or a test) waits for
        accepting = asyncio.create_task(accept())
        await stop.wait()
        accepting.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "demo"))
