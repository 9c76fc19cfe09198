"""Process-wide TLS tuning for the processes we run (relay, bridge, serve-app).

CPython's asyncio TLS layer gives every TLS connection a zero-filled read buffer of
``SSLProtocol.max_size`` bytes (256 KiB). A relayed connection has two TLS sockets on the relay
and one on each bridge, so with 10,000 connections that buffer alone is ~5 GiB on the relay.
Measured on this machine (docs/PERFORMANCE.md): 64 KiB keeps bulk throughput within noise of
256 KiB while cutting memory per client+server connection pair from 580 to 196 KiB.

It is a class attribute of the standard library, so it is set by the command line for its own
processes, not on import: an application embedding the SDK decides for itself.
"""

from __future__ import annotations

import asyncio.sslproto

__all__ = ["DEFAULT_TLS_READ_BUFFER", "set_tls_read_buffer"]

DEFAULT_TLS_READ_BUFFER = 64 * 1024


def set_tls_read_buffer(size: int = DEFAULT_TLS_READ_BUFFER) -> None:
    """Set the per-connection TLS read buffer of asyncio for this process.

    Raises:
        ValueError: ``size`` is below one TLS record (16 KiB).
    """
    if size < 16 * 1024:
        raise ValueError("the TLS read buffer must hold at least one 16 KiB TLS record")
    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is not None and hasattr(protocol, "max_size"):
        protocol.max_size = size
