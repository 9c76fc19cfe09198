"""Signals of our long-running commands (serve, bridge and serve-app alike).

SIGINT and SIGTERM stop gracefully; SIGHUP reloads where the command can (``serve``) and is
otherwise logged and ignored: its default action would end the process without a word (a
supervisor's "reload", a closed terminal), and the peers would only see their connections drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator

__all__ = ["RELOAD_SIGNAL", "STOP_SIGNALS", "stop_on_signals"]

logger = logging.getLogger("hybridrelay")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: None where the platform has no SIGHUP (Windows).
RELOAD_SIGNAL: signal.Signals | None = getattr(signal, "SIGHUP", None)


def _ignore_reload() -> None:
    logger.warning(
        "SIGHUP ignored: this command has nothing to reload (SIGTERM or SIGINT stops it)"
    )


@contextlib.contextmanager
def stop_on_signals(
    stop: Callable[[], object], *, reload: Callable[[], object] | None = None
) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM call ``stop`` (which starts the graceful shutdown; it
    is called again on a second signal) and SIGHUP calls ``reload`` (without one, SIGHUP is
    logged and ignored), on the running loop; the previous handlers come back after.

    Where the loop cannot take signal handlers (not the main thread, a platform without
    them) the signals keep their default behaviour.
    """
    loop = asyncio.get_running_loop()
    handlers: list[tuple[signal.Signals, Callable[[], object]]] = [
        (sig, stop) for sig in STOP_SIGNALS
    ]
    if RELOAD_SIGNAL is not None:
        handlers.append((RELOAD_SIGNAL, reload or _ignore_reload))
    installed: list[signal.Signals] = []
    for sig, handler in handlers:
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
