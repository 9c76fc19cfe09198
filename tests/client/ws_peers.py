"""What the tests of our client socket share (tests/client/test_client_sockets.py,
test_transport_frames.py).

- A small aiohttp WebSocket server that can do what the relay never does (fragments, oversized
  messages, a dropped connection, ...), and an echo handler for it.
- The options ``connect()`` gets unless a test says otherwise.
- The SDK's connections recorded: :func:`record_connects`.
- An adapter (:class:`FramesClient`) to the few internals the contract tests look at (flow
  control, the end of the connection).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket as socket_module
import ssl
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

import pytest
from aiohttp import web

from hybridrelay.client import HybridConnectionStream
from hybridrelay.transport import frames_ws
from hybridrelay.transport.aiohttp_ws import AiohttpMessageSocket
from hybridrelay.transport.base import FragmentSocket, MessageKind

MIB = 1024 * 1024
KIB = 1024
SECRET = "SECRET123"
SECRET_QUERY = f"?sb-hc-action=accept&sb-hc-id=abc&sb-hc-rendezvous={SECRET}"

#: The clients the contract tests run against (one since picows went, D8).
CLIENT_NAMES = ("frames",)

# -- the server -------------------------------------------------------------------------------

Handler = Callable[[AiohttpMessageSocket, web.BaseRequest], Awaitable[None]]


@asynccontextmanager
async def ws_server(
    handler: Handler,
    *,
    protocols: tuple[str, ...] = (),
    ssl_context: ssl.SSLContext | None = None,
    headers_seen: dict[str, str] | None = None,
    targets_seen: list[str] | None = None,
) -> AsyncIterator[str]:
    """An aiohttp WebSocket server on 127.0.0.1; yields its ``ws[s]://`` URL.

    ``/refuse`` and ``/forbidden`` refuse the upgrade (499 and 403, with a reason phrase).
    At the exit it waits (up to 5 s) for the handlers still running, so that what they
    recorded is complete, and re-raises the first exception a handler raised (aiohttp would
    only log it)."""
    handlers: set[asyncio.Task[Any]] = set()
    errors: list[BaseException] = []

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        if targets_seen is not None:
            targets_seen.append(request.raw_path)
        if request.path == "/refuse":
            return web.Response(status=499, reason="Custom: no & never (100%)")
        if request.path == "/forbidden":
            return web.Response(status=403, reason="Bad token")
        ws = web.WebSocketResponse(
            autoclose=False, autoping=True, protocols=protocols, max_msg_size=64 * MIB
        )
        await ws.prepare(request)
        if headers_seen is not None:
            headers_seen.update(request.headers)
        socket = AiohttpMessageSocket.server(ws, request)
        try:
            await handler(socket, request)
        except Exception as exc:
            errors.append(exc)
            raise
        return ws

    server = web.Server(handle)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}"
    finally:
        running = [task for task in handlers if not task.done()]
        if running:
            await asyncio.wait(running, timeout=5)
        await runner.cleanup()
    if errors:
        raise errors[0]


async def echo(socket: AiohttpMessageSocket, request: web.BaseRequest) -> None:
    while True:
        message = await socket.receive()
        if message.kind is MessageKind.CLOSE:
            await socket.send_close(message.code or 1000, message.reason)
            return
        await socket.send(message.data)


@contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 where connections are refused, held for the ``with`` block: bound
    by us and never listened on, so no other process can take it meanwhile (a port bound and
    released could be reused by anyone before the test connects)."""
    with socket_module.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port: int = holder.getsockname()[1]
        yield port


def exception_text(exc: BaseException) -> str:
    """The messages of an exception and of its causes/contexts."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 10:
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


# -- connecting -------------------------------------------------------------------------------


def connect_options(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of a client's ``connect()``: the defaults, then ``kwargs``."""
    options: dict[str, Any] = {
        "ssl_context": ssl.create_default_context(),
        "connect_timeout": 5.0,
        "headers": {},
        "protocols": (),
        "max_message_size": 16 * MIB,
    }
    options.update(kwargs)
    return options


async def connect_frames(url: str, **kwargs: Any) -> frames_ws.FrameSocket:
    return await frames_ws.connect(url, **connect_options(**kwargs))


# -- the SDK's connections --------------------------------------------------------------------


def record_connects(
    monkeypatch: pytest.MonkeyPatch, name: str, module: types.ModuleType
) -> list[str]:
    """The list collects every URL the SDK's client ``name`` (its module ``module``) connected
    to."""
    assert name in CLIENT_NAMES, name
    opened: list[str] = []
    real = module.connect

    async def counting(url: str, **kwargs: Any) -> Any:
        opened.append(url)
        return await real(url, **kwargs)

    monkeypatch.setattr(module, "connect", counting)
    return opened


async def read_digest_until(stream: HybridConnectionStream, size: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while total < size:
        data = await stream.read(65536)
        assert data
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


# -- the clients' internals -------------------------------------------------------------------


class Lost(Protocol):
    """Whether the socket's connection is gone, and a way to wait for it."""

    def is_set(self) -> bool: ...

    async def wait(self) -> object: ...


def lost_event(socket: frames_ws.FrameSocket) -> asyncio.Event:
    """An event set once the socket's connection is gone (``connection_lost`` was called)."""
    event = asyncio.Event()
    if socket._lost:
        event.set()
        return event
    original = socket.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        original(exc)
        event.set()

    socket.connection_lost = connection_lost  # type: ignore[method-assign]
    return event


class ClientUnderTest(Protocol):
    """One client socket, as the contract tests see it."""

    name: str

    @property
    def module(self) -> types.ModuleType:
        """The module whose ``connect()`` the SDK calls."""

    @property
    def socket_type(self) -> type[FragmentSocket]: ...

    async def connect(self, url: str, **kwargs: Any) -> FragmentSocket:
        """``connect()`` with :func:`connect_options`."""

    def lost(self, socket: FragmentSocket) -> Lost:
        """Call right after connecting: tells when the connection is gone."""

    def send_is_waiting(self, socket: FragmentSocket) -> bool:
        """A send() waits for the transport's write buffer to drain."""

    def write_paused(self, socket: FragmentSocket) -> bool:
        """The transport said its write buffer is above the high-water mark."""

    def write_buffered(self, socket: FragmentSocket) -> int:
        """Bytes in the transport's write buffer."""

    def reading_paused(self, socket: FragmentSocket) -> bool:
        """Reading from the transport is paused because received messages pile up."""

    def queued(self, socket: FragmentSocket) -> int:
        """Bytes of received messages that receive() has not taken yet."""


class FramesClient:
    name = "frames"

    @property
    def module(self) -> types.ModuleType:
        return frames_ws

    @property
    def socket_type(self) -> type[FragmentSocket]:
        return frames_ws.FrameSocket

    async def connect(self, url: str, **kwargs: Any) -> FragmentSocket:
        return await connect_frames(url, **kwargs)

    @staticmethod
    def _own(socket: FragmentSocket) -> frames_ws.FrameSocket:
        assert isinstance(socket, frames_ws.FrameSocket)
        return socket

    def lost(self, socket: FragmentSocket) -> Lost:
        return lost_event(self._own(socket))

    def send_is_waiting(self, socket: FragmentSocket) -> bool:
        return self._own(socket)._drain_waiter is not None

    def write_paused(self, socket: FragmentSocket) -> bool:
        return self._own(socket)._write_paused

    def write_buffered(self, socket: FragmentSocket) -> int:
        transport = self._own(socket)._transport
        assert transport is not None
        return transport.get_write_buffer_size()

    def reading_paused(self, socket: FragmentSocket) -> bool:
        return self._own(socket)._reading_paused

    def queued(self, socket: FragmentSocket) -> int:
        return self._own(socket)._queued


def client_named(name: str) -> ClientUnderTest:
    """The adapter of client ``name``."""
    assert name == "frames", name
    return FramesClient()
