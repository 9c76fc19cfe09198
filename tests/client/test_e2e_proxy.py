"""Through an HTTP CONNECT proxy: a small one written here (it records what it saw), and
tinyproxy when it is installed."""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
from asyncio.subprocess import DEVNULL
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from hybridrelay.exceptions import RelayConnectionError
from tests.client.helpers import accept_one, make_client, open_listener
from tests.conftest import Relay


class ConnectProxy:
    """Accepts ``CONNECT host:port``, optionally demands basic auth, records what it saw."""

    def __init__(self, credentials: str | None) -> None:
        self.credentials = credentials
        self.tunnels: list[str] = []
        self.auth_headers: list[str | None] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            auth = headers.get("proxy-authorization")
            self.auth_headers.append(auth)
            expected = (
                "Basic " + base64.b64encode(self.credentials.encode()).decode()
                if self.credentials
                else None
            )
            if method != "CONNECT" or (expected is not None and auth != expected):
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                await writer.drain()
                return
            host, port = target.rsplit(":", 1)
            self.tunnels.append(target)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()

            async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with suppress(ConnectionError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._spawn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self.handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def test_listener_and_sender_through_proxy_with_basic_auth(tls_relay: Relay) -> None:
    proxy = ConnectProxy("user:p@ss")
    async with asyncio.timeout(20), proxy.running() as address:
        url = f"http://user:p%40ss@{address}"
        async with open_listener(tls_relay, proxy=url) as listener:
            async with make_client(tls_relay, proxy=url) as client:
                sender = await client.create_connection()
                stream = await accept_one(listener)
                await sender.write(b"through the proxy")
                assert await stream.read() == b"through the proxy"
                await asyncio.gather(sender.aclose(), stream.aclose())
        # control channel, sender, rendezvous: all three tunnelled
        assert len(proxy.tunnels) == 3
        assert all(target == f"127.0.0.1:{tls_relay.server.port}" for target in proxy.tunnels)


async def test_https_proxy_environment_is_honoured(
    tls_relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = ConnectProxy(None)
    async with asyncio.timeout(20), proxy.running() as address:
        monkeypatch.setenv("HTTPS_PROXY", f"http://{address}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with make_client(tls_relay) as client, open_listener(tls_relay) as listener:
            sender = await client.create_connection()
            stream = await accept_one(listener)
            await asyncio.gather(sender.aclose(), stream.aclose())
        assert len(proxy.tunnels) == 3
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with make_client(tls_relay) as client, open_listener(tls_relay) as listener:
            sender = await client.create_connection()
            stream = await accept_one(listener)
            await asyncio.gather(sender.aclose(), stream.aclose())
        assert len(proxy.tunnels) == 3  # bypassed


async def test_proxy_refusal_is_a_connection_error(tls_relay: Relay) -> None:
    proxy = ConnectProxy("user:right")
    async with asyncio.timeout(20), proxy.running() as address:
        async with make_client(tls_relay, proxy=f"http://user:wrong@{address}") as client:
            with pytest.raises(RelayConnectionError, match="proxy refused the tunnel: 407"):
                await client.create_connection()


TINYPROXY = shutil.which("tinyproxy") or next(
    (p for p in ("/usr/bin/tinyproxy", "/usr/sbin/tinyproxy") if Path(p).exists()), None
)


@asynccontextmanager
async def tinyproxy(tmp_path: Path, relay_port: int) -> AsyncIterator[int]:
    """tinyproxy on 127.0.0.1 with basic auth (user ``agent``, password ``s3cret``), allowed
    to CONNECT to the relay's port only; yields its port once it accepts connections."""
    assert TINYPROXY is not None
    # tinyproxy binds the port itself and cannot report one it chose: a free one is picked
    # here, and a start that lost it to another process is retried on another.
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        conf = tmp_path / f"tinyproxy-{port}.conf"
        conf.write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 20\nAllow 127.0.0.1\n"
            f"ConnectPort {relay_port}\nBasicAuth agent s3cret\n",
            encoding="utf-8",
        )
        process = await asyncio.create_subprocess_exec(
            TINYPROXY, "-d", "-c", str(conf), stdout=DEVNULL, stderr=DEVNULL
        )
        try:
            ready = False
            async with asyncio.timeout(10):
                while process.returncode is None:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        await asyncio.sleep(0.05)  # no readiness signal from tinyproxy
                        continue
                    writer.close()
                    ready = True
                    break
            if ready:
                yield port
                return
        finally:
            if process.returncode is None:
                process.terminate()
            await process.wait()
    raise AssertionError("tinyproxy did not start")


@pytest.mark.skipif(TINYPROXY is None, reason="tinyproxy is not installed (.ci/run installs it)")
async def test_through_tinyproxy_with_basic_auth(tls_relay: Relay, tmp_path: Path) -> None:
    """A real proxy: listener (control channel, rendezvous) and sender tunnel through it with
    basic auth; a wrong password is a connection error that names the proxy's status."""
    async with asyncio.timeout(30), tinyproxy(tmp_path, tls_relay.server.port) as port:
        url = f"http://agent:s3cret@127.0.0.1:{port}"
        async with open_listener(tls_relay, proxy=url) as listener:
            async with make_client(tls_relay, proxy=url) as client:
                sender = await client.create_connection()
                stream = await accept_one(listener)
                await sender.write(b"through tinyproxy")
                assert await stream.read() == b"through tinyproxy"
                await asyncio.gather(sender.aclose(), stream.aclose())
        wrong = f"http://agent:wrong@127.0.0.1:{port}"
        async with make_client(tls_relay, proxy=wrong) as client:
            with pytest.raises(RelayConnectionError, match="proxy refused the tunnel: 40[17]"):
                await client.create_connection()
