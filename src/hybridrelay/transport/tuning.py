"""Process-wide tuning for the processes we run (relay, bridge, serve-app).

Both settings are process-wide (a class attribute of the standard library, the C allocator),
so the command line applies them to its own processes, not on import: an application
embedding the SDK decides for itself.

**TLS read buffer.** CPython's asyncio TLS layer gives every TLS connection a zero-filled read
buffer of ``SSLProtocol.max_size`` bytes (256 KiB). A relayed connection has two TLS sockets on
the relay and one on each bridge, so with 10,000 connections that buffer alone is ~5 GiB on the
relay. Measured on this machine (docs/PERFORMANCE.md): 64 KiB keeps bulk throughput within
noise of 256 KiB while cutting memory per client+server connection pair from 580 to 196 KiB.

**Allocator thresholds (glibc).** asyncio's socket transports read with
``sock.recv(256 KiB)`` and aiohttp's protocols are fed that way: every read allocates a
256 KiB bytes object and shrinks it to what arrived. glibc serves allocations above its
mmap threshold (128 KiB) with ``mmap`` and shrinks them with ``mremap``, and returns freed heap
tops above its trim threshold with ``brk``: three system calls and fresh page faults *per
read*. Measured on this machine (``docs/PERFORMANCE.md``): a 1 KiB send + ``recv(256 KiB)``
on a socket pair costs 17 us instead of 2.1 us (``recv(64 KiB)``); raising the mmap threshold to
1 MiB and the trim threshold to 8 MiB brings it to 2.1 us, at the price of up to 8 MiB of
freed heap kept for reuse.
"""

from __future__ import annotations

import asyncio.sslproto
import ctypes
import ctypes.util
import platform

__all__ = [
    "DEFAULT_TLS_READ_BUFFER",
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "set_malloc_thresholds",
    "set_tls_read_buffer",
]

DEFAULT_TLS_READ_BUFFER = 64 * 1024
MMAP_THRESHOLD = 1024 * 1024
TRIM_THRESHOLD = 8 * 1024 * 1024

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


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


def set_malloc_thresholds(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring).

    Returns False, changing nothing, where the C library is not glibc (musl, macOS, Windows)
    or refuses the values.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either turns off glibc's dynamic adjustment.
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
