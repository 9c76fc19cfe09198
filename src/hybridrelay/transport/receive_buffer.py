"""One receive buffer per thread, shared by every :class:`asyncio.BufferedProtocol` of ours.

A transport calls ``get_buffer`` and then ``buffer_updated`` synchronously, and our protocols
copy out what they keep before ``buffer_updated`` returns, so one buffer serves every
connection of an event loop: an idle connection holds no receive buffer at all (with
``asyncio.Protocol`` each read allocates a fresh ``bytes`` of up to 256 KiB instead).
A memoryview, because asyncio's TLS transport reads into slices of it.
"""

from __future__ import annotations

import threading

__all__ = ["RECEIVE_BUFFER_SIZE", "receive_buffer"]

RECEIVE_BUFFER_SIZE = 256 * 1024


class _ReceiveBuffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(RECEIVE_BUFFER_SIZE))


_buffers = _ReceiveBuffer()


def receive_buffer() -> memoryview:
    """This thread's buffer."""
    return _buffers.view
