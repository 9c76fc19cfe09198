"""Which event loop our processes run on: asyncio's own, or uvloop (docs/DECISIONS.md D7).

The command line picks one for its own process (``--loop``); an application embedding the SDK
picks its own. With uvloop, :func:`loop_factory` gives a loop with one fix:

**uvloop does not take ownership of a socket passed to ``create_connection(sock=...)`` when
the call fails** (MagicStack/uvloop issue 738; aiohttp issue 10506 waits on it). libuv has
already closed the descriptor, but the Python socket object still holds its number, and its
finalizer closes that number again later, by then most likely another connection's. aiohttp
passes ``sock=`` for every connection it opens (happy eyeballs), so a refused TLS handshake or
a connect timeout on a control channel would, some time later, close an unrelated tunnel.
Measured here before the fix: each TLS version refusal left one such socket object. The loop
below detaches the socket object when the call fails (asyncio's loop closes it instead, so
there it is already detached).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["LOOPS", "UvloopMissingError", "default_loop", "loop_factory", "use_event_loop"]

#: The names ``--loop`` takes.
LOOPS = ("asyncio", "uvloop")


class UvloopMissingError(RuntimeError):
    """uvloop was asked for and is not installed."""


def default_loop() -> str:
    """uvloop where it is installed, else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


@functools.cache  # one Loop class per process, however often a loop is asked for
def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function making a new event loop of kind ``name`` (one of :data:`LOOPS`).

    Raises:
        ValueError: an unknown name.
        UvloopMissingError: ``uvloop`` and it is not installed.
    """
    if name == "asyncio":
        return asyncio.new_event_loop
    if name != "uvloop":
        raise ValueError(f"unknown event loop {name!r} (asyncio or uvloop)")
    try:
        import uvloop
    except ImportError:
        raise UvloopMissingError("uvloop is not installed (pip install uvloop)") from None

    class Loop(uvloop.Loop):
        async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
            sock: socket.socket | None = kwargs.get("sock")
            try:
                return await super().create_connection(*args, **kwargs)
            except BaseException:
                if sock is not None and sock.fileno() != -1:
                    sock.detach()  # libuv closed the descriptor: never close its number again
                raise

    return Loop


def use_event_loop(name: str) -> None:
    """Make the ``asyncio.run`` calls of this process use event loops of kind ``name``.

    Raises:
        ValueError: an unknown name.
        UvloopMissingError: ``uvloop`` and it is not installed.
    """
    factory = loop_factory(name)
    if name == "asyncio":
        return

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return factory()

    asyncio.set_event_loop_policy(Policy())
