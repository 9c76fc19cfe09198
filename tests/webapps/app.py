"""The web application of tests/webapps (and bench's web-app scenario): Starlette, served by
``hybridrelay serve-app`` and, behind ``bridge -H``, by uvicorn.

Routes are relative to the app's root path (``/hc`` through the relay). The SSE route is gated:
event ``i + 1`` is only produced once the client said, on another connection, that event ``i``
arrived (``/ack``), so a relay that holds events back until the end never completes it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

#: How long the app waits for the client's ack of an event, or for a stream's end.
WAIT = 20.0
BLOCK = 64 * 1024


def blob_block(index: int) -> bytes:
    """Block ``index`` of the deterministic download (the test hashes the same blocks)."""
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * (BLOCK // 32)


def blob_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for index, start in enumerate(range(0, size, BLOCK)):
        digest.update(blob_block(index)[: size - start])
    return digest.hexdigest()


_acks: dict[tuple[str, int], asyncio.Event] = {}
_ended: dict[str, asyncio.Event] = {}


def _ack_event(stream: str, index: int) -> asyncio.Event:
    if len(_acks) > 10_000:
        _acks.clear()
    return _acks.setdefault((stream, index), asyncio.Event())


def _end_event(stream: str) -> asyncio.Event:
    if len(_ended) > 1_000:
        _ended.clear()
    return _ended.setdefault(stream, asyncio.Event())


async def sse(request: Request) -> Response:
    stream = request.query_params["stream"]
    count = int(request.query_params.get("n", "5"))

    async def events() -> AsyncIterator[bytes]:
        for index in range(count):
            yield f"id: {index}\ndata: event {index}\n\n".encode()
            if index + 1 < count:
                await asyncio.wait_for(_ack_event(stream, index).wait(), WAIT)

    return StreamingResponse(events(), media_type="text/event-stream")


async def ack(request: Request) -> Response:
    _ack_event(request.query_params["stream"], int(request.query_params["i"])).set()
    return PlainTextResponse("ok")


async def forever(request: Request) -> Response:
    """Events until the client goes away; its end is recorded (``/ended``)."""
    stream = request.query_params["stream"]

    async def events() -> AsyncIterator[bytes]:
        index = 0
        try:
            while True:
                yield f"data: tick {index}\n\n".encode()
                index += 1
                await asyncio.sleep(0.05)
        finally:
            _end_event(stream).set()

    return StreamingResponse(events(), media_type="text/event-stream")


async def hold(request: Request) -> Response:
    """No answer until the client goes away (a long poll): its ``http.disconnect`` is
    recorded (``/ended``). The body is read first, as ASGI has it."""
    stream = request.query_params["stream"]
    message = await request.receive()
    _end_event("held " + stream).set()
    while message["type"] != "http.disconnect":
        message = await asyncio.wait_for(request.receive(), WAIT)
    _end_event(stream).set()
    return PlainTextResponse("nobody is listening")


async def held(request: Request) -> Response:
    """200 once ``/hold`` has the request (and holds its answer)."""
    try:
        await asyncio.wait_for(_end_event("held " + request.query_params["stream"]).wait(), WAIT)
    except TimeoutError:
        return PlainTextResponse("not held", status_code=504)
    return PlainTextResponse("held")


async def ended(request: Request) -> Response:
    """200 once the stream's generator was stopped (the client's disconnect reached the app)."""
    try:
        await asyncio.wait_for(_end_event(request.query_params["stream"]).wait(), WAIT)
    except TimeoutError:
        return PlainTextResponse("still running", status_code=504)
    return PlainTextResponse("ended")


async def sha256(request: Request) -> Response:
    """The body's SHA-256, read as it streams; ``parts``: how many http.request messages."""
    digest = hashlib.sha256()
    size = parts = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
        parts += 1 if chunk else 0
    return JSONResponse({"sha256": digest.hexdigest(), "size": size, "parts": parts})


async def blob(request: Request) -> Response:
    size = int(request.query_params["size"])

    async def blocks() -> AsyncIterator[bytes]:
        for index, start in enumerate(range(0, size, BLOCK)):
            yield blob_block(index)[: size - start]

    headers = {"content-length": str(size)} if "length" in request.query_params else None
    return StreamingResponse(blocks(), media_type="application/octet-stream", headers=headers)


async def whole(request: Request) -> Response:
    """A body made whole in memory and answered in one ``Response`` (no streaming): the
    pattern that made serve-app hold memory over TLS (issue 14)."""
    size = int(request.query_params["size"])
    return Response(b"w" * size, media_type="application/octet-stream")


async def cookies(request: Request) -> Response:
    response = PlainTextResponse("three cookies")
    response.set_cookie("first", "1", path="/")
    response.set_cookie("second", "2", expires="Wed, 21 Oct 2037 07:28:00 GMT")
    response.set_cookie("third", "3", httponly=True)
    return response


async def small(request: Request) -> Response:
    return PlainTextResponse("small")


async def redirect(request: Request) -> Response:
    """A root-relative Location, as many apps write it (``-H`` rewrites it)."""
    return RedirectResponse("/small", status_code=302)


async def redirect_url_for(request: Request) -> Response:
    return RedirectResponse(str(request.url_for("small")), status_code=302)


async def links(request: Request) -> Response:
    return JSONResponse(
        {
            "url_for": str(request.url_for("small")),
            "root_path": request.scope.get("root_path", ""),
            "client": request.client.host if request.client else None,
            "forwarded": {
                name: value
                for name, value in request.headers.items()
                if name.startswith("x-forwarded-")
            },
        }
    )


async def etag(request: Request) -> Response:
    tag = '"v1"'
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers={"etag": tag})
    return PlainTextResponse("tagged", headers={"etag": tag})


async def upload(request: Request) -> Response:
    files: dict[str, dict[str, str | int | None]] = {}
    async with request.form() as form:  # closes the spooled files
        for name, value in form.multi_items():
            if isinstance(value, str):
                files[name] = {"text": value}
            else:
                data = await value.read()
                files[name] = {
                    "filename": value.filename,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
    return JSONResponse(files)


#: Subprotocols the echo route speaks; it picks the first of the client's it knows.
SUBPROTOCOLS = ("echo.v2", "echo.v1")
_ws_closed: dict[str, tuple[int, str]] = {}


async def ws_echo(websocket: WebSocket) -> None:
    """Echoes text as text and bytes as bytes. ``close:CODE:REASON`` makes the app close with
    that code and reason; the client's close code and reason are recorded under ``?id=``
    (``/ws-closed``). ``whoami`` answers the scope's path, root_path, query and headers."""
    offered = websocket.scope.get("subprotocols", [])
    chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
    await websocket.accept(subprotocol=chosen)
    key = websocket.query_params.get("id", "")
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            if key:
                _ws_closed[key] = (message.get("code", 1005), message.get("reason") or "")
                _end_event("ws " + key).set()
            return
        text, data = message.get("text"), message.get("bytes")
        if text is not None and text.startswith("close:"):
            _, code, reason = text.split(":", 2)
            await websocket.close(int(code), reason)
            return
        if text == "whoami":
            await websocket.send_json(
                {
                    "path": websocket.scope["path"],
                    "root_path": websocket.scope.get("root_path", ""),
                    "query": websocket.scope["query_string"].decode(),
                    "subprotocol": chosen,
                    "headers": dict(websocket.headers.items()),
                }
            )
        elif text is not None:
            await websocket.send_text(text)
        elif data is not None:
            await websocket.send_bytes(data)


async def ws_gated(websocket: WebSocket) -> None:
    """Reads nothing until ``/ws-gate-open?id=`` is called, then counts the bytes of every
    message up to an empty one and answers the total: the sender's backpressure test."""
    await websocket.accept()
    await asyncio.wait_for(_end_event("gate " + websocket.query_params["id"]).wait(), WAIT)
    total = 0
    while data := await websocket.receive_bytes():
        total += len(data)
    await websocket.send_text(str(total))


async def ws_gate_open(request: Request) -> Response:
    _end_event("gate " + request.query_params["id"]).set()
    return PlainTextResponse("open")


async def ws_closed(request: Request) -> Response:
    """The close code and reason the echo route saw for ``?id=`` (waits for it)."""
    key = request.query_params["id"]
    try:
        await asyncio.wait_for(_end_event("ws " + key).wait(), WAIT)
    except TimeoutError:
        return PlainTextResponse("still open", status_code=504)
    code, reason = _ws_closed.pop(key)
    return JSONResponse({"code": code, "reason": reason})


async def ws_refuse(websocket: WebSocket) -> None:
    """Closes before accepting: the sender is refused (403)."""
    await websocket.close(code=4403)


PAGE = r"""<!doctype html>
<html><head><title>live</title></head><body>
<pre id="ws"></pre><pre id="sse"></pre>
<script>
const base = location.pathname.replace(/page$/, "");
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const socket = new WebSocket(scheme + "//" + location.host + base + "ws", ["echo.v1"]);
socket.onopen = () => { for (const n of [1, 2, 3]) socket.send("browser says " + n); };
socket.onmessage = (e) => { document.getElementById("ws").textContent += e.data + "\n"; };
socket.onerror = () => { document.getElementById("ws").textContent += "error\n"; };
const source = new EventSource(base + "forever?stream=" + crypto.randomUUID());
source.onmessage = (e) => { document.getElementById("sse").textContent += e.data + "\n"; };
window.protocolChosen = () => socket.protocol;
</script></body></html>
"""


async def page(request: Request) -> Response:
    """The browser test's page: a WebSocket (echo) and an EventSource to this same app, by
    paths relative to where the page was loaded (through the relay)."""
    return HTMLResponse(PAGE)


app = Starlette(
    routes=[
        WebSocketRoute("/ws", ws_echo),
        WebSocketRoute("/ws-refuse", ws_refuse),
        WebSocketRoute("/ws-gated", ws_gated),
        Route("/ws-gate-open", ws_gate_open),
        Route("/ws-closed", ws_closed),
        Route("/page", page),
        Route("/sse", sse),
        Route("/ack", ack),
        Route("/forever", forever),
        Route("/ended", ended),
        Route("/hold", hold, methods=["GET", "POST"]),
        Route("/held", held),
        Route("/sha256", sha256, methods=["POST"]),
        Route("/blob", blob),
        Route("/whole", whole),
        Route("/cookies", cookies),
        Route("/small", small, name="small"),
        Route("/redirect", redirect),
        Route("/redirect-url-for", redirect_url_for),
        Route("/links", links),
        Route("/etag", etag),
        Route("/upload", upload, methods=["POST"]),
    ]
)
