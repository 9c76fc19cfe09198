"""What a new user trips on (issue 15), as real subprocesses against a real relay.

Each bridge or ``serve-app`` is a ``python -m hybridrelay`` subprocess; the relay runs in the
test's loop (``make_relay``, port 0, or a fixed port to start it late and restart it). Every
wait is for a log line of the subprocess, never a sleep; every process is stopped by its PID.

* a wrong key on ``-L``, ``-R``, ``-H`` and ``serve-app``, a key without the right, an unknown
  hybrid connection, a certificate from an untrusted CA: exit 1 at once, with exactly one line
  naming the cause (and the fix), and the key nowhere in the output;
* the relay not running yet: the bridge retries, names ``127.0.0.1:PORT`` and "connection
  refused" once, then says it is back online when the relay starts, and the forward works;
* a name that never resolves (``.invalid``, RFC 2606) is named in the error;
* a relay restart under a running edge: lost (WARNING) -> reconnecting (INFO) -> back online;
* ``--connection-string-file`` (and the warnings about a key on the command line or a file
  others may read) on ``bridge``, ``serve-app`` and ``token``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from hybridrelay import HybridConnectionClient
from tests.bridge.test_chain import CLI, Proc, echo, roundtrip, spawn, tcp_server
from tests.conftest import (
    LISTEN_KEY,
    LISTEN_KEY_NAME,
    ROOT_KEY,
    ROOT_KEY_NAME,
    SEND_KEY,
    SEND_KEY_NAME,
    Relay,
    RelayFactory,
)

WRONG_KEY = "not-the-key-0123456789abcdefghijkl"
KEY_WARNING = "SharedAccessKey on the command line"


def connection_string(
    relay_port: int, key_name: str = ROOT_KEY_NAME, key: str = ROOT_KEY, scheme: str = "ws"
) -> str:
    return (
        f"Endpoint={scheme}://127.0.0.1:{relay_port}/;"
        f"SharedAccessKeyName={key_name};SharedAccessKey={key}"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Proc]:
    """A ``hybridrelay`` subprocess (stdout and stderr as its lines), killed on exit if it is
    still running; its output is printed for a failing test."""
    proc = await spawn(*CLI, *args, env=env)
    try:
        yield proc
    finally:
        if proc.process.returncode is None:
            proc.process.kill()
        await proc.process.wait()
        if proc.reader is not None:
            await proc.reader
        sys.stdout.write("".join(proc.lines[-40:]))


async def exits(proc: Proc, seconds: float = 15.0) -> int:
    async with asyncio.timeout(seconds):
        code = await proc.process.wait()
    assert proc.reader is not None
    await proc.reader
    return code


def lines_with(proc: Proc, text: str) -> list[str]:
    return [line for line in proc.lines if text in line]


def assert_one_refusal(proc: Proc, status: str, *fix: str, secret: str = WRONG_KEY) -> str:
    """Exactly one line names ``status``; it names the fix; no secret anywhere."""
    found = lines_with(proc, status)
    assert len(found) == 1, proc.lines
    for words in fix:
        assert words in found[0], found[0]
    output = "".join(proc.lines)
    assert secret not in output
    assert "Traceback" not in output
    return found[0]


# -- refused at start: exit at once ----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "forward",
    [["-L", "127.0.0.1:0:hc"], ["-R", "hc:127.0.0.1:9"], ["-H", "hc:http://127.0.0.1:9"]],
    ids=["L", "R", "H"],
)
async def test_a_wrong_key_ends_the_bridge_at_once(relay: Relay, forward: list[str]) -> None:
    wrong = connection_string(relay.server.port, key=WRONG_KEY)
    async with process("bridge", "-x", wrong, *forward) as proc:
        assert await exits(proc) == 1
    line = assert_one_refusal(proc, "401", "SharedAccessKey", "regenerated")
    assert line.startswith(f"hybridrelay bridge: {forward[0]} ")
    assert not lines_with(proc, "all forwards are up")
    assert not lines_with(proc, "listening on")  # no -L socket was bound


@pytest.mark.timeout(60)
async def test_a_key_without_listen_is_a_403_naming_the_right(relay: Relay) -> None:
    send_only = connection_string(relay.server.port, SEND_KEY_NAME, SEND_KEY)
    async with process("bridge", "-x", send_only, "-R", "hc:127.0.0.1:9") as proc:
        assert await exits(proc) == 1
    assert_one_refusal(proc, "403", "-R hc", "Listen right", secret=SEND_KEY)


@pytest.mark.timeout(60)
async def test_serve_app_says_it_in_the_same_words(relay: Relay, repo_root: Path) -> None:
    wrong = connection_string(relay.server.port, key=WRONG_KEY)
    app = ("serve-app", "tests.serve_app_example:app", "--app-dir", str(repo_root), "-e", "hc")
    async with process(*app, "-x", wrong) as proc:
        assert await exits(proc) == 1
    line = assert_one_refusal(proc, "401", "SharedAccessKey", "regenerated")
    assert line.startswith("hybridrelay serve-app: hc: cannot listen: 401")
    listen_only = connection_string(relay.server.port, LISTEN_KEY_NAME, LISTEN_KEY)
    async with process(*app, "-x", listen_only.replace(LISTEN_KEY, WRONG_KEY)) as proc:
        assert await exits(proc) == 1
    assert_one_refusal(proc, "401")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "forward", [["-L", "127.0.0.1:0:nowhere"], ["-R", "nowhere:127.0.0.1:9"]], ids=["L", "R"]
)
async def test_an_unknown_hybrid_connection_is_a_404_line(relay: Relay, forward: list[str]) -> None:
    good = connection_string(relay.server.port)
    async with process("bridge", "-x", good, *forward) as proc:
        assert await exits(proc) == 1
    assert_one_refusal(
        proc, "404", "no hybrid connection 'nowhere'", "hc create nowhere", secret=ROOT_KEY
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forward", [["-L", "127.0.0.1:0:hc"], ["-R", "hc:127.0.0.1:9"]])
async def test_an_untrusted_certificate_ends_the_bridge_naming_the_ca_options(
    make_relay: RelayFactory, forward: list[str]
) -> None:
    env = {name: "" for name in ("SSL_CERT_FILE", "SSL_CERT_DIR") if name in os.environ}
    async with make_relay(tls=True) as relay:
        good = connection_string(relay.server.port, scheme="sb")
        async with process("bridge", "-x", good, *forward, env=env) as proc:
            assert await exits(proc) == 1
    line = assert_one_refusal(proc, "certificate not trusted", "--ca-file", "SSL_CERT_FILE")
    assert f"127.0.0.1:{relay.server.port}" in line


# -- what may heal is retried, and said once -------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_relay_started_late_is_waited_for_and_the_forward_works(
    make_relay: RelayFactory,
) -> None:
    port = free_port()
    async with tcp_server(echo) as destination:
        forwards = ("-L", "127.0.0.1:0:hc", "-R", f"hc:127.0.0.1:{destination}")
        cs = connection_string(port)
        async with process("bridge", "-x", cs, *forwards) as proc:
            refused = await proc.wait_for("connection refused")
            assert f"127.0.0.1:{port}" in refused and "WARNING" in refused
            async with make_relay(port=port):
                await proc.wait_for("all forwards are up", seconds=40)
                line = await proc.wait_for("listening on 127.0.0.1:")
                ingress = int(line.strip().rsplit(":", 1)[1])
                assert await roundtrip(ingress, b"through at last") == b"through at last"
                # Both forwards say they are back; each cause was said once, not per retry.
                assert len(lines_with(proc, "back online after")) == 2
                for name in ("-L 127.0.0.1:0:hc", "-R hc"):
                    said = [ln for ln in lines_with(proc, "connection refused") if name in ln]
                    assert len(said) == 1, proc.lines
                proc.process.send_signal(signal.SIGTERM)
                assert await exits(proc) == 0


@pytest.mark.timeout(60)
async def test_a_host_name_that_does_not_resolve_is_named() -> None:
    cs = "Endpoint=sb://relay.invalid/;SharedAccessKeyName=edge;SharedAccessKey=" + WRONG_KEY
    async with process("bridge", "-x", cs, "-R", "hc:127.0.0.1:9") as proc:
        line = await proc.wait_for("host name not found")
        assert "relay.invalid:443" in line and "-R hc" in line
        proc.process.send_signal(signal.SIGTERM)
        assert await exits(proc) == 0
    assert WRONG_KEY not in "".join(proc.lines)


@pytest.mark.timeout(90)
async def test_a_relay_restart_is_lost_reconnecting_back_online(make_relay: RelayFactory) -> None:
    port = free_port()
    cs = connection_string(port)
    first_relay = AsyncExitStack()
    await first_relay.enter_async_context(make_relay(port=port))
    try:
        async with (
            tcp_server(echo) as destination,
            process("bridge", "-x", cs, "-R", f"hc:127.0.0.1:{destination}") as proc,
        ):
            await proc.wait_for("all forwards are up")
            await first_relay.aclose()  # the relay stops (its listeners get 1001)
            lost = await proc.wait_for("connection to the relay lost")
            assert "WARNING" in lost and "'hc'" in lost and "1001" in lost
            reconnecting = await proc.wait_for("reconnecting in")
            assert "INFO" in reconnecting
            async with make_relay(port=port):
                back = await proc.wait_for("back online after", seconds=40)
                assert "INFO" in back and "'hc'" in back
                client = HybridConnectionClient.from_connection_string(cs, "hc")
                async with client, await client.create_connection() as stream:
                    await stream.write(b"after the restart")
                    await stream.write_eof()
                    assert await stream.read() == b"after the restart"
            # One line per cause for the failures in between: a cause seen again is DEBUG. (Two
            # causes may show: refused, then 503 from the old relay still draining on the port.)
            causes = [
                line.split("reconnect failed: ", 1)[1]
                .split("; retrying", 1)[0]
                .split(" TrackingId")[0]
                for line in lines_with(proc, "reconnect failed")
            ]
            assert len(causes) == len(set(causes)) and len(causes) <= 2, proc.lines
    finally:
        await first_relay.aclose()


# -- keys out of ps --------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_connection_string_file(relay: Relay, tmp_path: Path) -> None:
    cs = connection_string(relay.server.port) + ";EntityPath=hc"
    private = tmp_path / "edge.cs"
    private.write_text(cs + "\n", encoding="utf-8")
    private.chmod(0o600)
    forward = ("-R", "hc:127.0.0.1:9")
    async with process("bridge", "--connection-string-file", str(private), *forward) as proc:
        await proc.wait_for("all forwards are up")
        proc.process.send_signal(signal.SIGTERM)
        assert await exits(proc) == 0
    assert not lines_with(proc, "WARNING")

    # A file the group may read works, with a warning that says how to fix it.
    private.chmod(0o640)
    async with process("bridge", "--connection-string-file", str(private), *forward) as proc:
        await proc.wait_for("all forwards are up")
        proc.process.send_signal(signal.SIGTERM)
        assert await exits(proc) == 0
    (warning,) = lines_with(proc, "WARNING")
    assert "mode 0640" in warning and f"chmod 600 {private}" in warning

    # -x with a key: one warning naming the environment variable and the file option.
    async with process("bridge", "-x", cs, *forward) as proc:
        await proc.wait_for("all forwards are up")
        proc.process.send_signal(signal.SIGTERM)
        assert await exits(proc) == 0
    (warning,) = lines_with(proc, KEY_WARNING)
    assert "$HYBRIDRELAY_CONNECTION_STRING" in warning and "--connection-string-file" in warning
    assert ROOT_KEY not in "".join(proc.lines)

    # token: the same file, and the same warning for -x.
    private.chmod(0o600)
    async with process("token", "--connection-string-file", str(private)) as proc:
        assert await exits(proc) == 0
    assert proc.lines[-1].startswith("SharedAccessSignature sr=") and len(proc.lines) == 1
    async with process("token", "-x", cs) as proc:
        assert await exits(proc) == 0
    assert len(lines_with(proc, KEY_WARNING)) == 1
    async with process("token", "-x", cs, "--connection-string-file", str(private)) as proc:
        assert await exits(proc) == 2
    assert lines_with(proc, "not both")
    async with process("token", "--connection-string-file", str(tmp_path / "missing")) as proc:
        assert await exits(proc) == 2
    assert lines_with(proc, "missing: No such file")


@pytest.mark.timeout(60)
async def test_serve_app_reads_the_connection_string_file(
    relay: Relay, tmp_path: Path, repo_root: Path
) -> None:
    private = tmp_path / "app.cs"
    private.write_text(connection_string(relay.server.port, key=WRONG_KEY), encoding="utf-8")
    private.chmod(0o600)
    app = ("serve-app", "tests.serve_app_example:app", "--app-dir", str(repo_root), "-e", "hc")
    async with process(*app, "--connection-string-file", str(private)) as proc:
        assert await exits(proc) == 1
    # The key came from the file: refused (so it was read), and no command-line warning.
    assert_one_refusal(proc, "401")
    assert not lines_with(proc, KEY_WARNING)
