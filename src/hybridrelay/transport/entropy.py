"""Random bytes for what a process makes many of per second, without a system call each.

``os.urandom`` is one ``getrandom`` system call per call: the relay made two per relayed HTTP
request (the tracking id, the rendezvous secret), each a point where the scheduler could run
the process it had just woken. An :class:`EntropyPool` hands out slices of one
``os.urandom`` batch, each used once: the same bytes the kernel's generator gives, so what is
made of them (a secret) is as unpredictable as if drawn one by one. ``next`` on the batch's
iterator is one step under the GIL, so threads never share a slice; a forked child draws a
batch of its own (``register_at_fork``).
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Iterator

__all__ = ["EntropyPool"]

#: Bytes drawn from the kernel at a time.
BATCH = 4096

_pools: weakref.WeakSet[EntropyPool] = weakref.WeakSet()


class EntropyPool:
    """Fresh ``size``-byte slices of ``os.urandom`` batches (see the module)."""

    def __init__(self, size: int) -> None:
        if not 0 < size <= BATCH:
            raise ValueError(f"a slice is 1 to {BATCH} bytes, not {size}")
        self._format = f"{size}s"
        self._slices: Iterator[tuple[bytes]] = iter(())
        _pools.add(self)

    def take(self) -> bytes:
        try:
            return next(self._slices)[0]
        except StopIteration:
            size = struct.calcsize(self._format)
            self._slices = struct.iter_unpack(self._format, os.urandom(BATCH - BATCH % size))
            return next(self._slices)[0]

    def _forget(self) -> None:
        self._slices = iter(())


def _forget_all() -> None:
    for pool in list(_pools):
        pool._forget()


os.register_at_fork(after_in_child=_forget_all)
