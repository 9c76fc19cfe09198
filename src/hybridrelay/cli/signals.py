"""SIGINT and SIGTERM stop our processes gracefully (serve, bridge and serve-app alike)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

__all__ = ["STOP_SIGNALS", "stop_on_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], object]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM call ``stop`` (which starts the graceful shutdown)
    on the running loop; the previous handlers come back after.

    Where the loop cannot take signal handlers (not the main thread, a platform without
    them) the signals keep their default behaviour.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
