"""What one asyncio TLS connection set-up costs on this machine (for target (2) with TLS).

``python -m bench.experiments.tls_handshake`` opens 300 sequential connections to an asyncio
server in the same process, plain TCP and TLS (trustme certificate, the default client
context: TLS 1.3), and prints the p50 of connect → first byte from the server. The full
pattern with TLS does two such set-ups one after the other (ingress → relay, then agent →
relay) before the first byte can cross.
"""

from __future__ import annotations

import asyncio
import ssl
import statistics
import time

import trustme

COUNT = 300


async def _first_byte(port: int, ctx: ssl.SSLContext | None) -> float:
    started = time.perf_counter()
    if ctx is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
        )
    await reader.readexactly(1)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def main() -> None:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x")
        await writer.drain()
        writer.close()

    for label, server_ssl, client_ssl in (
        ("plain TCP", None, None),
        ("TLS", server_ctx, client_ctx),
    ):
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ssl)
        port = server.sockets[0].getsockname()[1]
        times = [await _first_byte(port, client_ssl) for _ in range(COUNT)]
        server.close()
        await server.wait_closed()
        print(f"{label:10s} connect -> first byte p50 {statistics.median(times) * 1e3:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
