"""The relay alone, through the SDK: sender process → relay process → listener process.

``python -m bench.experiments.sdk_hop [--tls] [--connections 200] [--megabytes 512]``

Measures (1) connect-to-first-byte: ``create_connection()`` + 1 byte echoed back, sequential
connections, p50/p99; (2) single-stream throughput: one connection, the listener streams
``--megabytes`` to the sender. Baseline in the same run: the same two measurements over a plain
TCP connection to an echo/stream server in the listener process (no relay, no WebSocket).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "bench-key-0123456789abcdefghijklmnop"
CHUNK = 64 * 1024


def _cs(port: int, tls: bool) -> str:
    scheme = "sb" if tls else "ws"
    return (
        f"Endpoint={scheme}://127.0.0.1:{port}/;SharedAccessKeyName=root;"
        f"SharedAccessKey={KEY};EntityPath=hop"
    )


async def listener_main(cs: str, ca_file: str | None, ready_port_file: str) -> None:
    from hybridrelay import HybridConnectionListener, HybridConnectionStream

    payload = os.urandom(CHUNK)

    async def serve_stream(stream: HybridConnectionStream) -> None:
        async with stream:
            first = await stream.read(1)
            if first == b"e":  # echo one byte
                await stream.write(first)
            elif first == b"s":  # stream N MiB
                size = int((await stream.read(16)).decode())
                for _ in range(size * 1024 * 1024 // CHUNK):
                    await stream.write(payload)
                await stream.write_eof()
                await stream.read()

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readexactly(1)
        if first == b"e":
            writer.write(first)
        else:
            size = int((await reader.readexactly(16)).decode())
            for _ in range(size * 1024 * 1024 // CHUNK):
                writer.write(payload)
                await writer.drain()
            writer.write_eof()
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(tcp, "127.0.0.1", 0)
    port = str(server.sockets[0].getsockname()[1])
    await asyncio.to_thread(Path(ready_port_file).write_text, port)
    tasks: set[asyncio.Task[None]] = set()
    async with HybridConnectionListener.from_connection_string(cs, ca_file=ca_file) as listener:
        await asyncio.to_thread(Path(ready_port_file + ".ready").write_text, "1")
        async for stream in listener:
            task = asyncio.create_task(serve_stream(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def sender_main(cs: str, ca_file: str | None, tcp_port: int, n: int, mib: int) -> None:
    from hybridrelay import HybridConnectionClient

    async with HybridConnectionClient.from_connection_string(cs, ca_file=ca_file) as client:
        relay_lat, tcp_lat = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            async with await client.create_connection() as stream:
                await stream.write(b"e")
                assert await stream.read(1) == b"e"
                relay_lat.append((time.perf_counter() - t0) * 1000)
                await stream.write_eof()
            t0 = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
            writer.write(b"e")
            assert await reader.readexactly(1) == b"e"
            tcp_lat.append((time.perf_counter() - t0) * 1000)
            writer.write_eof()
            writer.close()

        def pct(values: list[float], q: float) -> float:
            return statistics.quantiles(values, n=100)[int(q) - 1]

        async with await client.create_connection() as stream:
            await stream.write(b"s" + str(mib).encode().rjust(16))
            t0 = time.perf_counter()
            got = 0
            while data := await stream.read(1 << 20):
                got += len(data)
            relay_mbs = got / (time.perf_counter() - t0) / 1e6
            await stream.write_eof()
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
        writer.write(b"s" + str(mib).encode().rjust(16))
        t0 = time.perf_counter()
        got = 0
        while data := await reader.read(1 << 20):
            got += len(data)
        tcp_mbs = got / (time.perf_counter() - t0) / 1e6
        writer.write_eof()
        writer.close()
    print("| path | connect-to-first-byte p50 / p99, ms | single stream MB/s |")
    print("|---|---|---|")
    print(f"| direct TCP | {pct(tcp_lat, 50):.2f} / {pct(tcp_lat, 99):.2f} | {tcp_mbs:,.0f} |")
    print(
        f"| SDK → relay → SDK | {pct(relay_lat, 50):.2f} / {pct(relay_lat, 99):.2f} "
        f"| {relay_mbs:,.0f} ({relay_mbs / tcp_mbs:.2f}× direct) |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--role", choices=["run", "listener", "sender"], default="run")
    parser.add_argument("--cs")
    parser.add_argument("--ca-file")
    parser.add_argument("--port-file")
    parser.add_argument("--tcp-port", type=int)
    args = parser.parse_args()
    if args.role == "listener":
        asyncio.run(listener_main(args.cs, args.ca_file, args.port_file))
        return 0
    if args.role == "sender":
        asyncio.run(
            sender_main(args.cs, args.ca_file, args.tcp_port, args.connections, args.megabytes)
        )
        return 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "relay.yaml")
        ca_file: str | None = None
        server = "server: {host: 127.0.0.1, port: 0, plaintext: true}\n"
        if args.tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1")
            ca_file = str(Path(tmp, "ca.pem"))
            ca.cert_pem.write_to_path(ca_file)
            cert.private_key_and_cert_chain_pem.write_to_path(str(Path(tmp, "both.pem")))
            server = (
                f"server: {{host: 127.0.0.1, port: 0, tls: {{cert: {tmp}/both.pem, "
                f"key: {tmp}/both.pem}}}}\n"
            )
        config.write_text(
            server + "namespace:\n  authorization_rules:\n"
            f"    - {{name: root, primary_key: {KEY}, rights: [Listen, Send]}}\n"
            "  hybrid_connections: [{name: hop}]\n"
        )
        procs: list[subprocess.Popen[str]] = []
        try:
            relay = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hybridrelay",
                    "serve",
                    "--config",
                    str(config),
                    "--log-level",
                    "warning",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(relay)
            assert relay.stdout is not None
            line = relay.stdout.readline()
            port = int(line.strip().rsplit(":", 1)[1])
            cs = _cs(port, args.tls)
            port_file = str(Path(tmp, "port"))
            extra = ["--ca-file", ca_file] if ca_file else []
            me = [sys.executable, "-m", "bench.experiments.sdk_hop", "--cs", cs, *extra]
            procs.append(
                subprocess.Popen([*me, "--role", "listener", "--port-file", port_file], text=True)
            )
            deadline = time.monotonic() + 20
            while not Path(port_file + ".ready").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("listener did not come up")
                time.sleep(0.05)
            tcp_port = int(Path(port_file).read_text())
            sender = subprocess.run(
                [
                    *me,
                    "--role",
                    "sender",
                    "--tcp-port",
                    str(tcp_port),
                    "--connections",
                    str(args.connections),
                    "--megabytes",
                    str(args.megabytes),
                ],
                timeout=300,
                check=False,
            )
            return sender.returncode
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())
