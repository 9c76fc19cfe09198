"""An HTTP handler: answers the HTTP requests that the relay passes to a hybrid connection.

    export HYBRIDRELAY_CONNECTION_STRING="Endpoint=ws://127.0.0.1:9400/;SharedAccessKeyName=...;SharedAccessKey=..."
    python3 examples/http_handler.py demo
    curl -H "Authorization: $(hybridrelay token -e demo)" http://127.0.0.1:9400/demo/hello

(``hybridrelay token`` reads the same environment variable; a hybrid connection with
``requires_client_authorization: false`` takes requests without a token.) Every request is
answered with its method, path and body length as plain text. It prints ``listening on demo``
once online and runs until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from hybridrelay import HybridConnectionListener, RelayedHttpContext


async def handle(request: RelayedHttpContext) -> None:
    body = await request.read()
    text = f"{request.method} {request.path} ({len(body)} bytes)\n"
    await request.respond(200, headers={"Content-Type": "text/plain; charset=utf-8"})
    await request.write(text.encode())
    # The SDK finishes the response when the handler returns.


async def main(entity: str) -> None:
    # Ctrl-C or SIGTERM (systemd, docker stop) stop it: the listener closes cleanly.
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    listener = HybridConnectionListener.from_connection_string(
        os.environ["HYBRIDRELAY_CONNECTION_STRING"],
        entity,
        request_handler=handle,
        accept_handler=lambda context: False,  # WebSocket senders: rejected, 400
    )
    async with listener:
        sys.stdout.write(f"listening on {listener.entity_path}\n")
        sys.stdout.flush()
        # Each request runs `handle` in a task of the listener's own: nothing to do but wait.
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "demo"))
