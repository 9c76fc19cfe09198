"""Where the memory of idle server-side TLS connections goes, as the relay holds them.

``python -m bench.experiments.tls_idle_mem [--loop asyncio|uvloop] [--malloc default|ours]
[--count N] [--plain] [--tracemalloc] [--stock-tls-buffer]``

This process is the server (on the chosen loop, with or without our glibc thresholds, D10);
a client subprocess on asyncio opens ``--count`` TLS connections, and on each sends a
~300-byte request and reads a ~200-byte answer (a WebSocket upgrade's size), then holds it
idle. The server reports, per connection: the VmRSS and anonymous-memory (smaps_rollup)
growth, glibc's heap in use and free (``mallinfo2``), and with ``--tracemalloc`` what Python's
allocators hold (raw allocations included: uvloop's SSL read buffer is ``PyMem_RawMalloc``),
so heap in use minus that is what OpenSSL and other C code hold.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import ctypes
import ctypes.util
import json
import ssl
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import trustme

REQUEST = b"G" * 300
ANSWER = b"A" * 200


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _mallinfo() -> dict[str, int]:
    fn = _libc().mallinfo2
    fn.restype = _Mallinfo2
    info = fn()
    # In use: small/arena chunks plus mmapped chunks; free: kept in the arenas.
    return {"heap_used": info.uordblks + info.hblkhd, "heap_free": info.fordblks}


def _memory() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) * 1024
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            out["anon"] = int(line.split()[1]) * 1024
    out.update(_mallinfo())
    if tracemalloc.is_tracing():
        out["python"] = tracemalloc.get_traced_memory()[0]
    return out


class _Answer(asyncio.Protocol):
    def __init__(self, held: list[asyncio.BaseTransport]) -> None:
        self.held = held
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.held.append(transport)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(REQUEST):
            self.got = -(10**9)
            self.transport.write(ANSWER)  # type: ignore[attr-defined]


async def _client(port: int, count: int, cafile: str | None) -> None:
    ctx: ssl.SSLContext | None = None
    if cafile is not None:
        ctx = ssl.create_default_context(cafile=cafile)
    held = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
            )
            writer.write(REQUEST)
            await reader.readexactly(len(ANSWER))
            held.append(writer)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 120)
    print("OPEN", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _open(client: list[str], count: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        *client, str(count), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 180)
    if line.strip() != b"OPEN":
        raise RuntimeError(f"client failed: {line!r}")
    await asyncio.sleep(1.0)  # let buffers settle, as bench/run.py does
    _OPEN.append(proc)


_OPEN: list[asyncio.subprocess.Process] = []


async def serve(args: argparse.Namespace) -> dict[str, Any]:
    held: list[asyncio.BaseTransport] = []
    ctx: ssl.SSLContext | None = None
    cafile: str | None = None
    tmp = tempfile.mkdtemp()
    if args.tls:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert.configure_cert(ctx)
        cafile = str(Path(tmp) / "ca.pem")
        ca.cert_pem.write_to_path(cafile)
    loop = asyncio.get_running_loop()
    if args.asyncio_tls and ctx is not None:
        # asyncio's TLS layer (with the shared read buffer) over this loop's TCP transports.
        tls = ctx

        def factory() -> asyncio.BaseProtocol:
            waiter = loop.create_future()  # set by the handshake; nobody waits on it
            return asyncio.sslproto.SSLProtocol(loop, _Answer(held), tls, waiter, server_side=True)

        server = await loop.create_server(factory, "127.0.0.1", 0)
    else:
        server = await loop.create_server(lambda: _Answer(held), "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    client = [sys.executable, "-m", "bench.experiments.tls_idle_mem", "--client", str(port)]
    if cafile:
        client += ["--cafile", cafile]
    await _open(client, 50)  # warm-up: first-use allocations out of the measurement
    before = _memory()
    await _open(client, args.count)
    after = _memory()
    for proc in _OPEN:
        assert proc.stdin is not None
        proc.stdin.write(b"x\n")
        await proc.wait()
    per = {k: round((after[k] - before[k]) / args.count / 1024, 1) for k in after}
    return {
        "loop": args.loop,
        "malloc": args.malloc,
        "tls": args.tls,
        "stock_tls_buffer": args.stock_tls_buffer,
        "asyncio_tls": args.asyncio_tls,
        "kib_per_conn": per,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--loop", default="uvloop", choices=("asyncio", "uvloop"))
    p.add_argument("--malloc", default="ours", choices=("default", "ours"))
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--plain", dest="tls", action="store_false")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument(
        "--stock-tls-buffer",
        action="store_true",
        help="asyncio: one 64 KiB read buffer per connection, as the stdlib does (before D16)",
    )
    p.add_argument(
        "--asyncio-tls",
        action="store_true",
        help="uvloop: TLS through asyncio's SSLProtocol (shared buffer) over uvloop's TCP",
    )
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cafile", help=argparse.SUPPRESS)
    p.add_argument("n", nargs="?", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        asyncio.run(_client(args.client, args.n, args.cafile))
        return
    from hybridrelay.transport import tuning
    from hybridrelay.transport.event_loop import use_event_loop

    if args.stock_tls_buffer:
        asyncio.sslproto.SSLProtocol.max_size = tuning.DEFAULT_TLS_READ_BUFFER
    else:
        tuning.set_tls_read_buffer()
    if args.malloc == "ours":
        tuning.set_malloc_thresholds()
    use_event_loop(args.loop)
    if args.tracemalloc:
        tracemalloc.start()
    print(json.dumps(asyncio.run(serve(args))))


if __name__ == "__main__":
    main()
