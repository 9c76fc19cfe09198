"""Process-wide tuning for the processes we run (relay, bridge, serve-app).

Both settings are process-wide (a class attribute of the standard library, the C allocator),
so the command line applies them to its own processes, not on import: an application
embedding the SDK decides for itself.

**TLS read buffer (asyncio's event loop).** CPython's asyncio TLS layer gives every TLS
connection its own zero-filled read buffer of ``SSLProtocol.max_size`` bytes (256 KiB), resident
for the connection's life. :func:`set_tls_read_buffer` sizes it (64 KiB: bulk throughput within
noise of 256 KiB, docs/DECISIONS.md D6) and makes every TLS connection of a thread read into
the one buffer the thread's spliced legs already share (:mod:`.receive_buffer`): the bytes
read are copied into the connection's incoming ``MemoryBIO`` before anything else runs, so no
connection keeps them. An idle TLS connection then holds no read buffer of its own: 89 -> 26
KiB per server-side connection (``python -m bench.experiments.tls_idle_mem --loop asyncio``),
176 -> 48 KiB per idle TLS tunnel on the relay (``HYBRIDRELAY_LOOP=asyncio``).

**uvloop** (our default loop, D7) has its own TLS layer, which these settings do not reach:
a 256 KiB read buffer per connection from ``malloc`` (not zero-filled, so only the pages reads
touch are resident: ~1 page), and no setting to change it. What an idle TLS connection costs
there is OpenSSL's own state (docs/DECISIONS.md D16).

**Allocator thresholds (glibc).** asyncio's socket transports read with
``sock.recv(256 KiB)`` and aiohttp's protocols are fed that way: every read allocates a
256 KiB bytes object and shrinks it to what arrived. glibc serves allocations above its
mmap threshold (128 KiB) with ``mmap`` and shrinks them with ``mremap``, and returns freed heap
tops above its trim threshold with ``brk``: three system calls and fresh page faults *per
read*. Measured on this machine (``docs/PERFORMANCE.md``): a 1 KiB send + ``recv(256 KiB)``
on a socket pair costs 17 us instead of 2.1 us (``recv(64 KiB)``); raising the mmap threshold to
1 MiB and the trim threshold to 8 MiB brings it to 2.1 us, at the price of up to 8 MiB of
freed heap kept for reuse.

**Garbage collector.** A relayed HTTP request allocates a few hundred container objects (its
message, context, task, headers), and some are alive when a collection runs: they reach the
oldest generation, whose collection then walks the whole heap, ~50,000 objects of modules and
their tables that never become garbage. :func:`freeze_startup_objects` moves what exists after
start-up out of the collector's sight (``gc.freeze``): a ``bridge -H`` under load spent
0.21-0.26 s in full collections per ~7 s run, 0.006-0.01 s frozen (docs/DECISIONS.md D26).
Garbage among the frozen objects is never collected; start-up leaves little.
"""

from __future__ import annotations

import asyncio.sslproto
import ctypes
import ctypes.util
import gc
import platform
from typing import Any

from hybridrelay.transport.receive_buffer import RECEIVE_BUFFER_SIZE, receive_buffer

__all__ = [
    "DEFAULT_TLS_READ_BUFFER",
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "SharedBufferSSLProtocol",
    "freeze_startup_objects",
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
    """Make asyncio's TLS connections of this process read through a shared ``size``-byte buffer.

    Replaces ``asyncio.sslproto.SSLProtocol`` (which asyncio's event loops look up when they
    make a TLS transport) with :class:`SharedBufferSSLProtocol`; calling it again only
    changes the size. uvloop's TLS transports are not affected (module docstring).

    Raises:
        ValueError: ``size`` is below one TLS record (16 KiB), or above the shared buffer.
    """
    if size < 16 * 1024:
        raise ValueError("the TLS read buffer must hold at least one 16 KiB TLS record")
    if size > RECEIVE_BUFFER_SIZE:
        raise ValueError(f"the TLS read buffer cannot exceed {RECEIVE_BUFFER_SIZE} bytes")
    asyncio.sslproto.SSLProtocol = SharedBufferSSLProtocol  # type: ignore[misc]
    SharedBufferSSLProtocol.max_size = size


class SharedBufferSSLProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol, reading into this thread's shared receive buffer.

    The transport calls ``get_buffer``, reads into it, and calls ``buffer_updated``, which
    first writes those bytes into the connection's incoming ``MemoryBIO`` (a copy); only
    then does OpenSSL decrypt, into the application's own buffer (for our spliced legs, the
    same shared buffer: by then the raw bytes are in the BIO). So the buffer is free again
    before any other connection can read. (The proactor loop of Windows reads into a buffer
    of its transport's own and feeds it to ``get_buffer`` the same way, synchronously.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Drop the private buffer the stdlib allocated (zero-filled, so resident): freed
        # here, it is reused by the next connection's, and no connection keeps one.
        self._ssl_buffer = self._ssl_buffer_view = receive_buffer()[: self.max_size]

    def get_buffer(self, n: int) -> memoryview:
        view = receive_buffer()[: self.max_size]
        self._ssl_buffer = self._ssl_buffer_view = view
        return view


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


def freeze_startup_objects() -> None:
    """Keep every object that exists now out of the garbage collector's walks (see the module
    docstring); call once start-up (imports, configuration) is done."""
    gc.collect()  # what start-up left as garbage goes first, not frozen with the rest
    gc.freeze()
