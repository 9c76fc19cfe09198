"""A sender: connects to a hybrid connection, sends a message and prints the answer.

    export HYBRIDRELAY_CONNECTION_STRING="Endpoint=ws://127.0.0.1:9400/;SharedAccessKeyName=...;SharedAccessKey=..."
    python3 examples/sender.py demo "hello"     # with examples/listener.py running: prints hello

The connection string's rule needs the Send right (or the hybrid connection takes anonymous
senders). It half-closes after sending, prints everything the listener sends until it closes
too, and exits 0; a refusal (no listener, bad key) exits 1 with the reason.
"""

from __future__ import annotations

import asyncio
import os
import sys

from hybridrelay import HybridConnectionClient, RelayError

#: Every network wait of this sample is bounded.
TIMEOUT = 30.0


async def main(entity: str, message: str) -> int:
    client = HybridConnectionClient.from_connection_string(
        os.environ["HYBRIDRELAY_CONNECTION_STRING"], entity, connect_timeout=TIMEOUT
    )
    async with client:
        try:
            stream = await client.create_connection()
        except RelayError as exc:
            sys.stderr.write(f"sender: {entity}: {exc}\n")
            return 1
        async with stream, asyncio.timeout(TIMEOUT):
            await stream.write(message.encode())
            await stream.write_eof()  # half-close: the listener sees the end of our data
            answer = bytearray()
            while data := await stream.read():
                answer += data
    sys.stdout.write(answer.decode(errors="replace") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(
        asyncio.run(
            main(
                sys.argv[1] if len(sys.argv) > 1 else "demo",
                sys.argv[2] if len(sys.argv) > 2 else "hello",
            )
        )
    )
