"""One line for a socket that cannot be bound, naming the address, the cause and the fix."""

from __future__ import annotations

import errno

__all__ = ["bind_failure"]


def bind_failure(address: str, exc: OSError, *, port_option: str) -> str:
    """``cannot listen on HOST:PORT: <cause>: <fix>``.

    ``exc`` is what the bind raised; aiohttp's repeats the address and the cause in its text,
    so only its errno is used where it is known. ``port_option`` names where the port is set
    (``--port or server.port``).
    """
    if exc.errno == errno.EADDRINUSE:
        cause = (
            "the address is already in use: stop the other process listening there, or "
            f"choose another port ({port_option})"
        )
    elif exc.errno in (errno.EACCES, errno.EPERM):
        cause = (
            "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE, or choose "
            f"another port ({port_option})"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        cause = "this machine has no such address: listen on one of its own, or on 0.0.0.0"
    else:
        cause = exc.strerror or str(exc)
    return f"cannot listen on {address}: {cause}"
