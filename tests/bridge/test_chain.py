"""The hybrid relay pattern end to end with real processes.

client (this test) → ``bridge -L`` ingress process → ``serve`` relay process → ``bridge -R`` edge
agent process → destination server (this test). Every process is started here, waited for by
its readiness line, and stopped by its PID in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, TlsFiles

CLI = [sys.executable, "-m", "hybridrelay"]
LISTENING = "listening on "


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def wait_for(self, text: str, seconds: float = 20.0) -> str:
        """The first output line (seen so far or later) that contains ``text``."""
        async with asyncio.timeout(seconds):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                if self.process.returncode is not None:
                    raise AssertionError(f"process exited: {''.join(self.lines)[-2000:]}")
                await asyncio.sleep(0.02)

    async def wait_for_count(self, text: str, count: int, seconds: float = 30.0) -> None:
        """Until ``count`` output lines contain ``text``."""
        async with asyncio.timeout(seconds):
            while sum(text in line for line in self.lines) < count:
                if self.process.returncode is not None:
                    raise AssertionError(f"process exited: {''.join(self.lines)[-2000:]}")
                await asyncio.sleep(0.02)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        async with asyncio.timeout(20):
            code = await self.process.wait()
        if self.reader is not None:
            await self.reader
        return code


async def spawn(*args: str, env: dict[str, str] | None = None) -> Proc:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    proc = Proc(process)

    async def read() -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            proc.lines.append(line.decode(errors="replace"))

    proc.reader = asyncio.create_task(read())
    return proc


@dataclass
class Chain:
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    relay_port: int = 0
    relay: Proc | None = None
    tls: TlsFiles | None = None
    relay_loop: str = "asyncio"

    @property
    def connection_string(self) -> str:
        scheme = "sb" if self.tls else "ws"
        return (
            f"Endpoint={scheme}://127.0.0.1:{self.relay_port}/;"
            f"SharedAccessKeyName={ROOT_KEY_NAME};SharedAccessKey={ROOT_KEY}"
        )

    async def start_relay(self, port: int = 0) -> None:
        config = self.tmp / "relay.yaml"
        if self.tls:
            tls = f"{{cert: {self.tls.cert_file}, key: {self.tls.key_file}}}"
            server = f"server: {{host: 127.0.0.1, tls: {tls}}}\n"
        else:
            server = "server: {host: 127.0.0.1, plaintext: true}\n"
        config.write_text(
            server + "limits: {keep_alive_interval: 2}\n"
            "namespace:\n"
            "  authorization_rules:\n"
            f"    - {{name: {ROOT_KEY_NAME}, primary_key: {ROOT_KEY},"
            " rights: [Listen, Send, Manage]}\n"
            "  hybrid_connections: [{name: hc}, {name: hc2}]\n",
            encoding="utf-8",
        )
        self.relay = await spawn(
            *CLI, "--loop", self.relay_loop, "serve", "--config", str(config), "--port", str(port)
        )
        self.procs.append(self.relay)
        line = await self.relay.wait_for("relay listening on ws")
        self.relay_port = int(line.strip().rsplit(":", 1)[1])

    async def stop_all(self) -> None:
        """Kill what is still running (newest first) and print what each process said
        (pytest shows it when the test fails)."""
        for proc in reversed(self.procs):
            if proc.process.returncode is None:
                proc.process.kill()
                await proc.process.wait()
            if proc.reader is not None:
                await proc.reader
            sys.stdout.write(
                f"--- {' '.join(proc.process.args if hasattr(proc.process, 'args') else [])}\n"
            )
            sys.stdout.write("".join(proc.lines[-60:]))

    async def bridge(self, *args: str, ready: str = "all forwards are up") -> Proc:
        tls = ("--ca-file", self.tls.ca_file) if self.tls else ()
        proc = await spawn(*CLI, "bridge", "-x", self.connection_string, "-a", "2", *tls, *args)
        self.procs.append(proc)
        await proc.wait_for(ready)
        return proc

    async def ingress(self, spec: str) -> tuple[Proc, int]:
        proc = await self.bridge("-L", spec)
        line = await proc.wait_for(LISTENING)
        return proc, int(line.strip().rsplit(":", 1)[1].split("/")[0])


@pytest.fixture
async def chain(tmp_path: Path) -> AsyncIterator[Chain]:
    state = Chain(tmp_path)
    await state.start_relay()
    try:
        yield state
    finally:
        await state.stop_all()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    finally:
        writer.close()


def pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def send() -> None:
            # A refused connection may be closed before our EOF goes out (ENOTCONN, reset):
            # what comes back is the check.
            with contextlib.suppress(OSError):
                for i in range(0, len(payload), 65536):
                    writer.write(payload[i : i + 65536])
                    await writer.drain()
                writer.write_eof()

        sender = asyncio.create_task(send())
        received = bytearray()
        while data := await reader.read(262144):
            received += data
        await sender
        return bytes(received)
    finally:
        writer.close()


async def test_64_mib_each_way_through_the_chain(chain: Chain) -> None:
    size = 64 * 1024 * 1024
    upload, download = pattern(size, 1), pattern(size, 2)
    digest: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            for i in range(0, size, 65536):
                writer.write(download[i : i + 65536])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        hasher = hashlib.sha256()
        while data := await reader.read(262144):
            hasher.update(data)
        digest.set_result(hasher.hexdigest())
        await sender
        writer.close()

    async with tcp_server(destination) as dest_port:
        await chain.bridge("-R", f"hc:127.0.0.1:{dest_port}")
        _, port = await chain.ingress("127.0.0.1:0:hc")
        async with asyncio.timeout(120):
            received = await roundtrip(port, upload)
            # The download can end before the upload's EOF has reached the destination.
            uploaded = await digest
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(download).hexdigest()
    assert uploaded == hashlib.sha256(upload).hexdigest()


async def test_200_concurrent_connections_and_half_close(chain: Chain) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF crosses the relay
        writer.write(b"got " + str(len(request)).encode() + b" " + hashlib.sha256(request).digest())
        await writer.drain()
        writer.close()

    async with tcp_server(reply_after_eof) as dest_port:
        await chain.bridge("-R", f"hc:127.0.0.1:{dest_port}")
        _, port = await chain.ingress("127.0.0.1:0:hc")

        async def one(i: int) -> None:
            payload = pattern(1000 + i * 97, i)
            reply = await roundtrip(port, payload)
            assert reply == f"got {len(payload)} ".encode() + hashlib.sha256(payload).digest()

        async with asyncio.timeout(90):
            await asyncio.gather(*(one(i) for i in range(200)))


async def test_udp_flows(chain: Chain) -> None:
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(b"echo:" + data, addr)

    transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    try:
        dest_port = transport.get_extra_info("sockname")[1]
        await chain.bridge("-R", f"hc:127.0.0.1:{dest_port}/udp")
        _, port = await chain.ingress("127.0.0.1:0/udp:hc")

        async def flow(i: int) -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            try:
                for j in range(5):
                    message = f"flow {i} datagram {j}".encode() * (1 + j)
                    for _attempt in range(20):  # UDP: the first datagram may race the flow setup
                        await loop.sock_sendall(sock, message)
                        try:
                            async with asyncio.timeout(1):
                                reply = await loop.sock_recv(sock, 65536)
                            break
                        except TimeoutError:
                            continue
                    else:
                        raise AssertionError(f"flow {i}: no echo")
                    assert reply == b"echo:" + message
            finally:
                sock.close()

        async with asyncio.timeout(60):
            await asyncio.gather(*(flow(i) for i in range(20)))
    finally:
        transport.close()


async def test_unix_sockets_on_both_sides(chain: Chain, tmp_path: Path) -> None:
    dest_path = str(tmp_path / "dest.sock")
    ingress_path = str(tmp_path / "ingress.sock")
    server = await asyncio.start_unix_server(echo, dest_path)
    try:
        await chain.bridge("-R", f"hc:unix:{dest_path}")
        await chain.bridge("-L", f"unix:{ingress_path}:hc")
        reader, writer = await asyncio.open_unix_connection(ingress_path)
        writer.write(b"over unix sockets")
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await reader.read() == b"over unix sockets"
        writer.close()
    finally:
        server.close()


async def test_relay_restart_and_agent_failover(chain: Chain) -> None:
    async with tcp_server(echo) as dest_port:
        edge_a = await chain.bridge("-R", f"hc:127.0.0.1:{dest_port}")
        edge_b = await chain.bridge("-R", f"hc:127.0.0.1:{dest_port}")
        _, port = await chain.ingress("127.0.0.1:0:hc")
        assert await roundtrip(port, b"before") == b"before"

        # The relay restarts on the same port: agents reconnect, new connections work.
        assert chain.relay is not None
        await chain.relay.stop(signal.SIGKILL)
        await chain.start_relay(port=chain.relay_port)
        async with asyncio.timeout(60):
            while True:
                try:
                    if await roundtrip(port, b"after restart") == b"after restart":
                        break
                except OSError:
                    pass
                await asyncio.sleep(0.2)

        # Both agents are back on the new relay (each in its own backoff) ...
        assert chain.relay is not None
        await chain.relay.wait_for_count("online on 'hc'", 2, seconds=60)
        # ... then one of them dies: new connections keep succeeding through the other.
        await edge_a.stop(signal.SIGKILL)
        results = []
        async with asyncio.timeout(60):
            for i in range(20):
                payload = f"after failover {i}".encode()
                results.append(await roundtrip(port, payload) == payload)
        # SIGKILL closes the dead agent's sockets, the relay drops its control channel at once,
        # and a sender already offered to it is offered to the survivor: none may fail.
        assert all(results), results
        assert edge_b.process.returncode is None


async def test_refusing_destination_and_unconfigured_route(chain: Chain) -> None:
    # Bound and never listened on, and held for the test: the edge's dial is refused, and no
    # other process can take the port meanwhile.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    try:
        await chain.bridge("-R", f"hc:127.0.0.1:{refused_port}", "-R", "hc2:web/127.0.0.1:1")
        _, port = await chain.ingress("127.0.0.1:0:hc")
        async with asyncio.timeout(10):
            assert await roundtrip(port, b"hello?") == b""  # a prompt close, no hang
    finally:
        closed.close()

    # A logical port name the edge does not have: the edge refuses; it never dials anything.
    _, other = await chain.ingress("127.0.0.1:0/ssh:hc2")
    async with asyncio.timeout(10):
        assert await roundtrip(other, b"let me in") == b""


TINYPROXY = shutil.which("tinyproxy") or next(
    (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if Path(p).exists()), None
)


@pytest.mark.skipif(TINYPROXY is None, reason="tinyproxy is not installed (.ci/run installs it)")
async def test_edge_agent_through_a_real_http_connect_proxy(
    chain: Chain, tmp_path: Path, tls_files: TlsFiles
) -> None:
    # Agents reach a wss:// relay through corporate proxies with CONNECT: restart it with TLS.
    assert chain.relay is not None
    await chain.relay.stop()
    chain.tls = tls_files
    await chain.start_relay()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    proxy_port = probe.getsockname()[1]
    probe.close()
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        f'Port {proxy_port}\nListen 127.0.0.1\nTimeout 600\nLogFile "{log}"\nLogLevel Connect\n'
        "MaxClients 50\nAllow 127.0.0.1\nConnectPort " + str(chain.relay_port) + "\n"
        "BasicAuth agent s3cret\n",
        encoding="utf-8",
    )
    assert TINYPROXY is not None
    proxy = await spawn(TINYPROXY, "-d", "-c", str(conf))
    chain.procs.append(proxy)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", proxy_port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        async with tcp_server(echo) as dest_port:
            await chain.bridge(
                "-R",
                f"hc:127.0.0.1:{dest_port}",
                "--proxy",
                f"http://agent:s3cret@127.0.0.1:{proxy_port}",
            )
            _, port = await chain.ingress("127.0.0.1:0:hc")
            assert await roundtrip(port, b"via the proxy") == b"via the proxy"
        assert "CONNECT" in log.read_text(encoding="utf-8", errors="replace")
    finally:
        await proxy.stop()


async def test_clean_shutdown_exits_zero(chain: Chain) -> None:
    async with tcp_server(echo) as dest_port:
        edge = await chain.bridge("-R", f"hc:127.0.0.1:{dest_port}")
        ingress, port = await chain.ingress("127.0.0.1:0:hc")
        assert await roundtrip(port, b"x") == b"x"
        assert await ingress.stop(signal.SIGINT) == 0
        assert await edge.stop(signal.SIGTERM) == 0
    assert chain.relay is not None
    assert await chain.relay.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_bridge_runs_on_uvloop(tmp_path: Path, tls_files: TlsFiles, tls: bool) -> None:
    """``--loop uvloop``: uvloop's transports are not asyncio.Transport subclasses, and the
    bridge must not care; its own client sockets (BufferedProtocol, D11) run on uvloop's TCP
    and TLS transports as on asyncio's."""
    pytest.importorskip("uvloop", reason="uvloop is an optional event loop")
    chain = Chain(tmp_path, tls=tls_files if tls else None)
    try:
        await chain.start_relay()
        async with tcp_server(echo) as dest_port:
            common: tuple[str, ...] = ("-x", chain.connection_string)
            if tls:
                common += ("--ca-file", tls_files.ca_file)
            edge = await spawn(
                *CLI,
                "--loop",
                "uvloop",
                "bridge",
                *common,
                "-R",
                f"hc:127.0.0.1:{dest_port}",
            )
            chain.procs.append(edge)
            await edge.wait_for("all forwards are up")
            ingress = await spawn(
                *CLI, "--loop", "uvloop", "bridge", *common, "-L", "127.0.0.1:0:hc"
            )
            chain.procs.append(ingress)
            line = await ingress.wait_for(LISTENING)
            port = int(line.strip().rsplit(":", 1)[1])
            payload = pattern(3 * 1024 * 1024, 7)
            async with asyncio.timeout(30):
                results = await asyncio.gather(*(roundtrip(port, payload) for _ in range(3)))
            assert all(result == payload for result in results)
    finally:
        await chain.stop_all()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_relay_runs_on_uvloop(tmp_path: Path, tls_files: TlsFiles, tls: bool) -> None:
    """The relay's splice takes transports over (set_protocol, a BufferedProtocol): uvloop's
    TCP and TLS transports must carry it as asyncio's do."""
    pytest.importorskip("uvloop", reason="uvloop is an optional event loop")
    state = Chain(tmp_path, tls=tls_files if tls else None, relay_loop="uvloop")
    try:
        await state.start_relay()
        async with tcp_server(echo) as dest_port:
            await state.bridge("-R", f"hc:127.0.0.1:{dest_port}")
            _, port = await state.ingress("127.0.0.1:0:hc")
            payload = pattern(8 * 1024 * 1024, 3)
            async with asyncio.timeout(30):
                results = await asyncio.gather(*(roundtrip(port, payload) for _ in range(4)))
            assert all(result == payload for result in results)
    finally:
        await state.stop_all()
