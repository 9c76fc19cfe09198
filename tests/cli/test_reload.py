"""SIGHUP: ``hybridrelay serve`` reloads its certificate and configuration file (a real
subprocess over TLS); the other commands' signal helper logs and ignores it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from hybridrelay.cli.signals import RELOAD_SIGNAL, stop_on_signals
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    SharedAccessKeyTokenProvider,
)
from hybridrelay.exceptions import RelayError
from hybridrelay.server import RelayConfig, RelayServer
from hybridrelay.transport.event_loop import default_loop
from tests.client.helpers import accept_one
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, TlsFiles, eventually
from tests.serve_process import CLI, ServeProcess, relay_document, serve, write_config

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(RELOAD_SIGNAL is None, reason="no SIGHUP on this platform")


def _issue(ca: trustme.CA, directory: Path, prefix: str = "") -> bytes:
    """A new certificate for 127.0.0.1 written over (prefix)cert.pem and key.pem; its DER."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(directory / f"{prefix}key.pem"))
    with (directory / f"{prefix}cert.pem").open("wb") as handle:
        for blob in cert.cert_chain_pems:
            handle.write(blob.bytes())
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[trustme.CA, TlsFiles]]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    _issue(ca, tmp_path)
    yield (
        ca,
        TlsFiles(str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
    )


async def _presented_certificate(relay: ServeProcess | str, ca_file: str) -> bytes:
    """The DER certificate a new TLS handshake with the relay (or ``host:port``) gets."""
    address = relay.base_url.removeprefix("wss://") if isinstance(relay, ServeProcess) else relay
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    async with asyncio.timeout(10):
        _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()
        await writer.wait_closed()


def _offline_reasons(listener: HybridConnectionListener) -> list[str]:
    reasons: list[str] = []

    def record(status: str, error: BaseException | None) -> None:
        if status == "offline":
            reasons.append(str(error))

    listener.on_status(record)
    return reasons


def _sdk(cls: Any, relay: ServeProcess, entity: str, ca_file: str) -> Any:
    provider = SharedAccessKeyTokenProvider(ROOT_KEY_NAME, ROOT_KEY)
    return cls(relay.base_url, entity, provider, ca_file=ca_file)


async def _round_trip(client: HybridConnectionClient, listener: HybridConnectionListener) -> None:
    stream = await client.create_connection()
    accepted = await accept_one(listener)
    await stream.write(b"ping")
    assert await asyncio.wait_for(accepted.read(), 10) == b"ping"
    await asyncio.gather(stream.aclose(), accepted.aclose())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_sighup_reloads_the_certificate_and_the_configuration(
    tmp_path: Path, pki: tuple[trustme.CA, TlsFiles], loop: str
) -> None:
    if loop == "uvloop" and default_loop() != "uvloop":
        pytest.skip("uvloop is not installed")
    ca, files = pki
    document = relay_document(tls=files, entities=("hc", "gone"))
    config = write_config(tmp_path / "relay.yaml", document)
    async with serve(config, loop=loop) as relay:
        assert relay.base_url.startswith("wss://")
        first = await _presented_certificate(relay, files.ca_file)
        listener = _sdk(HybridConnectionListener, relay, "hc", files.ca_file)
        doomed = _sdk(HybridConnectionListener, relay, "gone", files.ca_file)
        client = _sdk(HybridConnectionClient, relay, "hc", files.ca_file)
        hc_offline = _offline_reasons(listener)
        gone_offline = _offline_reasons(doomed)
        async with listener, doomed:
            # A relayed connection, live across the reloads.
            stream = await client.create_connection()
            accepted = await accept_one(listener)

            # 1. A renewed certificate in the same files: new handshakes get it.
            renewed = _issue(ca, tmp_path)
            assert renewed != first
            mark = len(relay.lines)
            relay.signal(signal.SIGHUP)
            line = await relay.expect(r"reloaded: certificate .*cert\.pem", after=mark)
            assert "new expiry" in line and "nothing changed" not in line
            assert await _presented_certificate(relay, files.ca_file) == renewed
            await stream.write(b"still here")
            assert await asyncio.wait_for(accepted.read(), 10) == b"still here"
            assert listener.status == "online" and not hc_offline

            # 2. The file's entities and limits: one added, one removed, a limit changed, a
            #    port changed (kept as running, said to need a restart).
            document["namespace"]["hybrid_connections"] = [{"name": "hc"}, {"name": "added"}]
            document["limits"] = {"rendezvous_timeout": 12}
            document["server"]["port"] = 1
            write_config(config, document)
            mark = len(relay.lines)
            relay.signal(signal.SIGHUP)
            line = await relay.expect(r"reloaded: ", after=mark)
            assert "1 hybrid connection added (added)" in line, line
            assert "1 hybrid connection removed (gone)" in line, line
            assert "limits changed: rendezvous_timeout 30.0 -> 12.0" in line, line
            assert "needs a restart (kept as running): server.port" in line, line
            assert "certificate" not in line  # the files did not change this time
            assert ROOT_KEY not in relay.text
            # The removed one's listener is closed; the added one is listenable.
            await eventually(lambda: bool(gone_offline), 10)
            assert "1001" in gone_offline[0], gone_offline
            added = _sdk(HybridConnectionListener, relay, "added", files.ca_file)
            async with added:
                assert added.status == "online"

            # 3. A broken file, then a missing certificate: each one line naming the file and
            #    the cause; the running configuration stays.
            config.write_text("server: [\n", encoding="utf-8")
            mark = len(relay.lines)
            relay.signal(signal.SIGHUP)
            line = await relay.expect(r"reload failed", after=mark)
            assert str(config) in line and "line " in line, line
            document["server"]["tls"]["cert"] = str(tmp_path / "missing.pem")
            write_config(config, document)
            mark = len(relay.lines)
            relay.signal(signal.SIGHUP)
            line = await relay.expect(r"reload failed", after=mark)
            assert "missing.pem" in line and "No such file" in line, line
            assert await _presented_certificate(relay, files.ca_file) == renewed
            with pytest.raises(RelayError):  # still the configuration of step 2
                await _sdk(HybridConnectionListener, relay, "gone", files.ca_file).open()

            # The listener never went offline, and the connection still carries bytes.
            await _round_trip(client, listener)
            await stream.write(b"after all that")
            assert await asyncio.wait_for(accepted.read(), 10) == b"after all that"
            assert listener.status == "online" and not hc_offline
            await asyncio.gather(stream.aclose(), accepted.aclose())
        await client.aclose()
        relay.signal(signal.SIGTERM)
        assert await relay.wait() == 0
    assert "Traceback" not in relay.text
    # One line per reload: the relay's own "configuration replaced" is not repeated.
    assert "configuration replaced" not in relay.text


async def test_without_a_reload_sighup_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """bridge and serve-app: SIGHUP no longer ends the process (its default action)."""
    assert RELOAD_SIGNAL is not None
    caplog.set_level(logging.WARNING, logger="hybridrelay")
    loop = asyncio.get_running_loop()
    logged = asyncio.Event()

    class Waker(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "SIGHUP ignored" in record.getMessage():
                loop.call_soon_threadsafe(logged.set)

    waker = Waker()
    logging.getLogger("hybridrelay").addHandler(waker)
    stopped = asyncio.Event()
    try:
        with stop_on_signals(stopped.set):
            os.kill(os.getpid(), RELOAD_SIGNAL)
            async with asyncio.timeout(10):
                await logged.wait()
        assert not stopped.is_set()
        assert not loop.remove_signal_handler(RELOAD_SIGNAL)  # ours is gone again
    finally:
        logging.getLogger("hybridrelay").removeHandler(waker)


@pytest.mark.timeout(60)
async def test_serve_app_logs_and_survives_sighup(relay: Relay) -> None:
    """As a subprocess: SIGHUP's default action would have ended it without a word."""
    assert RELOAD_SIGNAL is not None
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve-app",
        "tests.serve_app_example:app",
        cwd=REPO,
        env={**os.environ, "HYBRIDRELAY_CONNECTION_STRING": relay.connection_string("hc")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []

    async def line_with(text: str) -> None:
        assert process.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await process.stderr.readline()).decode(errors="replace")
                assert line, "serve-app exited:\n" + "".join(lines)
                lines.append(line)
                if text in line:
                    return

    try:
        await line_with("serving the ASGI application on 'hc'")
        process.send_signal(RELOAD_SIGNAL)
        await line_with("SIGHUP ignored")
        headers = {"ServiceBusAuthorization": relay.token("hc")}
        async with httpx.AsyncClient(base_url=relay.http_url, headers=headers, timeout=30) as http:
            assert (await http.get("/hc/greeting")).text == "hello from lifespan"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.communicate()
    assert process.returncode == 0


@pytest.mark.timeout(60)
async def test_reload_reads_the_management_listeners_own_certificate_again(
    tmp_path: Path, pki: tuple[trustme.CA, TlsFiles]
) -> None:
    ca, files = pki
    _issue(ca, tmp_path, "management-")
    document = relay_document(tls=files)
    own = {
        "cert": str(tmp_path / "management-cert.pem"),
        "key": str(tmp_path / "management-key.pem"),
    }
    document["management"] = {"port": 0, "tls": own}
    config = RelayConfig.from_dict(document)
    async with RelayServer(config) as server:
        management = f"127.0.0.1:{server.management_port}"
        relay = f"127.0.0.1:{server.port}"
        data_port = await _presented_certificate(relay, files.ca_file)
        assert server.reload(config) == []  # nothing changed on disk
        renewed = _issue(ca, tmp_path, "management-")
        changes = server.reload(config)
        assert len(changes) == 1 and "management-cert.pem" in changes[0], changes
        assert await _presented_certificate(management, files.ca_file) == renewed
        assert await _presented_certificate(relay, files.ca_file) == data_port
