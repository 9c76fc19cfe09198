"""``hybridrelay serve-app MODULE:APP`` as a real subprocess: an ASGI application served through
the relay (in process, 127.0.0.1, port 0), reached with httpx; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path

import httpx

from hybridrelay.client import HybridConnectionClient
from hybridrelay.exceptions import RelayHttpError
from tests.conftest import Relay

CLI = [sys.executable, "-m", "hybridrelay", "serve-app"]
REPO = Path(__file__).resolve().parent.parent
AUTH = "ServiceBusAuthorization"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYBRIDRELAY_CONNECTION_STRING", None)
    return env


async def _run(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        cwd=REPO,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, err.decode(errors="replace")


async def test_serve_app_through_the_relay_then_sigterm(relay: Relay) -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "tests.serve_app_example:app",
        "-x",
        relay.connection_string("hc"),
        cwd=REPO,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while True:  # readiness: the listener is online
                line = (await process.stderr.readline()).decode(errors="replace")
                assert line, "serve-app exited before it was ready:\n" + "".join(lines)
                lines.append(line)
                if "serving the ASGI application on 'hc'" in line:
                    break
        payload = os.urandom(200 * 1024)
        async with httpx.AsyncClient(
            base_url=relay.http_url, timeout=30, headers={AUTH: relay.token("hc")}
        ) as http:
            echoed = await http.post("/hc/echo?a=1&b=%2F", content=payload)
            greeting = await http.get("/hc/greeting")
            missing = await http.get("/hc/nowhere")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            out, rest = await process.communicate()
    err = "".join(lines) + rest.decode(errors="replace")
    assert process.returncode == 0, err
    assert echoed.status_code == 200
    assert echoed.content == payload
    assert echoed.headers["x-sha256"] == hashlib.sha256(payload).hexdigest()
    assert echoed.headers["x-method"] == "POST"
    assert echoed.headers["x-path"] == "/echo"  # the hybrid connection's name is stripped
    assert echoed.headers["x-query"] == "a=1&b=%2F"
    assert echoed.headers["x-scheme"] == "http"
    assert echoed.headers["x-host"] == f"127.0.0.1:{relay.server.port}"
    assert greeting.text == "hello from lifespan"  # lifespan startup ran, state reached requests
    assert missing.status_code == 404
    assert "example app: lifespan shutdown" in out.decode()  # SIGTERM ran the shutdown
    assert "Traceback" not in err
    assert relay.connection_string().split("SharedAccessKey=")[1] not in err


async def test_serve_app_refuses_websocket_senders_the_app_does_not_accept(
    relay: Relay,
) -> None:
    # The example app returns on a websocket scope without accepting it: 403 (ASGI's close
    # before accept), before any 101.
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "tests.serve_app_example:app",
        "-x",
        relay.connection_string(),
        "--entity",
        "a/b",
        "--lifespan",
        "off",
        cwd=REPO,
        env=_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            while b"serving the ASGI application" not in await process.stderr.readline():
                assert process.returncode is None
        sender = HybridConnectionClient.from_connection_string(relay.connection_string("a/b"))
        try:
            try:
                await sender.create_connection()
            except RelayHttpError as exc:  # 403: the SDK raises AuthorizationError
                status = exc.status
            else:
                raise AssertionError("a WebSocket sender was accepted")
        finally:
            await sender.aclose()
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await process.communicate()
    assert status == 403
    assert process.returncode == 0


async def test_bad_module_is_one_line_and_exit_2(relay: Relay) -> None:
    code, err = await _run("tests.no_such_module_xyz:app", "-x", relay.connection_string("hc"))
    assert code == 2
    assert err == (
        "hybridrelay: cannot import 'tests.no_such_module_xyz': "
        "No module named 'tests.no_such_module_xyz'\n"
    ), err

    code, err = await _run("tests.serve_app_example:nope", "-x", relay.connection_string("hc"))
    assert code == 2
    assert err == "hybridrelay: 'tests.serve_app_example' has no attribute 'nope'\n", err

    code, err = await _run("no-colon", "-x", relay.connection_string("hc"))
    assert code == 2
    assert err == "hybridrelay: the app must be given as module:attribute, not 'no-colon'\n", err


async def test_missing_connection_string_is_exit_2() -> None:
    code, err = await _run("tests.serve_app_example:app")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "a connection string is required" in err


async def test_help_reads_well() -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI, "--help", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    text = out.decode()
    assert process.returncode == 0
    assert "usage: hybridrelay serve-app" in text
    for option in ("MODULE:APP", "--connection-string CS, -x CS", "--entity NAME", "--lifespan"):
        assert option in text
