"""Keeping a listener on a hybrid connection: the loop shared by ``-R`` edges and ``-H`` forwards.

Open a listener. At start, a refusal that needs a fix (401/403, 404, a certificate not
trusted: :func:`~hybridrelay.client.backoff.needs_a_fix`) ends the forward at once with one line
naming it, the cause and the fix; what may heal (the relay down, a network or DNS error, a
timeout, 5xx) is retried on the backoff schedule. Once the forward has been online, the
listener reconnects by itself (the SDK logs the transitions) and a listener that had to be
opened anew is retried whatever the cause, a refusal logged at ERROR and retried at the capped
interval (a rotated key may be put back). Failures are logged once per cause (then DEBUG), and
``back online after N s`` when it is. Online, accepted streams are handed on until ``stop`` is
set or the listener ends (then a new one is opened). On ``stop``, the listener stays registered
while ``drain`` runs, so new senders are refused (by the accept or request handler) rather than
cut, then it is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Protocol

from hybridrelay.bridge.pipe import RelayStream
from hybridrelay.client.backoff import (
    RECONNECT_DELAYS,
    RetryKind,
    capped_delay,
    classify_error,
    failure_cause,
    needs_a_fix,
    reconnect_delays,
)
from hybridrelay.exceptions import RelayError

__all__ = ["EdgeListener", "RetryLog", "keep_listening", "wait_or_stop"]

logger = logging.getLogger("hybridrelay.bridge")


class EdgeListener(Protocol):
    """What the bridge uses of :class:`hybridrelay.client.HybridConnectionListener`."""

    async def open(self) -> None: ...

    async def accept_connection(self) -> RelayStream | None: ...

    async def aclose(self) -> None: ...


async def wait_or_stop(event: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``event`` is set; True if it was set."""
    try:
        async with asyncio.timeout(delay):
            await event.wait()
    except TimeoutError:
        return False
    return True


class RetryLog:
    """One thing retried against the relay: its delays (the schedule's, or the capped one when
    a quick retry cannot help) and its log lines: each new cause once (WARNING, or ERROR when
    it needs a fix), the same cause again at DEBUG, and ``back online after N s`` when it works
    again."""

    def __init__(self, name: str, schedule: Sequence[float] = RECONNECT_DELAYS) -> None:
        self._name = name
        self._schedule = schedule
        self._delays: Iterator[float] = reconnect_delays(schedule=schedule)
        self._last_cause: str | None = None
        self._failing_since: float | None = None

    async def retry(self, what: str, exc: BaseException, stop: asyncio.Event) -> bool:
        """Log the failure and wait its delay; True if ``stop`` was set meanwhile."""
        if classify_error(exc) is RetryKind.CAPPED:
            delay = capped_delay(schedule=self._schedule)
        else:
            delay = next(self._delays)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        cause = failure_cause(exc)
        if cause == self._last_cause:
            level = logging.DEBUG
        else:
            level = logging.ERROR if needs_a_fix(exc) else logging.WARNING
        self._last_cause = cause
        logger.log(level, "%s: %s: %s; retrying in %.1f s", self._name, what, exc, delay)
        return await wait_or_stop(stop, delay)

    def succeeded(self) -> None:
        if self._failing_since is not None:
            logger.info(
                "%s: back online after %.1f s", self._name, time.monotonic() - self._failing_since
            )
        self._delays = reconnect_delays(schedule=self._schedule)
        self._failing_since = None
        self._last_cause = None


async def keep_listening(
    name: str,
    open_listener: Callable[[], EdgeListener],
    *,
    stop: asyncio.Event,
    started: Callable[[], None],
    online: Callable[[], None],
    on_stream: Callable[[RelayStream], Awaitable[None]],
    drain: Callable[[], Awaitable[None]],
    schedule: Sequence[float] = RECONNECT_DELAYS,
) -> None:
    """Run one listener until ``stop`` (see the module docstring).

    Args:
        name: for log lines (``-R hc``, ``-H hc``).
        open_listener: builds a new, unopened listener.
        started: called once, the first time a listener is online (readiness).
        online: called every time a listener is online (a log line).
        on_stream: takes each accepted stream; must not block for the stream's lifetime.
        drain: waits (bounded) for the work in flight once ``stop`` is set.
        schedule: the reconnect delays (tests shorten them).

    Raises:
        RelayError: before the first time online, a refusal that needs a fix (its message
            names the forward, the status and the fix); any time, one that retrying cannot
            fix (``RetryKind.FATAL``).
    """
    announced = False
    retries = RetryLog(name, schedule)
    while not stop.is_set():
        listener = open_listener()
        try:
            await listener.open()
        except RelayError as exc:
            if classify_error(exc) is RetryKind.FATAL:
                raise
            if not announced and needs_a_fix(exc):
                raise RelayError(f"{name}: cannot listen: {exc}") from exc
            if await retries.retry("cannot listen", exc, stop):
                break
            continue
        retries.succeeded()
        online()
        if not announced:
            announced = True
            started()
        try:
            await _accept_until_stopped(name, listener, stop, on_stream)
            if stop.is_set():
                await drain()
        finally:
            await listener.aclose()


async def _accept_until_stopped(
    name: str,
    listener: EdgeListener,
    stop: asyncio.Event,
    on_stream: Callable[[RelayStream], Awaitable[None]],
) -> None:
    """Hand accepted streams on until ``stop`` is set or the listener ends.

    One task accepts for as long as the listener lives (not one task per stream: that cost a
    task, a wait and a turn of the event loop on every new connection). ``stop`` cancels it
    only while it waits for the next stream: a stream being handed to ``on_stream`` is
    handed over first.
    """
    handing_over = False

    async def accept_all() -> None:
        nonlocal handing_over
        while not stop.is_set():
            try:
                stream = await listener.accept_connection()
            except RelayError as exc:
                logger.warning("%s: accepting failed: %s; reopening", name, exc)
                return
            if stream is None:
                logger.warning("%s: the listener closed; opening a new one", name)
                return
            handing_over = True
            try:
                await on_stream(stream)
            finally:
                handing_over = False

    accepting = asyncio.create_task(accept_all(), name=f"accept-{name}")
    stopped = asyncio.create_task(stop.wait(), name=f"stop-{name}")
    try:
        await asyncio.wait([accepting, stopped], return_when=asyncio.FIRST_COMPLETED)
        if handing_over:  # it ends by itself once on_stream returns: stop is set
            await asyncio.wait([accepting])
    finally:
        for task in (accepting, stopped):
            task.cancel()
        await asyncio.wait([accepting, stopped])
    if not accepting.cancelled():
        accepting.result()  # what accept_all raised, if anything
