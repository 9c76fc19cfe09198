"""``hybridrelay serve`` as a real subprocess for the lifecycle tests (drain, reload): its
configuration file, readiness from its stdout and its log lines read from stderr as they come
(a test waits for a line, never sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, TlsFiles

CLI = [sys.executable, "-m", "hybridrelay"]


def relay_document(
    *, tls: TlsFiles | None = None, entities: tuple[str, ...] = ("hc",), **limits: Any
) -> dict[str, Any]:
    """A relay's YAML document: loopback, port 0, the root rule of tests/conftest.py."""
    server: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    if tls is None:
        server["plaintext"] = True
    else:
        server["tls"] = {"cert": tls.cert_file, "key": tls.key_file}
    return {
        "server": server,
        "limits": limits,
        "namespace": {
            "authorization_rules": [
                {
                    "name": ROOT_KEY_NAME,
                    "primary_key": ROOT_KEY,
                    "rights": ["Listen", "Send", "Manage"],
                }
            ],
            "hybrid_connections": [{"name": name} for name in entities],
        },
    }


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


class Lines:
    """The lines of one of a process's streams, read as they come; :meth:`expect` waits."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self.reader = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def expect(self, pattern: str, *, after: int = 0, within: float = 15.0) -> str:
        """The first line from index ``after`` on that matches ``pattern`` (a regex)."""
        compiled = re.compile(pattern)
        seen = after
        async with asyncio.timeout(within):
            while True:
                for line in self.lines[seen:]:
                    if compiled.search(line):
                        return line
                seen = max(seen, len(self.lines))
                if self.reader.done():
                    raise AssertionError(
                        f"the stream ended without {pattern!r}:\n" + "\n".join(self.lines)
                    )
                self._new_line.clear()
                await self._new_line.wait()


class ServeProcess:
    """A running ``hybridrelay serve``; :meth:`expect` waits for a stderr line."""

    def __init__(self, process: asyncio.subprocess.Process, base_url: str) -> None:
        self.process = process
        self.base_url = base_url
        assert process.stderr is not None
        self.stderr = Lines(process.stderr)
        self.lines = self.stderr.lines
        self._reader = self.stderr.reader

    async def expect(self, pattern: str, *, after: int = 0, within: float = 15.0) -> str:
        """The first stderr line from index ``after`` on that matches ``pattern`` (a regex)."""
        return await self.stderr.expect(pattern, after=after, within=within)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait(self, within: float = 15.0) -> int:
        async with asyncio.timeout(within):
            code = await self.process.wait()
            await self._reader
        return code


@contextlib.asynccontextmanager
async def serve(config: Path, *args: str, loop: str | None = None) -> AsyncIterator[ServeProcess]:
    """Start ``hybridrelay [--loop loop] serve --config config *args``; ready once it prints its
    URL. Left running at the end of the block, it is killed (by its own PID)."""
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *(("--loop", loop) if loop else ()),
        "serve",
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            while True:  # readiness is the "listening on" line, not a sleep
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError("serve exited before it was ready")
                if "relay listening on" in line:
                    break
        running = ServeProcess(process, line.rsplit(" ", 1)[1].strip())
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
