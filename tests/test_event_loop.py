"""The event loops our processes run on (transport/event_loop.py, DECISIONS D7)."""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import warnings
from collections.abc import Iterator

import aiohttp
import pytest

from hybridrelay.transport.event_loop import default_loop, loop_factory, use_event_loop
from tests.conftest import TlsFiles, eventually

pytestmark = [pytest.mark.timeout(30), pytest.mark.both_loops]

uvloop = pytest.importorskip("uvloop", reason="uvloop is installed with the package on POSIX")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_uvloop_is_the_default_where_installed() -> None:
    assert default_loop() == "uvloop"


def test_unknown_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown event loop 'tokio'"):
        loop_factory("tokio")


@pytest.fixture
def restore_policy() -> Iterator[None]:
    yield
    asyncio.set_event_loop_policy(None)


@pytest.mark.usefixtures("restore_policy")
def test_use_event_loop_makes_asyncio_run_use_it() -> None:
    use_event_loop("uvloop")

    async def kind() -> type[asyncio.AbstractEventLoop]:
        return type(asyncio.get_running_loop())

    made = asyncio.run(kind())
    assert issubclass(made, uvloop.Loop) and made is not uvloop.Loop


async def test_failed_tls_connects_close_their_sockets_once(tls_files: TlsFiles) -> None:
    """aiohttp hands uvloop a socket (``create_connection(sock=...)``); when the TLS handshake
    then fails, uvloop closes the descriptor but not the socket object, whose finalizer would
    close the same number again later, by then another connection's (uvloop issue 738). Our
    loop detaches it: no socket object is left to the garbage collector, and no descriptor
    stays open."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls_files.cert_file, tls_files.key_file)
    server = await asyncio.get_running_loop().create_server(
        asyncio.Protocol, "127.0.0.1", 0, ssl=server_context
    )
    port = server.sockets[0].getsockname()[1]
    with warnings.catch_warnings():  # an outdated TLS version is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.create_default_context(cafile=tls_files.ca_file)
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    before = open_descriptors()
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            with pytest.raises(aiohttp.ClientSSLError):
                await session.get(f"https://127.0.0.1:{port}/", ssl=old)
    server.close()
    await server.wait_closed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    assert not [w for w in caught if "socket" in str(w.message)]
    await eventually(lambda: open_descriptors() <= before)
