"""WebSocket senders as ASGI ``websocket`` scopes (``serve-app``, :mod:`hybridrelay.asgi`).

A sender reaches the app through the relay's HTTP endpoint (``wss://relay/{hc}/{route}``, what a
browser does) or the Hybrid Connections connect URL (``/$hc/{hc}/{route}?sb-hc-action=connect``);
either way the listener gets an ``accept`` and this module runs the app on it, per the ASGI
spec: the app's first ``receive()`` is ``websocket.connect``; its ``websocket.accept`` accepts
the sender (the listener opens the rendezvous with the app's ``subprotocol``), its
``websocket.close`` before that (or returning without accepting) rejects it with 403, and an
exception before that with 500, so the sender sees the refusal as an HTTP status before any
101. Once accepted, each message of the sender is one ``websocket.receive`` (text or bytes, as
it was sent), each ``websocket.send`` one message, and a close frame either way carries its
code and reason (``websocket.disconnect`` gets the sender's).

Backpressure: the sender's next message is read only when the app calls ``receive()`` again,
and ``send()`` waits while the sender is slow (``SEND_TIMEOUT`` at most, then the connection
counts as gone). ``headers`` of ``websocket.accept`` cannot reach the sender (the relay answers
the sender's upgrade itself; only the subprotocol crosses) and are ignored; the
``websocket.http.response`` extension is not offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from hybridrelay.client import AcceptContext, HybridConnectionStream
from hybridrelay.exceptions import RelayConnectionError, StreamClosedError

__all__ = ["AsgiWebSockets", "WebSocketGone"]

logger = logging.getLogger("hybridrelay.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

#: The app must accept or close a new WebSocket within this time (the SDK gives an accept
#: handler 20 s, the relay gives the listener 30 s).
DECISION_TIMEOUT = 15.0
#: From the app's accept to the sender's stream (the SDK's rendezvous connect takes <= 20 s).
PAIR_TIMEOUT = 30.0
#: One message to the sender may wait this long for room before the sender counts as gone.
SEND_TIMEOUT = 60.0
#: WebSockets open at once per listener; beyond that senders are rejected with 503.
MAX_WEBSOCKETS = 1024
#: How long stopping waits for the app tasks (each closes its WebSocket, <= 10 s).
CLOSE_TIMEOUT = 12.0
#: ``websocket.disconnect`` code when the connection broke without a close frame (RFC 6455).
ABNORMAL_CLOSURE = 1006
NO_STATUS = 1005

REFUSED_BY_APP = "The application refused the WebSocket"


class WebSocketGone(OSError):
    """``websocket.send`` on a connection that is closed or gone (ASGI 2.4: an OSError)."""


@dataclass(frozen=True, slots=True)
class _Accepted:
    subprotocol: str | None


@dataclass(frozen=True, slots=True)
class _Refused:
    status: int
    description: str


class _Connection:
    """One WebSocket sender and the app task that serves it."""

    def __init__(self, app: ASGIApp, scope: Scope, offered: list[str], name: str) -> None:
        self._app = app
        self._scope = scope
        self._offered = offered
        self.name = name
        loop = asyncio.get_running_loop()
        self.decided: asyncio.Future[_Accepted | _Refused] = loop.create_future()
        #: The accepted sender's stream; None when it never came (or the app refused).
        self._stream: asyncio.Future[HybridConnectionStream | None] = loop.create_future()
        self._connect_delivered = False
        self._close_sent = False
        self._disconnect: Message | None = None
        self.task: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None

    # -- the pairing with the sender's stream ---------------------------------------------

    def attach(self, stream: HybridConnectionStream) -> bool:
        """False when the app is no longer waiting for it (the listener is closing)."""
        if self.expiry is not None:
            self.expiry.cancel()
        if self._stream.done():
            return False
        self._stream.set_result(stream)
        return True

    def fail(self) -> None:
        """The sender will not come (refused, expired, the listener closing)."""
        if not self.decided.done():
            self.decided.set_result(_Refused(503, "The listener is closing"))
        if not self._stream.done():
            self._stream.set_result(None)

    # -- the app ---------------------------------------------------------------------------

    async def run(self) -> None:
        failed = False
        code = 1000
        try:
            await self._app(self._scope, self._receive, self._send)
        except WebSocketGone:
            pass  # the app stopped because the sender had gone
        except asyncio.CancelledError:
            code = 1001  # the listener is closing
            raise
        except Exception:
            failed, code = True, 1011
            logger.exception("%s: the ASGI application failed", self.name)
        finally:
            if not self.decided.done():
                refusal = _Refused(500, "The application failed") if failed else None
                self.decided.set_result(refusal or _Refused(403, REFUSED_BY_APP))
                if not self._stream.done():
                    self._stream.set_result(None)
            elif isinstance(self.decided.result(), _Accepted):
                await self._close_stream(code, "")

    async def _stream_ready(self) -> HybridConnectionStream | None:
        # Bounded: fail() or the expiry (PAIR_TIMEOUT) always resolves it.
        return await asyncio.shield(self._stream)

    def _gone(self, code: int, reason: str = "") -> Message:
        self._disconnect = {"type": "websocket.disconnect", "code": code, "reason": reason}
        return self._disconnect

    async def _receive(self) -> Message:
        if not self._connect_delivered:
            self._connect_delivered = True
            return {"type": "websocket.connect"}
        if self._disconnect is not None:
            return self._disconnect
        await asyncio.shield(self.decided)
        stream = await self._stream_ready()
        if stream is None:
            return self._gone(ABNORMAL_CLOSURE)
        try:
            message = await stream.receive_message()
        except StreamClosedError:  # we closed it (websocket.close) while this waited
            return self._gone(stream.close_code or NO_STATUS, stream.close_reason)
        except RelayConnectionError:
            return self._gone(ABNORMAL_CLOSURE)
        if message is None:  # the sender's close frame: answer it at once, as a server does
            code, reason = stream.close_code or NO_STATUS, stream.close_reason
            echo = code if code not in (NO_STATUS, ABNORMAL_CLOSURE) else 1000
            await self._close_stream(echo, "")
            return self._gone(code, reason)
        if isinstance(message, str):
            return {"type": "websocket.receive", "text": message}
        return {"type": "websocket.receive", "bytes": message}

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "websocket.accept":
            if self.decided.done():
                raise RuntimeError("websocket.accept after the WebSocket was accepted or closed")
            subprotocol = message.get("subprotocol")
            if subprotocol is not None and subprotocol not in self._offered:
                raise RuntimeError(f"subprotocol {subprotocol!r} was not offered by the client")
            self.decided.set_result(_Accepted(subprotocol))
        elif kind == "websocket.close":
            if not self.decided.done():
                self.decided.set_result(_Refused(403, REFUSED_BY_APP))
                return
            await self._close_stream(int(message.get("code") or 1000), message.get("reason") or "")
        elif kind == "websocket.send":
            if not self.decided.done() or not isinstance(self.decided.result(), _Accepted):
                raise RuntimeError("websocket.send before websocket.accept")
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                raise RuntimeError("websocket.send with neither bytes nor text")
            stream = await self._stream_ready()
            if stream is None or self._close_sent or self._disconnect is not None:
                raise WebSocketGone("the WebSocket is closed")
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await stream.send_message(data if isinstance(data, str) else bytes(data))
            except (TimeoutError, RelayConnectionError, StreamClosedError) as exc:
                raise WebSocketGone(f"the WebSocket is gone: {type(exc).__name__}") from None
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r} on a WebSocket")

    async def _close_stream(self, code: int, reason: str) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        stream = await self._stream_ready()
        if stream is not None:
            await stream.aclose(code, reason)  # bounded: waits <= 10 s for the peer's close


class AsgiWebSockets:
    """The accept handler and the stream taker of a listener whose WebSocket senders an ASGI
    app serves; ``scope_for`` builds the ``websocket`` scope of a sender."""

    def __init__(
        self,
        app: ASGIApp,
        scope_for: Callable[[AcceptContext], Scope] | None = None,
        *,
        limit: int = MAX_WEBSOCKETS,
    ) -> None:
        self._app = app
        #: Builds a sender's scope; until it is set, senders are rejected (503).
        self.scope_for = scope_for
        self._limit = limit
        self._live: set[_Connection] = set()
        #: Accepted by the app, waiting for the sender's stream, by connection id.
        self._awaiting: dict[str, _Connection] = {}

    @property
    def open_count(self) -> int:
        return len(self._live)

    async def accept(self, ctx: AcceptContext) -> None:
        """The listener's accept handler: runs the app until it accepts or refuses."""
        if self.scope_for is None:
            ctx.reject(503, "The application is not ready")
            return
        if len(self._live) >= self._limit:
            ctx.reject(503, "The application has too many WebSockets open")
            return
        if ctx.id in self._awaiting:
            ctx.reject(409, "The connection id is in use")
            return
        connection = _Connection(
            self._app, self.scope_for(ctx), ctx.offered_subprotocols, f"WebSocket {ctx.id}"
        )
        connection.task = asyncio.create_task(
            connection.run(), name=f"hybridrelay-asgi-ws-{ctx.id}"
        )
        self._live.add(connection)
        connection.task.add_done_callback(lambda _: self._live.discard(connection))
        try:
            done, _ = await asyncio.wait({connection.decided}, timeout=DECISION_TIMEOUT)
        except asyncio.CancelledError:
            connection.fail()
            raise
        if not done:
            connection.fail()
            connection.task.cancel()
            ctx.reject(504, "The application did not accept the WebSocket in time")
            return
        decision = connection.decided.result()
        if isinstance(decision, _Refused):
            connection.fail()
            ctx.reject(decision.status, decision.description)
            return
        ctx.subprotocol = decision.subprotocol
        self._awaiting[ctx.id] = connection
        connection.expiry = asyncio.get_running_loop().call_later(
            PAIR_TIMEOUT, self._expire, ctx.id, connection
        )

    def _expire(self, connection_id: str, connection: _Connection) -> None:
        if self._awaiting.get(connection_id) is connection:
            del self._awaiting[connection_id]
        connection.fail()

    def take(self, stream: HybridConnectionStream) -> bool:
        """Give an accepted stream to its app; False (the caller closes it) when no app waits
        for it (it expired)."""
        connection = self._awaiting.pop(stream.id, None)
        if connection is None:
            return False
        return connection.attach(stream)

    async def aclose(self) -> None:
        """Stop every app task (their WebSockets close); bounded by ``CLOSE_TIMEOUT``."""
        for connection in list(self._awaiting.values()):
            connection.fail()
        self._awaiting.clear()
        tasks = [c.task for c in self._live if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.gather(*tasks, return_exceptions=True)
