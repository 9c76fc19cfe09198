"""The destination server (what the edge agent forwards to): asyncio Protocols, no streams.

``python -m bench.dest [--port 0]`` prints ``dest listening on 127.0.0.1:PORT`` when ready.
The first byte a client sends picks the behaviour of the connection:

* ``E``: echo everything after it;
* ``D``: download: write ``CHUNK`` bytes as fast as the connection takes them, until closed;
* ``S``: sink: count bytes; at the client's EOF (half-close) answer the count as 8 bytes
  big-endian and close.
"""

from __future__ import annotations

import asyncio
from typing import cast

from bench.common import serve_until_signalled

__all__ = ["DestProtocol", "main"]

CHUNK = 256 * 1024
_PAYLOAD = bytes(CHUNK)


class DestProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = 0
        self.count = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=4 * CHUNK, low=CHUNK)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not self.mode:
            self.mode = data[0]
            data = data[1:]
            if self.mode == ord("D"):
                self._fill()
        if self.mode == ord("E"):
            if data:
                transport.write(data)
        elif self.mode == ord("S"):
            self.count += len(data)
        elif self.mode != ord("D"):
            transport.abort()

    def _fill(self) -> None:
        transport = self.transport
        while transport is not None and not self.paused and not transport.is_closing():
            transport.write(_PAYLOAD)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == ord("D"):
            self._fill()

    def eof_received(self) -> bool:
        if self.mode == ord("S") and self.transport is not None:
            self.transport.write(self.count.to_bytes(8, "big"))
        return False  # close after writing what is queued

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None


def main() -> None:
    serve_until_signalled("dest", DestProtocol)


if __name__ == "__main__":
    main()
