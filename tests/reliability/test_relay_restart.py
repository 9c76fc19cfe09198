"""The relay killed (SIGKILL) mid-transfer and started again (issue 17, "Faults to survive"):
streams in flight end with an error on both ends, never a hang; an SDK listener and a bridge
edge agent come back by themselves; new connections work. The times are logged
(``--log-cli-level=INFO``) for docs/RELIABILITY.md; the bound asserted is the one documented
there: back within the reconnect schedule's first three steps (0, 1, 2 s, each ±20 %) after
the relay listens again, plus the time to connect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from hybridrelay import HybridConnectionClient, HybridConnectionListener, HybridConnectionStream
from hybridrelay.exceptions import RelayError

report = logging.getLogger("tests.reliability")

#: What the test allows from the relay listening again to a listener being back online:
#: the next reconnect delay (at most 2 s + 20 % after a 1 s one) and the connect itself.
BACK_WITHIN = 6.0


async def start_relay(env: dict[str, str], port: int = 0) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridrelay", "serve", "--port", str(port),
        "--management-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert process.stdout is not None
    async with asyncio.timeout(30):
        while True:  # readiness: the "listening on" line
            line = (await process.stdout.readline()).decode()
            assert line, "serve exited before it was ready"
            if found := re.search(r"relay listening on ws://127\.0\.0\.1:(\d+)", line):
                return process, int(found.group(1))


async def connection_string(env: dict[str, str], entity: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridrelay", "connection-string", "--entity", entity,
        stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, _ = await process.communicate()
    return out.decode().strip()


async def tcp_echo() -> asyncio.Server:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(one, "127.0.0.1", 0)


async def round_trip(client: HybridConnectionClient, payload: bytes = b"ping") -> bool:
    try:
        async with asyncio.timeout(5):
            stream = await client.create_connection()
            try:
                await stream.write(payload)
                return await stream.read(65536) == payload
            finally:
                await stream.aclose()
    except (RelayError, OSError, TimeoutError):
        return False


async def ends_with_an_error(stream: HybridConnectionStream) -> str:
    """Reads until the stream ends; how it ended (an error, or EOF), within 15 s or fails."""
    async with asyncio.timeout(15):
        try:
            while await stream.read(65536):
                pass
        except (RelayError, OSError) as exc:
            return type(exc).__name__
    return "EOF"


@pytest.mark.timeout(120)
async def test_a_killed_relay_ends_streams_and_everyone_comes_back(tmp_path: Path) -> None:
    env = {**os.environ, "HYBRIDRELAY_DATA_DIR": str(tmp_path / "data")}
    relay, port = await start_relay(env)
    echo_server = await tcp_echo()
    echo_port = echo_server.sockets[0].getsockname()[1]
    sdk_cs = await connection_string(env, "sdk")
    edge_cs = await connection_string(env, "edge")
    root_cs = edge_cs.rsplit(";EntityPath=", 1)[0]
    bridge = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridrelay", "bridge", "-R", f"edge:127.0.0.1:{echo_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**env, "HYBRIDRELAY_CONNECTION_STRING": root_cs},
    )  # fmt: skip
    listener = HybridConnectionListener.from_connection_string(sdk_cs)
    online = asyncio.Event()
    listener.on_status(lambda status, _: online.set() if status == "online" else online.clear())
    accepted: asyncio.Queue[HybridConnectionStream] = asyncio.Queue()
    sdk_client = HybridConnectionClient.from_connection_string(sdk_cs)
    edge_client = HybridConnectionClient.from_connection_string(edge_cs)
    try:
        await listener.open()

        async def echo(stream: HybridConnectionStream) -> None:
            while data := await stream.read(65536):
                await stream.write(data)
            await stream.aclose()

        async def accept_all() -> None:
            # The first stream is the transfer the test holds; later ones are echoed.
            async with asyncio.TaskGroup() as group:
                async for stream in listener:
                    if accepted.empty() and not held:
                        held.append(stream)
                        await accepted.put(stream)
                    else:
                        group.create_task(echo(stream))

        held: list[HybridConnectionStream] = []

        accepting = asyncio.create_task(accept_all())
        for _ in range(100):  # the bridge's listener comes online on its own time
            if await round_trip(edge_client):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the bridge never carried a connection")

        # A transfer in flight when the relay dies.
        sender = await sdk_client.create_connection()
        receiver = await asyncio.wait_for(accepted.get(), 10)
        await sender.write(b"x" * 65536)
        assert await receiver.read(65536)
        relay.send_signal(signal.SIGKILL)
        await relay.wait()
        killed_at = time.monotonic()
        endings = await asyncio.gather(ends_with_an_error(sender), ends_with_an_error(receiver))
        ended_after = time.monotonic() - killed_at
        await asyncio.gather(sender.aclose(), receiver.aclose())

        relay, _ = await start_relay(env, port)
        restarted_at = time.monotonic()
        async with asyncio.timeout(BACK_WITHIN):
            await online.wait()
        sdk_back = time.monotonic() - restarted_at
        assert await round_trip(sdk_client)
        deadline = restarted_at + BACK_WITHIN
        while not await round_trip(edge_client):
            assert time.monotonic() < deadline, "the bridge did not come back in time"
            await asyncio.sleep(0.1)
        edge_back = time.monotonic() - restarted_at
        report.info(
            "relay SIGKILL: streams in flight ended %s after %.2f s; after the restart the SDK "
            "listener was online in %.2f s and the bridge edge carried a connection in %.2f s",
            endings,
            ended_after,
            sdk_back,
            edge_back,
        )
        accepting.cancel()
    finally:
        await sdk_client.aclose()
        await edge_client.aclose()
        await listener.aclose()
        bridge.terminate()
        relay.terminate()
        async with asyncio.timeout(30):
            await asyncio.gather(bridge.wait(), relay.wait())
        echo_server.close()
