"""Shared fixtures: TLS material from a throw-away CA, and relays on port 0."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from hybridrelay.auth.sas import create_token
from hybridrelay.server import RelayConfig, RelayServer
from hybridrelay.transport.event_loop import default_loop, loop_factory

ROOT_KEY_NAME = "RootManageSharedAccessKey"
ROOT_KEY = "root-primary-key-0123456789abcdefghij"
ROOT_SECONDARY = "root-secondary-key-0123456789abcdefgh"
LISTEN_KEY_NAME = "listen-only"
LISTEN_KEY = "listen-only-key-0123456789abcdefghij"
SEND_KEY_NAME = "send-only"
SEND_KEY = "send-only-key-0123456789abcdefghijklm"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``both_loops`` run on asyncio's event loop and on uvloop, made as the
    command line makes it (``--loop``); the others on asyncio's."""
    factories = {"asyncio": asyncio.new_event_loop}
    if item.get_closest_marker("both_loops") is not None and default_loop() == "uvloop":
        factories["uvloop"] = loop_factory("uvloop")
    return factories


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, for state that has no event to wait on."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


@asynccontextmanager
async def running_until_cancelled(
    start: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
) -> AsyncIterator[None]:
    """Run ``start(ready)`` as a task for the block: enter once it sets ``ready`` (or fail with
    its error), and expect it to stop by cancellation on exit."""
    ready = asyncio.Event()
    task = asyncio.create_task(start(ready))
    waiter = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait([task, waiter], timeout=10, return_when="FIRST_COMPLETED")
        waiter.cancel()
        if task.done():
            task.result()
        assert ready.is_set()
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str
    cert_file: str
    key_file: str


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFiles]:
    """A CA and a server certificate for 127.0.0.1, ::1 and localhost, as PEM files."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
    ca_file = directory / "ca.pem"
    cert_file = directory / "cert.pem"
    key_file = directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    with cert_file.open("wb") as handle:
        for blob in cert.cert_chain_pems:
            handle.write(blob.bytes())
    yield TlsFiles(str(ca_file), str(cert_file), str(key_file))


@dataclass
class Relay:
    """A running relay and what tests need to talk to it."""

    server: RelayServer
    ca_file: str | None

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def http_url(self) -> str:
        return self.base_url.replace("ws", "http", 1)

    def connection_string(
        self, entity: str | None = None, key_name: str = ROOT_KEY_NAME, key: str = ROOT_KEY
    ) -> str:
        scheme = "sb" if self.server.config.server.secure else "ws"
        text = (
            f"Endpoint={scheme}://127.0.0.1:{self.server.port}/;"
            f"SharedAccessKeyName={key_name};SharedAccessKey={key}"
        )
        return text + (f";EntityPath={entity}" if entity else "")

    def token(
        self, entity: str, key_name: str = ROOT_KEY_NAME, key: str = ROOT_KEY, ttl: int = 3600
    ) -> str:
        return create_token(
            f"http://127.0.0.1:{self.server.port}/{entity}",
            key_name,
            key,
            expiry=int(time.time()) + ttl,
        )


def relay_config(
    *,
    tls: TlsFiles | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    entities: list[dict[str, Any]] | None = None,
    limits: dict[str, Any] | None = None,
    ingress: list[dict[str, Any]] | None = None,
    management: bool = False,
) -> RelayConfig:
    server: dict[str, Any] = {"host": host, "port": port}
    if tls is not None:
        server["tls"] = {"cert": tls.cert_file, "key": tls.key_file}
    else:
        server["plaintext"] = True
    return RelayConfig.from_dict(
        {
            "server": server,
            "limits": limits or {},
            "ingress": ingress or [],
            "management": {"port": 0} if management else {},
            "namespace": {
                "authorization_rules": [
                    {
                        "name": ROOT_KEY_NAME,
                        "primary_key": ROOT_KEY,
                        "secondary_key": ROOT_SECONDARY,
                        "rights": ["Listen", "Send", "Manage"],
                    },
                    {"name": LISTEN_KEY_NAME, "primary_key": LISTEN_KEY, "rights": ["Listen"]},
                    {"name": SEND_KEY_NAME, "primary_key": SEND_KEY, "rights": ["Send"]},
                ],
                "hybrid_connections": entities
                if entities is not None
                else [
                    {"name": "hc"},
                    {"name": "anon", "requires_client_authorization": False},
                    {"name": "a/b"},
                ],
            },
        }
    )


RelayFactory = Callable[..., AbstractAsyncContextManager[Relay]]


@pytest.fixture
def make_relay(tls_files: TlsFiles) -> RelayFactory:
    """``async with make_relay(tls=True, limits={...}) as relay:`` starts a relay on port 0
    (``management=True``: with its management listener on port 0 too)."""

    @asynccontextmanager
    async def factory(
        *,
        tls: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        entities: list[dict[str, Any]] | None = None,
        limits: dict[str, Any] | None = None,
        ingress: list[dict[str, Any]] | None = None,
        management: bool = False,
    ) -> AsyncIterator[Relay]:
        files = tls_files if tls else None
        config = relay_config(
            tls=files,
            host=host,
            port=port,
            entities=entities,
            limits=limits,
            ingress=ingress,
            management=management,
        )
        async with RelayServer(config) as server:
            yield Relay(server, files.ca_file if files else None)

    return factory


@pytest.fixture
async def relay(make_relay: RelayFactory) -> AsyncIterator[Relay]:
    """A plain-text relay with entities ``hc``, ``anon`` (no client auth) and ``a/b``."""
    async with make_relay() as running:
        yield running


@pytest.fixture
async def tls_relay(make_relay: RelayFactory) -> AsyncIterator[Relay]:
    async with make_relay(tls=True) as running:
        yield running


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``hybridrelay serve`` keeps its store in the data directory: each test's relays (and
    their subprocesses, which inherit the environment) use a throw-away one, never ~/.local,
    and no test sees the entities another one created."""
    directory = tmp_path / "hybridrelay-data"
    monkeypatch.setenv("HYBRIDRELAY_DATA_DIR", str(directory))
    return directory


@pytest.fixture(autouse=True)
def restored_log_levels() -> Iterator[None]:
    """A test that runs a command in-process (``configure_logging``) or sets a level leaves the
    levels as it found them, so that what a later test logs does not depend on the order."""
    loggers = [logging.getLogger()] + [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith(("hybridrelay", "aiohttp")) and isinstance(logger, logging.Logger)
    ]
    saved = [(logger, logger.level, logger.disabled) for logger in loggers]
    yield
    for logger, level, disabled in saved:
        logger.setLevel(level)
        logger.disabled = disabled
