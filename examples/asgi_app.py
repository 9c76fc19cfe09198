"""An ASGI application served through a hybrid connection, with no framework.

    export HYBRIDRELAY_CONNECTION_STRING="Endpoint=ws://127.0.0.1:9400/;SharedAccessKeyName=...;SharedAccessKey=..."
    hybridrelay serve-app asgi_app:app --app-dir examples -e app
    curl -H "Authorization: $(hybridrelay token -e app)" http://127.0.0.1:9400/app/hello

Any ASGI application works the same way (FastAPI, Starlette, Quart: ``module:app``). It answers
``hello from asgi_app`` with the method and the path it was asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return  # no lifespan work to do: returning tells the server so
    body = f"hello from asgi_app: {scope['method']} {scope['path']}\n".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": body})
