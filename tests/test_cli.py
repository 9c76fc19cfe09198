"""The hybridrelay command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from hybridrelay import HybridConnectionClient, HybridConnectionListener
from hybridrelay.cli.signals import STOP_SIGNALS, stop_on_signals

CLI = [sys.executable, "-m", "hybridrelay"]


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def start_serve(*args: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--port",
        "0",
        "--management-port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        while True:  # readiness is the "listening on" line, not a sleep
            line = (await process.stdout.readline()).decode()
            assert line, "serve exited before it was ready"
            if "listening on" in line:
                return process, line.rsplit(" ", 1)[1].strip()


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        return await process.wait()


async def test_embedded_default_quick_start(tmp_path: Path) -> None:
    env = {**os.environ, "HYBRIDRELAY_DATA_DIR": str(tmp_path / "data")}
    process, base_url = await start_serve(env=env)
    try:
        assert base_url.startswith("ws://127.0.0.1:")
        code, out, _ = await run("connection-string", "--entity", "demo", env=env)
        assert code == 0 and out.startswith(f"Endpoint={base_url}/;")
        connection_string = out.strip()
        # The key file is private; the key itself is never printed by serve.
        assert (tmp_path / "data" / "relay.db").stat().st_mode & 0o077 == 0
        # A newcomer's first listener creates the hybrid connection; a sender reaches it.
        async with HybridConnectionListener.from_connection_string(connection_string) as listener:
            client = HybridConnectionClient.from_connection_string(connection_string)
            stream = await client.create_connection()
            accepted = await listener.accept_connection()
            assert accepted is not None
            await stream.write(b"hi")
            assert await accepted.read() == b"hi"
            await asyncio.gather(stream.aclose(), accepted.aclose())
            await client.aclose()
        code, out, _ = await run("token", "-x", connection_string, "--ttl", "60", env=env)
        assert code == 0 and out.startswith("SharedAccessSignature sr=")
    finally:
        assert await stop(process) == 0
    # The root key survives a restart.
    process, _ = await start_serve(env=env)
    try:
        code, out, _ = await run("connection-string", "--entity", "demo", env=env)
        assert out.strip().split(";")[2] == connection_string.split(";")[2]
    finally:
        assert await stop(process) == 0


async def test_serve_with_config_and_clear_errors(tmp_path: Path, repo_root: Path) -> None:
    env = dict(os.environ)
    process, base_url = await start_serve(
        "--config", str(repo_root / "examples" / "relay-local.yaml"), env=env
    )
    try:
        async with aiohttp.ClientSession() as session:
            try:
                await session.ws_connect(base_url + "/$hc/demo?sb-hc-action=listen")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401
    finally:
        assert await stop(process) == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {plaintext: true, colour: blue}\n", encoding="utf-8")
    code, _, err = await run("serve", "--config", str(bad), env=env)
    assert code == 2 and "unknown key(s): server.colour" in err and "Traceback" not in err
    code, _, err = await run("token", "-x", "Endpoint=nope", env=env)
    assert code == 2 and "Endpoint must look like" in err
    code, _, err = await run("connection-string", "--data-dir", str(tmp_path / "none"), env=env)
    assert code == 2 and "start it once" in err
    code, out, _ = await run("--version", env=env)
    assert code == 0 and out.startswith("hybridrelay ")
    code, _, err = await run("--loop", "tokio", "serve", env=env)
    assert code == 2 and "invalid choice" in err
    code, _, err = await run("serve", env={**env, "HYBRIDRELAY_LOOP": "nope"})
    assert code == 2 and "unknown event loop 'nope'" in err


async def test_the_signal_helper_stops_gracefully_and_restores_the_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        stopped = asyncio.Event()
        with stop_on_signals(stopped.set):
            os.kill(os.getpid(), sig)
            async with asyncio.timeout(10):
                await stopped.wait()
        # Ours is gone again: nothing left to remove.
        assert not loop.remove_signal_handler(sig)


async def test_token_reads_the_environment_and_unknown_keys_get_a_suggestion(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDRELAY_CONNECTION_STRING"}
    cs = "Endpoint=sb://relay.example/;SharedAccessKeyName=root;SharedAccessKey=k" + "x" * 40
    code, out, err = await run(
        "token", "--entity", "hc", env={**env, "HYBRIDRELAY_CONNECTION_STRING": cs}
    )
    assert code == 0 and out.startswith("SharedAccessSignature sr="), err
    code, _, err = await run("token", env=env)
    assert code == 2 and "HYBRIDRELAY_CONNECTION_STRING" in err and "-x" in err
    code, out, _ = await run("token", "--help", env=env)
    assert code == 0 and "HYBRIDRELAY_CONNECTION_STRING" in out
    code, out, _ = await run("connection-string", "--help", env=env)
    assert code == 0 and "data directory" in out
    typo = tmp_path / "typo.yaml"
    typo.write_text("server: {plaintext: true}\nlimits: {rendezvous_timout: 5}\n", encoding="utf-8")
    code, _, err = await run("serve", "--config", str(typo), env=env)
    assert code == 2
    assert "limits.rendezvous_timout (did you mean 'rendezvous_timeout'?)" in err, err


async def test_the_banner_names_the_data_dir_it_was_given(tmp_path: Path) -> None:
    """With --data-dir, the banner's connection-string command names it: plain
    `hybridrelay connection-string` would read the default directory (another relay's)."""
    data_dir = tmp_path / "elsewhere"
    process = await asyncio.create_subprocess_exec(
        *CLI, "serve", "--port", "0", "--management-port", "0", "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "serve exited before its banner"
                if line.startswith("Root connection string"):
                    break
        assert f"hybridrelay connection-string --data-dir {data_dir}`" in line
    finally:
        assert await stop(process) == 0
