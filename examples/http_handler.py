"""An HTTP handler: answers the HTTP requests that the relay passes to a hybrid connection.

    export HYBRIDRELAY_CONNECTION_STRING="Endpoint=ws://127.0.0.1:9400/;SharedAccessKeyName=...;SharedAccessKey=..."
    python3 examples/http_handler.py demo
    curl -H "Authorization: $(hybridrelay token -e demo)" http://127.0.0.1:9400/demo/hello

(``hybridrelay token`` reads the same environment variable; a hybrid connection with
``requires_client_authorization: false`` takes requests without a token.) Every request is
answered with its method, path and body length as plain text. It prints ``listening on demo``
once online and runs until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import sys

from hybridrelay import HybridConnectionListener, RelayedHttpContext


async def handle(request: RelayedHttpContext) -> None:
    body = await request.read()
    text = f"{request.method} {request.path} ({len(body)} bytes)\n"
    await request.respond(200, headers={"Content-Type": "text/plain; charset=utf-8"})
    await request.write(text.encode())
    # The SDK finishes the response when the handler returns.


async def main(entity: str) -> None:
    listener = HybridConnectionListener.from_connection_string(
        os.environ["HYBRIDRELAY_CONNECTION_STRING"], entity, request_handler=handle
    )
    async with listener:
        sys.stdout.write(f"listening on {listener.entity_path}\n")
        sys.stdout.flush()
        # WebSocket senders are not served here: close any that come, until the listener stops.
        async for stream in listener:
            await stream.aclose()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "demo"))
    except KeyboardInterrupt:
        pass
