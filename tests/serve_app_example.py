"""A small plain ASGI application for ``tests/test_serve_app.py`` (served by a real
``hybridrelay serve-app tests.serve_app_example:app`` process). No framework needed."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["greeting"] = "hello from lifespan"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The test reads this from stdout: the shutdown ran on SIGTERM.
                sys.stdout.write("example app: lifespan shutdown\n")
                sys.stdout.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    # ASGI: path includes root_path (serve-app's default: /{hybrid connection}).
    route = scope["path"][len(scope.get("root_path", "")) :]
    if route == "/echo":
        status, payload = 200, body
    elif route == "/greeting":
        status, payload = 200, scope["state"]["greeting"].encode()
    else:
        status, payload = 404, b"not found"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"x-method", scope["method"].encode()),
                (b"x-path", route.encode()),
                (b"x-query", scope["query_string"]),
                (b"x-scheme", scope["scheme"].encode()),
                (b"x-host", headers.get("host", "").encode()),
                (b"x-sha256", hashlib.sha256(body).hexdigest().encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
