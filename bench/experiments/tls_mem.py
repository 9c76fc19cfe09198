"""Memory of N asyncio TLS connections (client + server in one process), default vs 16 KiB
``SSLProtocol.max_size``: ``python -m bench.experiments.tls_mem [BUFSIZE]``."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
import sys
from pathlib import Path

import trustme


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def measure(n: int, bufsize: int) -> float:
    if bufsize:
        asyncio.sslproto.SSLProtocol.max_size = bufsize
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    held: list[asyncio.StreamWriter] = []

    async def handler(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    for _ in range(20):  # warm-up
        held.append((await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx))[1])
    await asyncio.sleep(0.2)
    before = _rss_kib()
    for _ in range(n):
        held.append((await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx))[1])
    await asyncio.sleep(0.3)
    return (_rss_kib() - before) / n


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    per = asyncio.run(measure(500, size))
    print(f"max_size={size or 'default'}: {per:.1f} KiB per TLS connection pair")
