"""One line for a socket that cannot be bound, naming the address, the cause and the fix.

Shared by the relay, the bridge and the metrics endpoint (outside the SDK's transport, which
the bridge may not reach into: tests/test_architecture.py)."""

from __future__ import annotations

import errno

__all__ = ["bind_cause", "bind_failure"]


def bind_cause(exc: OSError) -> str:
    """What went wrong, in words: aiohttp's and asyncio's bind errors repeat the address in
    their text (``error while attempting to bind on address ('127.0.0.1', 9400): address
    already in use``), so their errno is used where it is known."""
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address"
    return exc.strerror or str(exc)


def bind_failure(address: str, exc: OSError, *, port_option: str) -> str:
    """``cannot listen on HOST:PORT: <cause>: <fix>``; ``port_option`` names where the port
    is set (``--port``)."""
    cause = bind_cause(exc)
    if exc.errno == errno.EADDRINUSE:
        cause += f": stop the other process listening there, or choose another port ({port_option})"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        cause += (
            ": ports below 1024 need root or CAP_NET_BIND_SERVICE, or choose another port "
            f"({port_option})"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        cause += ": listen on one of its own addresses, or on 0.0.0.0"
    return f"cannot listen on {address}: {cause}"
