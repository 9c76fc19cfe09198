"""Processes of the web-app tests: a relay (``hybridrelay serve``), ``hybridrelay serve-app``
and ``hybridrelay bridge -H`` as real subprocesses, uvicorn in process on port 0; readiness is
each one's own log line, never a sleep."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from hybridrelay.auth.sas import create_token
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, TlsFiles

CLI = [sys.executable, "-m", "hybridrelay"]
REPO = Path(__file__).resolve().parents[2]
AUTH = "ServiceBusAuthorization"
APP = "tests.webapps.app:app"
ENTITY = "hc"
#: How long a process may take to say it is ready.
READY_TIMEOUT = 30.0


@dataclass
class Process:
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for_line(self, text: str, seconds: float = 15.0) -> str:
        """The first line of its output containing ``text``, once it was written."""
        async with asyncio.timeout(seconds):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                self.changed.clear()
                await self.changed.wait()


def rss_kib(pid: int) -> int:
    """The process' resident set now (VmRSS, KiB)."""
    return _status_field(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """The process' peak resident set so far (VmHWM, KiB)."""
    return _status_field(pid, "VmHWM")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {name} for {pid}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYBRIDRELAY_CONNECTION_STRING", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextlib.asynccontextmanager
async def started(
    args: list[str], ready: str, *, stream: str = "stderr", command: list[str] = CLI
) -> AsyncIterator[Process]:
    """Run ``hybridrelay ARGS`` (or ``command ARGS``) until the block ends (SIGTERM, then
    kill); enter once a line of its ``stream`` contains ``ready``. Its output is kept (for
    failure messages)."""
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        cwd=REPO,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    record = Process(process)
    pipes = {"stdout": process.stdout, "stderr": process.stderr}
    is_ready = asyncio.Event()

    async def read(pipe: asyncio.StreamReader) -> None:
        while line := (await pipe.readline()).decode(errors="replace"):
            record.lines.append(line)
            record.changed.set()
            if ready in line and pipe is pipes[stream]:
                is_ready.set()

    readers = [asyncio.create_task(read(pipe)) for pipe in pipes.values() if pipe is not None]
    try:
        waiter = asyncio.create_task(is_ready.wait())
        exited = asyncio.create_task(process.wait())
        await asyncio.wait({waiter, exited}, timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED")
        waiter.cancel()
        if not is_ready.is_set():
            exited.cancel()
            raise AssertionError(f"{args[0]} was not ready:\n{record.output()}")
        exited.cancel()
        yield record
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        for reader in readers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await reader


@dataclass
class RelayProcess:
    process: Process
    base_url: str  # ws:// or wss://
    ca_file: str | None

    @property
    def http_url(self) -> str:
        return self.base_url.replace("ws", "http", 1)

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def connection_string(self) -> str:
        scheme = "sb" if self.base_url.startswith("wss") else "ws"
        return (
            f"Endpoint={scheme}://127.0.0.1:{self.port}/;SharedAccessKeyName={ROOT_KEY_NAME};"
            f"SharedAccessKey={ROOT_KEY};EntityPath={ENTITY}"
        )

    def token(self) -> str:
        import time

        return create_token(
            f"http://127.0.0.1:{self.port}/{ENTITY}",
            ROOT_KEY_NAME,
            ROOT_KEY,
            expiry=int(time.time()) + 3600,
        )


@contextlib.asynccontextmanager
async def relay_process(
    tmp_path: Path, tls: TlsFiles | None, *, anonymous: bool = False
) -> AsyncIterator[RelayProcess]:
    """The relay; ``anonymous``: its hybrid connection does not require client authorization."""
    server: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    if tls is not None:
        server["tls"] = {"cert": tls.cert_file, "key": tls.key_file}
    else:
        server["plaintext"] = True
    config = {
        "server": server,
        "namespace": {
            "authorization_rules": [
                {"name": ROOT_KEY_NAME, "primary_key": ROOT_KEY, "rights": ["Listen", "Send"]}
            ],
            "hybrid_connections": [
                {"name": ENTITY, "requires_client_authorization": not anonymous}
            ],
        },
    }
    path = tmp_path / "relay.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    async with started(["serve", "--config", str(path)], "listening on", stream="stdout") as p:
        line = next(line for line in p.lines if "listening on" in line)
        yield RelayProcess(p, line.rsplit(" ", 1)[1].strip(), tls.ca_file if tls else None)


def _ca_args(relay: RelayProcess) -> list[str]:
    return ["--ca-file", relay.ca_file] if relay.ca_file else []


@contextlib.asynccontextmanager
async def serve_app(relay: RelayProcess, *extra: str) -> AsyncIterator[Process]:
    args = ["serve-app", APP, "-x", relay.connection_string(), *_ca_args(relay), *extra]
    async with started(args, f"serving the ASGI application on '{ENTITY}'") as process:
        yield process


@contextlib.asynccontextmanager
async def uvicorn_server(root_path: str = "") -> AsyncIterator[str]:
    """The app under uvicorn in this process: its base URL. The listening socket is made here
    (port 0), so connections queue in the kernel until uvicorn accepts them: no wait for it."""
    from tests.webapps.app import app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", root_path=root_path, lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(15):
            await task
        sock.close()


@contextlib.asynccontextmanager
async def bridge_h(relay: RelayProcess, upstream: str, *extra: str) -> AsyncIterator[Process]:
    args = [
        "bridge",
        "-x",
        relay.connection_string(),
        *_ca_args(relay),
        "-H",
        f"{ENTITY}:{upstream}",
        *extra,
    ]
    async with started(args, "all forwards are up") as process:
        yield process


@contextlib.asynccontextmanager
async def uvicorn_process(
    root_path: str = "", http: str | None = None
) -> AsyncIterator[tuple[Process, str]]:
    """The app under uvicorn in a process of its own, on port 0: (process, base URL); ``http``
    picks uvicorn's HTTP implementation (``h11``, ``httptools``; default: uvicorn's choice)."""
    args = ["-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", "0", "--lifespan", "off"]
    args += ["--http", http] if http else []
    args += ["--no-access-log", "--root-path", root_path] if root_path else ["--no-access-log"]
    async with started(args, "Uvicorn running on", command=[sys.executable]) as process:
        line = next(line for line in process.lines if "Uvicorn running on" in line)
        yield process, line.split("Uvicorn running on ", 1)[1].split()[0]
