"""asyncio's TLS connections read through the thread's shared buffer (transport/tuning.py, D16).

With the setting applied, every TLS protocol asyncio's event loop makes is ours, reads into
the one shared receive buffer, and still carries every byte when several connections move
data both ways at once through that buffer (client and server in one loop: the worst case
for sharing). A fresh process holding 300 idle TLS connections costs less than the stdlib's
own buffer alone would (64 KiB, zero-filled, per connection).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from hybridrelay.transport.receive_buffer import receive_buffer
from hybridrelay.transport.tuning import (
    DEFAULT_TLS_READ_BUFFER,
    SharedBufferSSLProtocol,
    set_tls_read_buffer,
)
from tests.conftest import TlsFiles

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = os.urandom(1024 * 1024 + 7)


class _Echo(asyncio.Protocol):
    def __init__(self, protocols: list[object]) -> None:
        self.protocols = protocols

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.protocols.append(getattr(transport, "_ssl_protocol", None))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _echo_through(tls_files: TlsFiles, connections: int) -> list[object]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    client_ctx = ssl.create_default_context(cafile=tls_files.ca_file)
    protocols: list[object] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Echo(protocols), "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]

    async def one() -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(PAYLOAD)  # while the echo comes back: both directions at once
        got = await reader.readexactly(len(PAYLOAD))
        writer.close()
        await writer.wait_closed()
        return got

    try:
        async with asyncio.timeout(30):
            echoed = await asyncio.gather(*(one() for _ in range(connections)))
    finally:
        server.close()
        await server.wait_closed()
    assert all(got == PAYLOAD for got in echoed)
    return protocols


@pytest.mark.timeout(60)
def test_asyncio_tls_connections_share_the_receive_buffer(
    tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asyncio.sslproto, "SSLProtocol", asyncio.sslproto.SSLProtocol)
    set_tls_read_buffer()
    assert asyncio.sslproto.SSLProtocol is SharedBufferSSLProtocol
    assert SharedBufferSSLProtocol.max_size == DEFAULT_TLS_READ_BUFFER
    # asyncio's own loop, whatever the policy: uvloop has its own TLS layer.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        protocols = runner.run(_echo_through(tls_files, 4))
    assert len(protocols) == 4
    for protocol in protocols:
        assert isinstance(protocol, SharedBufferSSLProtocol)
        assert protocol._ssl_buffer_view.obj is receive_buffer().obj


def test_tls_read_buffer_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="16 KiB"):
        set_tls_read_buffer(4096)
    with pytest.raises(ValueError, match="cannot exceed"):
        set_tls_read_buffer(1024 * 1024)


@pytest.mark.timeout(120)
def test_idle_asyncio_tls_connections_hold_no_read_buffer() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.experiments.tls_idle_mem",
            "--loop",
            "asyncio",
            "--count",
            "300",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    per_connection = json.loads(proc.stdout.splitlines()[-1])["kib_per_conn"]
    # Measured: ~26 KiB with the shared buffer, ~89 KiB with the stdlib's 64 KiB each.
    assert per_connection["rss"] < 50, per_connection
