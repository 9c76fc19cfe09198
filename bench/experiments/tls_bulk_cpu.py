"""CPU per GB of bulk TLS on asyncio's loop: the shared TLS read buffer (D16) against the stdlib's.

``python -m bench.experiments.tls_bulk_cpu [--stock-tls-buffer] [--mib N]``: one process, a
TLS server on asyncio's event loop counting what arrives, and a client sending ``--mib`` MiB
in 64 KiB writes over one connection. Prints MB/s and CPU-seconds per GB (both ends'
encryption and decryption: the read path is what differs). CPU time per GB is the number to
compare on a shared machine: wall-clock throughput moves with whatever else runs there.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import json
import ssl
import time

import trustme

from hybridrelay.transport import tuning


class _Count(asyncio.Protocol):
    def __init__(self, total: int, done: asyncio.Future[None]) -> None:
        self.left = total
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)


async def run(total: int) -> dict[str, float]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    server = await loop.create_server(lambda: _Count(total, done), "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
    chunk = b"x" * (64 * 1024)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(total // len(chunk)):
        writer.write(chunk)
        await writer.drain()
    await asyncio.wait_for(done, 120)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    writer.close()
    server.close()
    return {"MBps": round(total / wall / 1e6), "cpu_s_per_GB": round(cpu / (total / 1e9), 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stock-tls-buffer", action="store_true")
    p.add_argument("--mib", type=int, default=512)
    args = p.parse_args()
    if args.stock_tls_buffer:
        asyncio.sslproto.SSLProtocol.max_size = tuning.DEFAULT_TLS_READ_BUFFER
    else:
        tuning.set_tls_read_buffer()
    tuning.set_malloc_thresholds()
    result = asyncio.run(run(args.mib * 1024 * 1024))
    print(json.dumps({"stock_tls_buffer": args.stock_tls_buffer, **result}))


if __name__ == "__main__":
    main()
