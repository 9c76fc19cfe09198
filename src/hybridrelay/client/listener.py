"""HybridConnectionListener: listens on a hybrid connection (PROTOCOL.md 4 and 5).

One task owned by the listener runs the control channel: it reads the relay's messages,
reconnects with backoff when the channel drops, and owns the token-renewal task of each
channel. Each ``accept`` is handled in its own task (the accept handler and the rendezvous
upgrade must not stall the reader), bounded by ``max_pending``: accepted streams waiting for
:meth:`HybridConnectionListener.accept_connection` plus accepts in progress never exceed it,
and a connection beyond that is rejected with 503. Every task is tracked and cancelled and
awaited (bounded) by :meth:`HybridConnectionListener.aclose`.

HTTP request relaying (``request`` messages, PROTOCOL.md 6) is handed to
:class:`hybridrelay.client.http.HttpRequestDispatcher`, which runs ``request_handler`` (see
``client/http.py``); without a handler requests are answered 501, as .NET listeners do.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import ssl as ssl_module
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hybridrelay.client._connect import (
    CONTROL_MAX_MESSAGE,
    STREAM_MAX_MESSAGE,
    WebSocketConnector,
    resolve_connection_string,
)
from hybridrelay.client.backoff import (
    RetryKind,
    capped_delay,
    classify_error,
    endpoint_round,
    failure_cause,
    needs_a_fix,
    reconnect_delays,
)
from hybridrelay.client.endpoints import EndpointRing, first_that_answers
from hybridrelay.client.http import HttpRequestDispatcher, RequestHandler
from hybridrelay.client.stream import HybridConnectionStream
from hybridrelay.client.tls import build_ssl_context
from hybridrelay.client.tokens import TokenProvider, fetch_token, token_expiry
from hybridrelay.exceptions import (
    ConfigurationError,
    ProtocolError,
    RelayConnectionError,
    RelayError,
    RelayHttpError,
    StreamClosedError,
    with_hint,
)
from hybridrelay.protocol.addressing import (
    Endpoint,
    build_relay_url,
    reject_url,
    split_rendezvous_address,
)
from hybridrelay.protocol.messages import (
    Accept,
    RenewToken,
    Request,
    encode_message,
    parse_message,
)
from hybridrelay.transport.base import MessageKind, MessageSocket

__all__ = [
    "AcceptContext",
    "AcceptHandler",
    "HybridConnectionListener",
    "ListenerStatus",
    "StatusCallback",
]

logger = logging.getLogger("hybridrelay.client")

ListenerStatus = Literal["offline", "connecting", "online"]
"""What :attr:`HybridConnectionListener.status` reports: its control channel is down, being
opened (or re-opened), or up."""
StatusCallback = Callable[[str, BaseException | None], None]

#: Opening the control channel (the .NET operation timeout is 60 s).
CONNECT_TIMEOUT = 60.0
#: Accept handler plus rendezvous upgrade; the relay keeps the sender waiting at most ~30 s
#: and .NET listeners give up on a rendezvous after 20 s (PROTOCOL.md 5.1).
ACCEPT_TIMEOUT = 20.0
#: Sending one control message (renewToken) and closing a WebSocket.
SEND_TIMEOUT = 30.0
CLOSE_TIMEOUT = 10.0
#: How long a queued (never accepted) stream waits for the sender's close answer at shutdown.
QUEUED_CLOSE_WAIT = 1.0
#: Renew at 80 % of the token's remaining life, but never more often than this.
RENEW_FRACTION = 0.8
MIN_RENEW_DELAY = 1.0
RENEW_RETRY_DELAY = 10.0
#: Rejections (503 when full) in flight at once; beyond that an accept is dropped and the
#: relay times the sender out.
MAX_REJECTS_IN_FLIGHT = 32

DEFAULT_REJECT_STATUS = 400
DEFAULT_REJECT_DESCRIPTION = "Rejected by user code"
HANDLER_FAILED_STATUS = 502
HANDLER_FAILED_DESCRIPTION = (
    "The Listener's custom AcceptHandler threw an exception. See Listener logs for details."
)
BUSY_STATUS = 503
BUSY_DESCRIPTION = "The listener has too many pending connections"


@dataclass
class AcceptContext:
    """What the accept handler learns about a sender, and how it rejects it.

    Attributes:
        id: the connection id (``sb-hc-id``).
        address: the rendezvous URL; a secret (never logged, not in ``repr``).
        connect_headers: the sender's upgrade headers as the relay passed them.
        remote_endpoint: the sender's (address, port) as the relay saw it, if known.
        path: the sender's path suffix after the entity path (``""`` or ``"/..."``), raw.
        query: the sender's own query string (``sb-hc-*`` parameters removed), raw.
        subprotocol: the sub-protocol the listener will accept: by default the first one the
            sender offered; the handler may set another offered one, or None for none.
    """

    id: str
    address: str = field(repr=False)
    connect_headers: dict[str, str]
    remote_endpoint: tuple[str, int] | None
    path: str
    query: str
    subprotocol: str | None = None
    _rejection: tuple[int, str] | None = field(default=None, init=False, repr=False)

    @property
    def offered_subprotocols(self) -> list[str]:
        """The sender's ``Sec-WebSocket-Protocol`` offers, in order."""
        for name, value in self.connect_headers.items():
            if name.lower() == "sec-websocket-protocol":
                return [item.strip() for item in value.split(",") if item.strip()]
        return []

    def reject(
        self, status: int = DEFAULT_REJECT_STATUS, description: str = DEFAULT_REJECT_DESCRIPTION
    ) -> None:
        """Reject the connection: the sender gets ``status`` with ``description``.

        Raises:
            ValueError: ``status`` is not a 4xx/5xx status, or the description has control
                characters (it becomes an HTTP reason phrase).
        """
        if not 400 <= status <= 599:
            raise ValueError("a rejection status must be 4xx or 5xx")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in description):
            raise ValueError("the description must not contain control characters")
        self._rejection = (status, description)

    @property
    def rejection(self) -> tuple[int, str] | None:
        """(status, description) once :meth:`reject` was called, else None."""
        return self._rejection


AcceptHandler = Callable[[AcceptContext], "bool | None | Awaitable[bool | None]"]
"""Decides on each sender before it is accepted: return (or await to) False, or call
:meth:`AcceptContext.reject`, to refuse it; True or None accepts."""


class HybridConnectionListener:
    """Listens on a hybrid connection and hands out the streams of accepted senders.

    Args:
        endpoint: ``sb://host[:port]`` (= ``wss``), ``wss://...`` or ``ws://...`` (plain,
            only for a relay configured without TLS); or several, the nodes of a cluster
            (docs/CLUSTER.md): the first that answers is used, and a listener that loses its
            relay, or cannot reach it, tries the next one.
        entity_path: the hybrid connection's name (may contain ``/``).
        token_provider: source of the Listen token; None sends no token.
        ssl: verify the relay with this context (else ``ca_file``, else the system store).
        ca_file: PEM file of the CAs to trust instead of the system store.
        proxy: ``http://[user:pass@]host:port``; None honours ``HTTPS_PROXY``/``NO_PROXY``.
        accept_handler: decides per sender; see :class:`AcceptContext`.
        keep_alive_interval: ping the control channel every this many seconds; a channel
            that does not answer in half that time is treated as dead. Accepted streams
            are pinged after this many seconds of silence, and closed (1006) when the next
            interval brings nothing either (a slow reader is never dropped).
        token_ttl: lifetime asked of the token provider, seconds.
        listener_id: the listener's ``sb-hc-id`` (default: a random UUID).
        max_pending: accepted connections not yet taken by :meth:`accept_connection` (plus
            accepts in progress); beyond that senders are rejected with 503.
        request_handler: runs relayed HTTP requests (also settable as the attribute
            ``request_handler``); see :class:`hybridrelay.client.http.RelayedHttpContext`.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        entity_path: str,
        token_provider: TokenProvider | None,
        *,
        ssl: ssl_module.SSLContext | None = None,
        ca_file: str | None = None,
        proxy: str | None = None,
        accept_handler: AcceptHandler | None = None,
        keep_alive_interval: float = 30.0,
        token_ttl: float = 3600.0,
        listener_id: str | None = None,
        max_pending: int = 256,
        request_handler: RequestHandler | None = None,
    ) -> None:
        if not entity_path.strip("/"):
            raise ConfigurationError("an entity path is required")
        if keep_alive_interval <= 0:
            raise ConfigurationError("keep_alive_interval must be positive")
        if token_ttl <= 0:
            raise ConfigurationError("token_ttl must be positive")
        if max_pending < 1:
            raise ConfigurationError("max_pending must be at least 1")
        self._endpoints = EndpointRing(endpoint)
        self._entity_path = entity_path.strip("/")
        self._token_provider = token_provider
        self._connector = WebSocketConnector(
            ssl_context=build_ssl_context(ssl_context=ssl, ca_file=ca_file), proxy=proxy
        )
        self._accept_handler = accept_handler
        self._keep_alive_interval = keep_alive_interval
        self._token_ttl = token_ttl
        self._id = listener_id or str(uuid.uuid4())
        #: Names the listener in log lines: the hybrid connection, and the id's start.
        self._name = f"listener {self._entity_path!r} [{self._id[:8]}]"
        self._max_pending = max_pending
        self._rng = random.Random()

        self.status: ListenerStatus = "offline"
        self._status_callbacks: list[StatusCallback] = []
        self._state: Literal["new", "opening", "open", "closed"] = "new"
        self._closing = False
        self._closing_event = asyncio.Event()
        self._control: MessageSocket | None = None
        self._token_expiry: int | None = None
        self._run_task: asyncio.Task[None] | None = None
        # The loop open() ran on: asyncio.create_task looks it up with a getpid system call
        # (Python 3.11), once per relayed HTTP request.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: deque[HybridConnectionStream] = deque()
        self._reserved = 0  # queued streams + accepts in progress, <= max_pending
        self._rejects_in_flight = 0
        self._available = asyncio.Event()
        self._stopped = False  # no more streams will come
        #: Runs each relayed HTTP request (PROTOCOL.md 6); see ``client/http.py``.
        self.request_handler: RequestHandler | None = request_handler
        # Messages on the control channel are sent under this lock, so that a response and
        # its binary body are never split by another message (PROTOCOL.md 4.2).
        self._send_lock = asyncio.Lock()
        self._http = HttpRequestDispatcher(
            connector=self._connector,
            spawn=self._spawn,
            get_handler=lambda: self.request_handler,
            get_control=lambda: self._control,
            send_lock=self._send_lock,
            listener_id=self._id,
        )

    @classmethod
    def from_connection_string(
        cls, connection_string: str, entity_path: str | None = None, **kwargs: Any
    ) -> HybridConnectionListener:
        """Build a listener from ``Endpoint=sb://...;SharedAccessKeyName=..;...``.

        The entity path comes from the argument or from ``EntityPath=``; the token provider
        from the key pair or ``SharedAccessSignature=``. Other arguments as for ``__init__``.
        """
        endpoint, entity, provider = resolve_connection_string(connection_string, entity_path)
        others: Sequence[str] = kwargs.pop("endpoints", ())
        return cls([endpoint, *others], entity, provider, **kwargs)

    def __repr__(self) -> str:
        return (
            f"<HybridConnectionListener {self._endpoints.current.host}/{self._entity_path} "
            f"id={self._id} {self.status}>"
        )

    @property
    def relay_endpoint(self) -> str:
        """The base URL of the endpoint the control channel is on, or is being opened to."""
        return self._endpoints.current.base_url

    @property
    def listener_id(self) -> str:
        """This listener's ``sb-hc-id``."""
        return self._id

    @property
    def entity_path(self) -> str:
        return self._entity_path

    def on_status(self, callback: Callable[[str, BaseException | None], None]) -> None:
        """Call ``callback(status, error)`` on every status change.

        ``status`` is ``"connecting"``, ``"online"`` or ``"offline"``; ``error`` is why the
        listener went offline (None for a deliberate close). Called in the event loop; must
        not block. An exception from the callback is logged and ignored.
        """
        self._status_callbacks.append(callback)

    def _set_status(self, status: ListenerStatus, error: BaseException | None = None) -> None:
        self.status = status
        for callback in list(self._status_callbacks):
            try:
                callback(status, error)
            except Exception:
                logger.exception("%s: status callback failed", self._name)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the control channel; return once online.

        On failure the listener is closed and the error raised.

        Raises:
            AuthorizationError: 401/403.
            EndpointNotFoundError: 404 (no such hybrid connection).
            RelayConnectionError: (or RelayTimeoutError) the relay could not be reached.
            StreamClosedError: the listener was already closed.
        """
        if self._state == "closed":
            raise StreamClosedError("the listener is closed")
        if self._state != "new":
            raise RuntimeError("open() was already called")
        self._state = "opening"
        self._loop = asyncio.get_running_loop()
        self._set_status("connecting")
        try:
            socket = await self._connect_first()
        except BaseException as exc:
            await self._shutdown(exc if isinstance(exc, Exception) else None)
            raise
        if self._closing:  # aclose() ran while we were connecting
            socket.abort()
            raise StreamClosedError("the listener was closed while opening")
        self._state = "open"
        self._set_status("online")
        # Known before the control task first runs, so that an aclose() right after open()
        # sends its close frame instead of waiting out CLOSE_TIMEOUT for a task that never read.
        self._control = socket
        self._run_task = self._spawn(self._run(socket), "control")

    async def aclose(self) -> None:
        """Stop listening: close the control channel (1000), close the streams nobody took
        yet, and cancel and await the listener's tasks (bounded). Idempotent."""
        if self._state == "closed" or self._closing:
            return
        self._closing = True
        self._closing_event.set()
        control = self._control
        if control is not None and not control.close_sent:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await control.send_close(1000)
            except (TimeoutError, RelayError):
                control.abort()
        # The control task sees the relay's close answer and ends; give it a moment.
        if self._run_task is not None:
            await asyncio.wait([self._run_task], timeout=CLOSE_TIMEOUT)
        await self._shutdown(None)

    async def _shutdown(self, error: Exception | None) -> None:
        self._closing = True
        self._closing_event.set()
        self._stop_streams()
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            if still_running:
                logger.warning(
                    "%s: %d task(s) did not stop in time", self._name, len(still_running)
                )
        streams = list(self._pending)
        self._pending.clear()
        if streams:
            await asyncio.gather(
                # Never handed out, so nobody reads them: send the close, do not wait long.
                *(stream._close(1001, "listener closed", QUEUED_CLOSE_WAIT) for stream in streams),
                return_exceptions=True,
            )
        await self._connector.aclose()
        self._state = "closed"
        if self.status != "offline" or error is not None:
            self._set_status("offline", error)

    def _stop_streams(self) -> None:
        self._stopped = True
        self._available.set()

    async def __aenter__(self) -> HybridConnectionListener:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- streams -----------------------------------------------------------------------------

    async def accept_connection(self) -> HybridConnectionStream | None:
        """The next accepted stream; None once the listener is closed (or gave up for good)."""
        while True:
            if self._pending:
                stream = self._pending.popleft()
                self._reserved -= 1
                return stream
            if self._stopped:
                return None
            self._available.clear()
            await self._available.wait()

    def __aiter__(self) -> AsyncIterator[HybridConnectionStream]:
        return self

    async def __anext__(self) -> HybridConnectionStream:
        stream = await self.accept_connection()
        if stream is None:
            raise StopAsyncIteration
        return stream

    # -- tasks -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(coro, name=f"hybridrelay-listener-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Our tasks catch what they expect; anything else is a bug worth a traceback.
            logger.error(
                "%s: task %s failed",
                self._name,
                task.get_name(),
                exc_info=task.exception(),
            )

    # -- control channel ---------------------------------------------------------------------

    async def _get_token(self) -> str | None:
        return await fetch_token(
            self._token_provider, self._endpoints.current.host, self._entity_path, self._token_ttl
        )

    async def _connect_first(self) -> MessageSocket:
        """Connect to the first endpoint that answers, in the order given (from the one in
        use)."""
        return await self._connect_any(self._endpoints.in_turn(), reconnecting=False)

    async def _connect_any(
        self, endpoints: Sequence[Endpoint], *, reconnecting: bool
    ) -> MessageSocket:
        """Try ``endpoints`` in turn until one answers. An endpoint that cannot
        be reached, or answers 502/503, makes way for the next; a refusal (401/403/404) is the
        same on every node and raised at once (``client/endpoints.py``); when none answers,
        the last one's error. Reconnecting, each try is a ``connecting`` status
        (relay_endpoint names the node) ended by ``offline`` when it fails."""

        async def attempt(endpoint: Endpoint) -> MessageSocket:
            self._endpoints.stick(endpoint)  # the one in use (relay_endpoint), tried now
            if reconnecting:
                self._set_status("connecting")
            return await self._connect_control()

        def on_failure(_: Endpoint, exc: RelayError) -> None:
            if reconnecting:
                self._set_status("offline", exc)
            level = logging.DEBUG if reconnecting else logging.INFO
            logger.log(level, "%s: %s; trying the next relay endpoint", self._name, exc)

        _, socket = await first_that_answers(
            endpoints,
            attempt,
            give_up=lambda: self._closing,
            on_failure=on_failure,
        )
        return socket

    async def _connect_control(self) -> MessageSocket:
        token = await self._get_token()
        url = build_relay_url(
            self._endpoints.current.base_url,
            self._entity_path,
            action="listen",
            params={"sb-hc-id": self._id},
        )
        # The token travels in the header, never in the URL (URLs end up in proxy logs).
        headers = {"ServiceBusAuthorization": token} if token else {}
        try:
            socket = await self._connector.connect(
                url,
                connect_timeout=CONNECT_TIMEOUT,
                headers=headers,
                keepalive=self._keep_alive_interval,
                max_msg_size=CONTROL_MAX_MESSAGE,
            )
        except RelayHttpError as exc:
            raise with_hint(exc, self._entity_path, "Listen") from exc
        self._token_expiry = token_expiry(token) if token else None
        return socket

    async def _run(self, socket: MessageSocket | None) -> None:
        """Serve the control channel; reconnect whenever it drops, until closed."""
        try:
            while socket is not None:
                error = await self._serve(socket)
                socket = None
                if self._closing:
                    return
                logger.warning("%s: connection to the relay lost: %s", self._name, error)
                self._set_status("offline", error)
                socket = await self._reconnect(time.monotonic())
                if socket is not None:
                    self._set_status("online")
        finally:
            if socket is not None:
                socket.abort()

    async def _reconnect(self, lost_at: float) -> MessageSocket | None:
        """Reconnect with backoff; None when closing or when retrying cannot help.

        One line per transition: reconnecting (with the first delay), each new cause of
        failure (INFO; ERROR for what needs a fix: a refused key, an unknown hybrid connection,
        an untrusted certificate), back online. The same cause again is DEBUG, so a relay
        that stays down for hours does not fill the log.
        """
        delays = reconnect_delays(self._rng)
        delay = next(delays)
        logger.info("%s: reconnecting in %.1f s", self._name, delay)
        last_cause: str | None = None
        while not await self._wait_closing(delay):
            # With several endpoints, each attempt tries the others first: the one lost may
            # be down.
            given = self._endpoints.given
            order = endpoint_round(self._endpoints.index, len(given), self._rng)
            try:
                socket = await self._connect_any([given[i] for i in order], reconnecting=True)
            except Exception as exc:
                kind = classify_error(exc)
                self._set_status("offline", exc)
                if kind is RetryKind.FATAL:
                    logger.error("%s: giving up reconnecting: %s", self._name, exc)
                    self._stop_streams()
                    return None
                delay = next(delays) if kind is RetryKind.BACKOFF else capped_delay(self._rng)
                cause = failure_cause(exc)
                if cause == last_cause:
                    level = logging.DEBUG
                elif needs_a_fix(exc):
                    level = logging.ERROR
                else:
                    level = logging.INFO
                logger.log(
                    level, "%s: reconnect failed: %s; retrying in %.1f s", self._name, exc, delay
                )
                last_cause = cause
                continue
            if self._closing:
                socket.abort()
                return None
            logger.info("%s: back online after %.1f s", self._name, time.monotonic() - lost_at)
            return socket
        return None

    async def _wait_closing(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; True (early) if the listener is being closed."""
        try:
            async with asyncio.timeout(delay):
                await self._closing_event.wait()
        except TimeoutError:
            return False
        return True

    async def _serve(self, socket: MessageSocket) -> RelayConnectionError:
        """Read the control channel until it ends; return why it ended."""
        self._control = socket
        self._http.channel_changed()
        renewer = self._spawn(self._renew_tokens(socket), "renew")
        try:
            while True:
                message = await socket.receive()
                if message.kind is MessageKind.CLOSE:
                    return RelayConnectionError(
                        f"control channel closed: {message.code} {message.reason}".rstrip()
                    )
                if message.kind is MessageKind.TEXT:
                    self._dispatch(message.data)
                else:  # a binary message only ever follows a ``request`` (its body)
                    self._http.on_binary(message.data)
        finally:
            self._control = None
            renewer.cancel()
            await asyncio.wait([renewer])
            # Answer the relay's close (or drop a dead channel); bounded inside aclose().
            await socket.aclose()

    def _dispatch(self, text: bytes | str) -> None:
        try:
            message = parse_message(text)
        except ProtocolError as exc:
            logger.warning("%s: ignoring a malformed control message: %s", self._name, exc)
            return
        if isinstance(message, Accept):
            self._on_accept(message)
        elif isinstance(message, Request) and not self._closing:
            self._http.on_request(message)
        # Unknown messages are ignored (PROTOCOL.md 4.2).

    async def _renew_tokens(self, socket: MessageSocket) -> None:
        """Send ``renewToken`` at 80 % of the current token's remaining life."""
        retry = False
        while True:
            if retry:
                delay = RENEW_RETRY_DELAY
            elif self._token_expiry is None:
                delay = self._token_ttl * RENEW_FRACTION
            else:
                delay = (self._token_expiry - time.time()) * RENEW_FRACTION
            await asyncio.sleep(max(MIN_RENEW_DELAY, delay))
            try:
                token = await self._get_token()
            except RelayError as exc:
                logger.warning("%s: token renewal failed: %s", self._name, exc)
                retry = True
                continue
            retry = False
            if token is None:
                return  # no token provider: nothing to renew
            expiry = token_expiry(token)
            if expiry is not None and self._token_expiry is not None:
                if expiry <= self._token_expiry:
                    # A fixed token (SharedAccessSignatureTokenProvider) cannot be renewed;
                    # the relay will drop the channel when it expires.
                    logger.info("%s: no newer token to renew with", self._name)
                    return
            try:
                async with asyncio.timeout(SEND_TIMEOUT), self._send_lock:
                    await socket.send(encode_message(RenewToken(token)))
            except (TimeoutError, RelayError) as exc:
                logger.info("%s: could not send renewToken: %s", self._name, exc)
                return  # the channel is going away; the reader reconnects
            self._token_expiry = expiry
            logger.debug("%s: token renewed", self._name)

    # -- accepting ---------------------------------------------------------------------------

    def _on_accept(self, accept: Accept) -> None:
        if self._closing:
            return  # the relay fails the sender after its timeout
        if self._reserved >= self._max_pending:
            self._start_reject(accept, BUSY_STATUS, BUSY_DESCRIPTION)
            return
        self._reserved += 1
        try:
            self._spawn(self._accept(accept), "accept")
        except BaseException:
            self._reserved -= 1
            raise

    def _start_reject(self, accept: Accept, status: int, description: str) -> None:
        if self._rejects_in_flight >= MAX_REJECTS_IN_FLIGHT:
            logger.warning("%s: overloaded, dropping connection %s", self._name, accept.id)
            return
        self._rejects_in_flight += 1
        self._spawn(self._reject_task(accept, status, description), "reject")

    async def _reject_task(self, accept: Accept, status: int, description: str) -> None:
        try:
            await self._reject(accept, status, description)
        finally:
            self._rejects_in_flight -= 1

    def _context(self, accept: Accept) -> AcceptContext:
        path, query = split_rendezvous_address(accept.address, self._entity_path)
        endpoint = accept.remote_endpoint
        ctx = AcceptContext(
            id=accept.id,
            address=accept.address,
            connect_headers=dict(accept.connect_headers),
            remote_endpoint=(endpoint.address, endpoint.port) if endpoint else None,
            path=path,
            query=query,
        )
        offered = ctx.offered_subprotocols
        ctx.subprotocol = offered[0] if offered else None
        return ctx

    async def _decide(self, ctx: AcceptContext) -> tuple[int, str] | None:
        """Run the accept handler: None to accept, else (status, description) to reject."""
        if self._accept_handler is None:
            return None
        try:
            async with asyncio.timeout(ACCEPT_TIMEOUT):
                result = self._accept_handler(ctx)
                if inspect.isawaitable(result):
                    result = await result
        except Exception:
            logger.warning(
                "%s: accept handler failed for connection %s",
                self._name,
                ctx.id,
                exc_info=True,
            )
            return HANDLER_FAILED_STATUS, HANDLER_FAILED_DESCRIPTION
        if ctx.rejection is not None:
            return ctx.rejection
        if result is False:
            return DEFAULT_REJECT_STATUS, DEFAULT_REJECT_DESCRIPTION
        return None

    async def _accept(self, accept: Accept) -> None:
        queued = False
        try:
            ctx = self._context(accept)
            rejection = await self._decide(ctx)
            if rejection is not None:
                await self._reject(accept, *rejection)
                return
            protocols = (ctx.subprotocol,) if ctx.subprotocol else ()
            try:
                socket = await self._connector.connect(
                    accept.address,  # verbatim, no token: the URL is the credential
                    connect_timeout=ACCEPT_TIMEOUT,
                    protocols=protocols,
                    max_msg_size=STREAM_MAX_MESSAGE,
                    stream_keepalive=self._keep_alive_interval,
                )
            except RelayError as exc:
                logger.warning(
                    "%s: rendezvous for connection %s failed: %s", self._name, ctx.id, exc
                )
                return
            stream = HybridConnectionStream(
                socket,
                id=ctx.id,
                connect_headers=ctx.connect_headers,
                remote_endpoint=ctx.remote_endpoint,
            )
            if self._closing:
                socket.abort()
                return
            self._pending.append(stream)
            queued = True
            self._available.set()
        finally:
            if not queued:
                self._reserved -= 1

    async def _reject(self, accept: Accept, status: int, description: str) -> None:
        url = reject_url(accept.address, status, description)
        try:
            socket = await self._connector.connect(url, connect_timeout=ACCEPT_TIMEOUT)
        except RelayHttpError as exc:
            if exc.status != 410:  # 410 Gone is the relay's "rejection delivered"
                logger.warning(
                    "%s: rejecting connection %s: relay answered %s",
                    self._name,
                    accept.id,
                    exc.status,
                )
            return
        except RelayError as exc:
            logger.warning("%s: rejecting connection %s failed: %s", self._name, accept.id, exc)
            return
        # A 101 here means the relay took the rejection for an accept: do not leave it open.
        logger.warning("%s: relay accepted connection %s that was rejected", self._name, accept.id)
        await socket.aclose(1008, "rejected")
