"""The upstream HTTP server of scenario (6): a raw asyncio HTTP/1.1 server, keep-alive on.

``python -m bench.httpdest [--port 0]`` prints ``httpdest listening on 127.0.0.1:PORT`` when
ready. Every request (any method, any path) is answered ``200`` with a fixed 13-byte
``text/plain`` body and a ``Content-Length``; the connection stays open unless the request
says ``Connection: close`` (or is HTTP/1.0 without ``keep-alive``). Request bodies with a
``Content-Length`` are read and discarded; chunked requests are not supported (the bench sends
``GET`` only). Pipelined requests are answered in order.
"""

from __future__ import annotations

import asyncio
from typing import cast

from bench.common import serve_until_signalled

__all__ = ["BODY", "HttpDestProtocol", "main"]

BODY = b"hello, relay\n"
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
_RESPONSE_CLOSE = _RESPONSE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
_MAX_HEAD = 64 * 1024


class HttpDestProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.skip = 0  # body bytes of the current request still to discard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.buf += data
        out = bytearray()
        close = False
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                del self.buf[:n]
                self.skip -= n
                if self.skip:
                    break
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEAD:
                    transport.abort()
                    return
                break
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    self.skip = int(line[15:].strip() or b"0")
            close = b"connection: close" in head or (
                head.split(b"\r\n", 1)[0].endswith(b"http/1.0") and b"keep-alive" not in head
            )
            out += _RESPONSE_CLOSE if close else _RESPONSE
            if close:
                break
        if out:
            transport.write(out)
        if close:
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None


def main() -> None:
    serve_until_signalled("httpdest", HttpDestProtocol)


if __name__ == "__main__":
    main()
