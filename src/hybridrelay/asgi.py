"""Serve an ASGI application through a hybrid connection (the command line of
``hybridrelay serve-app`` is :mod:`hybridrelay.cli.serve_app`).

HTTP requests that senders send to ``http(s)://relay/{entity}/...`` reach the application as
ASGI ``http`` scopes; no inbound port is opened on the application's machine::

    import asyncio
    from hybridrelay.asgi import serve

    asyncio.run(serve(app, "Endpoint=sb://relay.example.com/;SharedAccessKeyName=...;"
                      "SharedAccessKey=...", entity_path="api"))

Scope mapping: ``root_path`` is the hybrid connection's path (``/{entity}``) unless given, and
``path`` the full public path under it (``/{entity}/items``; the bare entity URL is
``/{entity}/``), so an app's routes do not depend on the entity it is served on and the URLs it
builds (``url_for``, redirects, FastAPI's ``/docs``) are the public ones. ``scheme`` follows the
relay endpoint (``https`` for ``sb://``/``wss://``); ``Host`` is the relay's host (the relay
strips the sender's); ``X-Forwarded-For``/``-Proto``/``-Host``/``-Prefix`` are added as a
reverse proxy would (:func:`~hybridrelay.protocol.http.forwarded_headers`).

Bodies stream both ways: the request body arrives as ``http.request`` messages with
``more_body`` as its parts come (any size); each ``http.response.body`` with ``more_body`` is
sent at once (server-sent events reach the sender event by event), and the app's
``Content-Length`` is kept (HEAD too). A sender that goes away while a streamed response is under
way is reported as ``http.disconnect`` at once (a response that went inline is too small to
need it: ``http.disconnect`` then follows its end); what the app sends after it is dropped.
Repeated ``Set-Cookie`` headers all arrive (PROTOCOL.md 6.4).
WebSocket senders (on ``/{entity}/...`` or the connect URL) reach the app as ASGI ``websocket``
scopes with the same path rules (:mod:`hybridrelay.asgi_websocket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote

from hybridrelay.asgi_websocket import AsgiWebSockets
from hybridrelay.client import AcceptContext, HybridConnectionListener, RelayedHttpContext
from hybridrelay.client.http import RequestHandler
from hybridrelay.exceptions import ConfigurationError, RelayConnectionError, StreamClosedError
from hybridrelay.observability.http_access import access_logged
from hybridrelay.protocol.addressing import parse_endpoint, target_suffix
from hybridrelay.protocol.connection_string import ConnectionString
from hybridrelay.protocol.http import forwarded_headers

__all__ = [
    "AsgiRequestHandler",
    "load_app",
    "serve",
]

logger = logging.getLogger("hybridrelay.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Lifespan startup and shutdown must complete within this time.
LIFESPAN_TIMEOUT = 60.0
_ASGI = {"version": "3.0", "spec_version": "2.3"}


class AsgiRequestHandler:
    """A ``request_handler`` for :class:`HybridConnectionListener` that runs an ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        entity_path: str,
        host: str,
        secure: bool,
        root_path: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self._app = app
        self._entity = entity_path.strip("/")
        self._host = host
        self._scheme = "https" if secure else "http"
        self._root_path = ("/" + self._entity) if root_path is None else root_path.rstrip("/")
        self._state = state

    @property
    def root_path(self) -> str:
        return self._root_path

    def scope_for(self, ctx: RelayedHttpContext) -> Scope:
        scope = self._scope(
            target_suffix(ctx.path, self._entity), ctx.query, ctx.headers, ctx.remote_endpoint
        )
        scope.update(type="http", method=ctx.method.upper(), scheme=self._scheme)
        return scope

    def websocket_scope_for(self, ctx: AcceptContext) -> Scope:
        """The ASGI ``websocket`` scope of a WebSocket sender (its path after the entity is the
        route, as for HTTP), ``subprotocols`` from its ``Sec-WebSocket-Protocol``."""
        scope = self._scope(ctx.path, ctx.query, ctx.connect_headers, ctx.remote_endpoint)
        scope.update(
            type="websocket",
            scheme="wss" if self._scheme == "https" else "ws",
            subprotocols=ctx.offered_subprotocols,
        )
        return scope

    def _scope(
        self,
        suffix: str,
        query: str,
        sender_headers: Mapping[str, str],
        remote: tuple[str, int] | None,
    ) -> Scope:
        raw_path = self._root_path + (suffix or "/")
        client = remote[0] if remote else None
        relayed = forwarded_headers(
            ((name, value) for name, value in sender_headers.items() if name.lower() != "host"),
            client=client,
            proto=self._scheme,
            host=self._host,
            prefix=self._root_path,
        )
        headers = [(b"host", self._host.encode("latin-1", "replace"))]
        headers += [
            (name.lower().encode("latin-1"), value.encode("latin-1", "replace"))
            for name, value in relayed
        ]
        scope: Scope = {
            "asgi": dict(_ASGI),
            "http_version": "1.1",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("latin-1", "replace"),
            "query_string": query.encode("latin-1", "replace"),
            "root_path": self._root_path,
            "headers": headers,
            "client": remote,
            "server": None,
            "extensions": {},
        }
        if self._state is not None:
            scope["state"] = dict(self._state)
        return scope

    async def __call__(self, ctx: RelayedHttpContext) -> None:
        scope = self.scope_for(ctx)
        body_done = False
        started = False

        async def receive() -> Message:
            nonlocal body_done
            if not body_done:
                try:
                    chunk = await ctx.read_chunk()
                except StreamClosedError:
                    body_done = True
                    return {"type": "http.disconnect"}
                body_done = not ctx.more_body
                return {"type": "http.request", "body": chunk, "more_body": not body_done}
            await ctx.wait_disconnected()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal started
            kind = message.get("type")
            if kind == "http.response.start":
                if started:
                    raise RuntimeError("http.response.start sent twice")
                started = True
                await ctx.respond(
                    int(message["status"]), None, _response_headers(message.get("headers", ()))
                )
            elif kind == "http.response.body":
                if not started:
                    raise RuntimeError("http.response.body before http.response.start")
                if ctx.finished or ctx.disconnected:
                    return  # ASGI 2.3: a send after the disconnect is a no-op
                body = bytes(message.get("body", b""))
                more = bool(message.get("more_body", False))
                try:
                    if body:
                        await ctx.write(body)
                    if more:
                        await ctx.flush()  # stream: this part goes out now
                    else:
                        await ctx.finish()
                except StreamClosedError:
                    if not ctx.disconnected:
                        raise
            # Other messages (trailers, extensions) are not supported and are ignored.

        await self._app(scope, receive, send)
        if not started:
            raise RuntimeError("the ASGI application returned without sending a response")


def _response_headers(raw: Any) -> list[tuple[str, str]]:
    return [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1")) for name, value in raw]


class _Lifespan:
    """Runs the app's lifespan protocol (``lifespan="auto"``: skipped if the app has none)."""

    def __init__(self, app: ASGIApp, mode: str) -> None:
        self._app = app
        self._mode = mode
        self.state: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=2)
        self._startup: asyncio.Future[str | None] | None = None
        self._shutdown: asyncio.Future[str | None] | None = None
        self.supported = False

    async def __aenter__(self) -> _Lifespan:
        if self._mode == "off":
            return self
        loop = asyncio.get_running_loop()
        self._startup = loop.create_future()
        self._shutdown = loop.create_future()
        scope: Scope = {"type": "lifespan", "asgi": dict(_ASGI), "state": self.state}
        self._task = asyncio.create_task(self._run(scope))
        await self._inbox.put({"type": "lifespan.startup"})
        waiters: list[asyncio.Future[Any]] = [self._startup, self._task]
        await asyncio.wait(waiters, timeout=LIFESPAN_TIMEOUT, return_when="FIRST_COMPLETED")
        if not self._startup.done() and not self._task.done():
            await self.__aexit__()
            raise ConfigurationError("ASGI lifespan startup did not complete in time")
        if not self._startup.done():  # the app returned or failed without answering
            if self._mode == "on":
                raise ConfigurationError("the ASGI application does not support lifespan")
            logger.info("the ASGI application has no lifespan support; continuing without")
            return self
        error = self._startup.result()
        if error is not None:
            await self.__aexit__()
            raise ConfigurationError(f"ASGI lifespan startup failed: {error}")
        self.supported = True
        return self

    async def _run(self, scope: Scope) -> None:
        async def receive() -> Message:
            return await self._inbox.get()

        async def send(message: Message) -> None:
            kind = message.get("type", "")
            future = self._startup if kind.startswith("lifespan.startup") else self._shutdown
            if future is not None and not future.done():
                ok = kind.endswith(".complete")
                future.set_result(None if ok else str(message.get("message", "failed")))

        try:
            await self._app(scope, receive, send)
        except Exception as exc:
            if self._startup is not None and self._startup.done():
                logger.exception("ASGI lifespan failed")
            else:
                logger.debug("ASGI lifespan not supported: %r", exc)

    async def __aexit__(self, *exc: object) -> None:
        task = self._task
        if task is None:
            return
        try:
            if self.supported and not task.done() and self._shutdown is not None:
                await self._inbox.put({"type": "lifespan.shutdown"})
                waiters: list[asyncio.Future[Any]] = [self._shutdown, task]
                await asyncio.wait(waiters, timeout=LIFESPAN_TIMEOUT, return_when="FIRST_COMPLETED")
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def serve(
    app: ASGIApp,
    connection_string: str,
    entity_path: str | None = None,
    *,
    lifespan: str = "auto",
    root_path: str | None = None,
    access_log: bool = True,
    ready: asyncio.Event | None = None,
    **listener_kwargs: Any,
) -> None:
    """Serve ``app`` on a hybrid connection until cancelled.

    Args:
        app: an ASGI 3 application.
        connection_string: ``Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...``
            (a Listen right is needed); ``EntityPath=`` may name the hybrid connection.
        entity_path: the hybrid connection (else the connection string's ``EntityPath``).
        lifespan: ``"auto"`` (run it if the app supports it), ``"on"`` or ``"off"``.
        root_path: the ASGI ``root_path`` to report (default: ``/{entity}``, the hybrid
            connection's path on the relay).
        access_log: one INFO line per request on ``hybridrelay.access`` (uvicorn-style).
        ready: set once the listener is online.
        listener_kwargs: passed to :class:`HybridConnectionListener` (``ca_file``, ``proxy``,
            ``keep_alive_interval``, ...).

    Raises:
        ConfigurationError: bad arguments, or the app's lifespan startup failed.
        AuthorizationError, EndpointNotFoundError, RelayConnectionError: the first connection
            to the relay failed (later drops are retried by the listener).
    """
    if lifespan not in ("auto", "on", "off"):
        raise ConfigurationError("lifespan must be 'auto', 'on' or 'off'")
    relay = parse_endpoint(ConnectionString.parse(connection_string).endpoint)
    # The app serves WebSocket senders unless the caller decides on them itself.
    custom_accept = listener_kwargs.get("accept_handler")
    websockets = AsgiWebSockets(app)
    listener_kwargs.setdefault("accept_handler", websockets.accept)
    listener = HybridConnectionListener.from_connection_string(
        connection_string, entity_path, **listener_kwargs
    )
    async with _Lifespan(app, lifespan) as life:
        asgi_handler = AsgiRequestHandler(
            app,
            entity_path=listener.entity_path,
            host=relay.host,
            secure=relay.secure,
            root_path=root_path,
            state=life.state if life.supported else None,
        )
        handler: RequestHandler = asgi_handler
        if access_log:
            handler = access_logged(handler, logging.getLogger("hybridrelay.access"))
        listener.request_handler = handler
        websockets.scope_for = asgi_handler.websocket_scope_for
        try:
            async with listener:
                logger.info("serving the ASGI application on %r", listener.entity_path)
                if ready is not None:
                    ready.set()
                # This returns only when the listener stops for good (e.g. the hybrid
                # connection was deleted).
                while (stream := await listener.accept_connection()) is not None:
                    if custom_accept is not None or not websockets.take(stream):
                        await stream.aclose(1011, "no application is waiting for it")
        finally:
            await websockets.aclose()
    raise RelayConnectionError("the listener stopped: the relay refuses it for good")


def load_app(spec: str, *, app_dir: str | None = ".", factory: bool = False) -> ASGIApp:
    """Import ``module:attribute`` (``attribute`` may be dotted) as an ASGI app.

    Raises:
        ConfigurationError: the module or attribute cannot be found, or is not callable.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(f"the app must be given as module:attribute, not {spec!r}")
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed (SyntaxError, an error at import)
        raise ConfigurationError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    if factory:
        if not callable(target):
            raise ConfigurationError(f"{spec!r} is not a factory (not callable)")
        try:
            target = target()
        except Exception as exc:
            raise ConfigurationError(
                f"the app factory {spec!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
    if not callable(target):
        raise ConfigurationError(f"{spec!r} is not an ASGI application (not callable)")
    app: ASGIApp = target
    return app
