"""A real ``redis-server`` per test (a free port, a temporary directory, append-only file on so
that a restart keeps the data), and in-process cluster nodes on it.

Skipped when ``redis-server`` is not installed, unless ``HYBRIDRELAY_REQUIRE_REDIS=1`` (CI), which
makes its absence a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hybridrelay.server import RelayServer
from tests.conftest import Relay, TlsFiles, relay_config

READY_LINE = b"Ready to accept connections"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; :meth:`start` returns once it accepts connections."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        tls: TlsFiles | None = None,
        password: str | None = None,
    ) -> None:
        self._binary = binary
        self._directory = directory
        self._tls = tls
        self._password = password
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://``, or ``rediss://`` with the CA to trust, and the password if any."""
        auth = f":{self._password}@" if self._password else ""
        if self._tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self._tls.ca_file}"

    def _arguments(self) -> list[str]:
        listen = ["--port", str(self.port)]
        if self._tls is not None:
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", self._tls.cert_file,
                "--tls-key-file", self._tls.key_file,
                "--tls-ca-cert-file", self._tls.ca_file,
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        if self._password:
            listen += ["--requirepass", self._password]
        return listen

    #: The line the process logs once it serves.
    ready_line = READY_LINE

    def _command(self) -> list[str]:
        return [
            self._binary,
            *self._arguments(),
            "--bind", "127.0.0.1",
            "--dir", str(self._directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--loglevel", "notice",
        ]  # fmt: skip

    def start(self) -> None:
        self._process = subprocess.Popen(
            self._command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert self._process.stdout is not None
        seen = []
        for line in self._process.stdout:  # readiness is the server's own line
            seen.append(line)
            if self.ready_line in line:
                return
        raise RuntimeError(f"redis-server did not start: {b''.join(seen)[-2000:]!r}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("HYBRIDRELAY_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (HYBRIDRELAY_REQUIRE_REDIS=1)")
        pytest.skip("redis-server is not installed")
    return binary


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(redis_binary(), directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cluster_config(url: str, **kwargs: Any) -> Any:
    """A test relay's configuration (tests/conftest.py) joined to the cluster at ``url``; no
    entity in the file: the cluster's store holds them; ``spread``: ``store.spread``."""
    kwargs.setdefault("entities", [])
    spread = kwargs.pop("spread", "weighted")
    config = relay_config(**kwargs)
    return replace(config, store=replace(config.store, cluster=url, spread=spread))


@asynccontextmanager
async def cluster_nodes(
    url: str, count: int, *, node_options: dict[int, dict[str, Any]] | None = None
) -> AsyncIterator[list[Relay]]:
    """``count`` in-process relay nodes of one cluster (``node_options[i]``: relay_config
    arguments of node i)."""
    servers = [
        RelayServer(cluster_config(url, **(node_options or {}).get(index, {})))
        for index in range(count)
    ]
    started: list[RelayServer] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        yield [Relay(server, None) for server in servers]
    finally:
        await asyncio.gather(*(server.aclose() for server in started))
