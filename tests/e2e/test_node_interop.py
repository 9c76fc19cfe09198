"""Microsoft's own Node clients (hyco-ws 1.0.5, hyco-https 1.4.5) against our relay.

Each test runs the relay in-process and a script of the Node kit (tests/node, see its README)
as a real subprocess. The scripts print one JSON object per line; the tests wait for those lines
(never for a fixed time, except where idling is the point) and every subprocess is
terminated in ``finally``.

Needs ``node`` and ``npm ci --prefix tests/node``. Without them the tests are skipped, unless
``HYBRIDRELAY_REQUIRE_NODE=1`` is set (CI), in which case they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import trustme

from hybridrelay.auth.sas import create_token
from hybridrelay.client import (
    HybridConnectionClient,
    HybridConnectionListener,
    HybridConnectionStream,
    SharedAccessKeyTokenProvider,
)
from hybridrelay.server import RelayConfig, RelayServer

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
NODE = shutil.which("node")
KEY_NAME = "RootManageSharedAccessKey"
KEY = "kit-primary-key-0123456789abcdef"
ENTITY = "compat"
OTHER_ENTITY = "other"


def _missing_requirement() -> str | None:
    if NODE is None:
        return "node is not on PATH"
    for package in ("hyco-ws", "hyco-https"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            return f"tests/node/node_modules/{package} is missing: run `npm ci --prefix tests/node`"
    return None


_MISSING = _missing_requirement()
if _MISSING is not None and os.environ.get("HYBRIDRELAY_REQUIRE_NODE") == "1":
    raise RuntimeError(f"HYBRIDRELAY_REQUIRE_NODE=1 but {_MISSING}")

pytestmark = [
    pytest.mark.node,
    pytest.mark.skipif(_MISSING is not None, reason=_MISSING or ""),
]


# -- the Node side -------------------------------------------------------------------------


class NodeScript:
    """One running script of the kit: its JSON events, its stderr, its exit code."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._stderr = bytearray()
        self._readers = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            text = line.decode("utf-8", "replace").strip()
            try:
                event = json.loads(text)
            except ValueError:
                event = {"event": "raw", "line": text}
            if not isinstance(event, dict):
                event = {"event": "raw", "line": text}
            self.events.append(event)
            await self._queue.put(event)
        await self._queue.put(None)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self._stderr += chunk
            del self._stderr[:-16384]  # keep the tail

    def describe(self) -> str:
        events = "\n  ".join(json.dumps(e)[:300] for e in self.events[-30:])
        stderr = self._stderr.decode("utf-8", "replace")[-3000:]
        return (
            f"{self.name} (pid {self.process.pid}, exit {self.process.returncode})\n"
            f" events:\n  {events}\n stderr:\n{stderr}"
        )

    async def expect(self, *names: str, within: float = 20.0) -> dict[str, Any]:
        """The next event named one of ``names``; fails on ``fatal``, exit, or timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            remaining = deadline - loop.time()
            try:
                event = await asyncio.wait_for(self._queue.get(), max(remaining, 0.0))
            except TimeoutError:
                pytest.fail(f"timed out after {within} s waiting for {names}: {self.describe()}")
            if event is None:
                await self._queue.put(None)  # stay at EOF for later calls
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), 5.0)
                pytest.fail(f"exited before {names}: {self.describe()}")
            if event.get("event") in names:
                return event
            if event.get("event") == "fatal":
                pytest.fail(f"fatal error while waiting for {names}: {self.describe()}")

    async def wait(self, within: float = 30.0) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), within)
        except TimeoutError:
            pytest.fail(f"did not exit within {within} s: {self.describe()}")
        await asyncio.wait_for(asyncio.gather(*self._readers), 10.0)
        return code

    async def terminate(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


def node_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("HYCO_")
        and k not in ("NODE_EXTRA_CA_CERTS", "NODE_TLS_REJECT_UNAUTHORIZED", "NODE_OPTIONS")
    }
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def node_script(
    script: str, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[NodeScript]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(NODE_DIR / script),
        *args,
        cwd=NODE_DIR,
        env=node_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    node = NodeScript(script, process)
    try:
        yield node
    finally:
        await node.terminate()


# -- the relay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path
    ca: Path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A throw-away CA and a certificate for 127.0.0.1 / localhost (PROTOCOL.md 11)."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    tls = Tls(directory / "relay.pem", directory / "relay.key", directory / "ca.pem")
    tls.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(tls.key))
    ca.cert_pem.write_to_path(str(tls.ca))
    return tls


@contextlib.asynccontextmanager
async def running_relay(
    tls: Tls | None = None,
    limits: Mapping[str, Any] | None = None,
    ingress: list[dict[str, Any]] | None = None,
) -> AsyncIterator[RelayServer]:
    server_doc: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    if tls is None:
        server_doc["plaintext"] = True
    else:
        server_doc["tls"] = {"cert": str(tls.cert), "key": str(tls.key)}
    config = RelayConfig.from_dict(
        {
            "server": server_doc,
            "namespace": {
                "authorization_rules": [
                    {"name": KEY_NAME, "primary_key": KEY, "rights": ["Listen", "Send", "Manage"]}
                ],
                "hybrid_connections": [
                    {"name": ENTITY, "requires_client_authorization": True},
                    {"name": OTHER_ENTITY, "requires_client_authorization": True},
                ],
            },
            "limits": dict(limits or {}),
            "ingress": ingress or [],
        }
    )
    async with RelayServer(config) as server:
        yield server


def listen_url(server: RelayServer, entity: str = ENTITY) -> str:
    return f"{server.base_url}/$hc/{entity}?sb-hc-action=listen"


def connect_url(server: RelayServer, entity: str = ENTITY) -> str:
    return f"{server.base_url}/$hc/{entity}?sb-hc-action=connect"


def python_token(server: RelayServer, entity: str = ENTITY, key: str = KEY, ttl: int = 3600) -> str:
    """A token made by our signer, audience ``http://127.0.0.1:PORT/entity`` like Node's."""
    audience = f"http://127.0.0.1:{server.port}/{entity}"
    return create_token(audience, KEY_NAME, key, expiry=int(time.time()) + ttl)


def token_provider() -> SharedAccessKeyTokenProvider:
    return SharedAccessKeyTokenProvider(KEY_NAME, KEY)


# -- payloads ------------------------------------------------------------------------------

MiB = 1024 * 1024
#: ws-sender.js --plan without empty messages (see message_plan): 4.6 MiB.
NODE_PLAN = "t:1,b:1,b:125,t:126,b:65535,t:65536,b:1048576,t:300000,b:3145728"


def binary(size: int, seed: int) -> bytes:
    pattern = hashlib.sha256(f"kit-{seed}".encode()).digest() * 64  # 2 KiB
    whole, rest = divmod(size, len(pattern))
    return pattern * whole + pattern[:rest]


def text(size: int, seed: int) -> str:
    """Exactly ``size`` UTF-8 bytes, with 2- and 3-byte characters."""
    unit = f"kit {seed} \u00e9\u2713 ".encode()
    raw = (unit * (size // len(unit) + 1))[:size]
    head = raw.decode("utf-8", "ignore")  # drops a character cut in half at the end
    return head + "x" * (size - len(head.encode()))


def message_plan() -> list[bytes | str]:
    """Text and binary messages, 1 byte to 4 MiB: 5.4 MiB in total.

    No empty messages: our SDK's receive_message() skips them (see test_empty_messages).
    """
    return [
        b"\x00",
        "x",
        text(125, 1),
        binary(126, 2),
        binary(65535, 3),
        text(65536, 4),
        binary(MiB, 5),
        text(300_000, 6),
        binary(4 * MiB - 7, 7),
    ]


def as_bytes(message: bytes | str) -> bytes:
    return message.encode() if isinstance(message, str) else message


def digest(messages: Sequence[bytes | str]) -> str:
    h = hashlib.sha256()
    for message in messages:
        h.update(as_bytes(message))
    return h.hexdigest()


async def echo_messages(
    stream: HybridConnectionStream, plan: Sequence[bytes | str]
) -> list[bytes | str]:
    """Send the plan while receiving the echoes concurrently (no deadlock under backpressure)."""
    received: list[bytes | str] = []

    async def send() -> None:
        for message in plan:
            await stream.send_message(message)

    async def receive() -> None:
        while len(received) < len(plan):
            message = await stream.receive_message()
            assert message is not None, f"EOF after {len(received)}/{len(plan)} echoes"
            received.append(message)

    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        group.create_task(send())
        group.create_task(receive())
    return received


def assert_same_messages(received: Sequence[bytes | str], plan: Sequence[bytes | str]) -> None:
    assert len(received) == len(plan)
    for index, (got, want) in enumerate(zip(received, plan, strict=True)):
        assert type(got) is type(want), f"message {index}: type {type(got)} != {type(want)}"
        assert got == want, f"message {index}: {len(as_bytes(got))} bytes differ"
    assert digest(received) == digest(plan)


async def serve_echo(stream: HybridConnectionStream) -> tuple[int, int]:
    """Python-side echo: every message back with its type; returns (messages, bytes)."""
    messages = size = 0
    async with stream:
        while (message := await stream.receive_message()) is not None:
            messages += 1
            size += len(as_bytes(message))
            await stream.send_message(message)
    return messages, size


def header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


# -- tests ---------------------------------------------------------------------------------


async def test_hyco_ws_listener_python_sender() -> None:
    """hyco-ws echo listener (token from our signer) + our SDK sender: messages and stream."""
    async with running_relay() as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--lifetime",
            "50",
            env={"HYCO_TOKEN": python_token(server)},
        ) as listener:
            await listener.expect("ready")
            async with HybridConnectionClient(server.base_url, ENTITY, token_provider()) as client:
                stream = await client.create_connection(
                    subprotocols=["kit.v2", "kit.v1"], headers={"X-Kit-Custom": "hello kit"}
                )
                await exercise_stream(stream, listener)

            closed = await listener.expect("closed")
            assert closed["code"] == 1000
            assert closed["bytes"] == sum(len(as_bytes(m)) for m in message_plan()) + STREAM_BYTES
            assert closed["messages"] >= len(message_plan()) + STREAM_BYTES // 65536


STREAM_BYTES = 2 * MiB + 1


async def test_relay_ingress_port_to_hyco_ws_listener() -> None:
    """The relay's own TCP port (``ingress:``) as the sender, hyco-ws as the listener: a plain
    TCP client's bytes are echoed back, and its EOF ends the relayed connection cleanly."""
    entry = {"listen": "127.0.0.1:0", "hybrid_connection": ENTITY}
    async with running_relay(ingress=[entry]) as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--lifetime",
            "50",
            env={"HYCO_TOKEN": python_token(server)},
        ) as listener:
            await listener.expect("ready")
            address = server.ingress[0].address
            assert address is not None
            reader, writer = await asyncio.open_connection(*address)
            payload = binary(STREAM_BYTES, seed=7)

            async def send() -> None:  # while reading: the echo must not back up into us
                writer.write(payload)
                await writer.drain()

            try:
                async with asyncio.timeout(20):
                    _, echoed = await asyncio.gather(send(), reader.readexactly(len(payload)))
            except TimeoutError:
                pytest.fail(f"no echo: {listener.describe()}")
            assert echoed == payload
            writer.write_eof()  # -> close frame 1000 to hyco-ws, which answers it
            assert await asyncio.wait_for(reader.read(), 20) == b""
            writer.close()
            closed = await listener.expect("closed")
            assert closed["code"] == 1000
            assert closed["bytes"] == len(payload)


async def exercise_stream(stream: HybridConnectionStream, listener: NodeScript) -> None:
    """Messages, then the byte-stream API, through a hyco-ws echo listener."""
    async with stream:
        # hyco-ws picks the first offered sub-protocol; the relay confirms it on both legs.
        assert stream.subprotocol == "kit.v2"
        opened = await listener.expect("open")
        assert opened["protocol"] == "kit.v2"

        plan = message_plan()
        assert_same_messages(await echo_messages(stream, plan), plan)

        # Byte-stream API (what the bridge uses): 2 MiB + 1 across message boundaries.
        blob = binary(STREAM_BYTES, 99)
        back = bytearray()

        async def read_all() -> None:
            while len(back) < len(blob):
                chunk = await stream.read(65536)
                assert chunk, f"EOF after {len(back)} bytes"
                back.extend(chunk)

        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            group.create_task(stream.write(blob))
            group.create_task(read_all())
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()


async def test_python_listener_hyco_ws_sender() -> None:
    """Our SDK listener + hyco-ws sender (token from Node's createRelayToken)."""
    async with running_relay() as server:
        listener = HybridConnectionListener(server.base_url, ENTITY, token_provider())
        async with listener:
            async with node_script(
                "ws-sender.js",
                "--url",
                connect_url(server),
                "--protocols",
                "kit.v2,kit.v1",
                "--expect-protocol",
                "kit.v2",
                "--headers",
                json.dumps({"X-Kit-Custom": "hello kit"}),
                "--plan",
                NODE_PLAN,
                "--lifetime",
                "50",
                env={"HYCO_KEY": KEY, "HYCO_KEY_NAME": KEY_NAME},
            ) as sender:
                async with asyncio.timeout(20):
                    stream = await listener.accept_connection()
                assert stream is not None
                assert header(stream.connect_headers, "X-Kit-Custom") == "hello kit"
                assert header(stream.connect_headers, "Sec-WebSocket-Key")
                assert header(stream.connect_headers, "ServiceBusAuthorization") is None
                protocols = header(stream.connect_headers, "Sec-WebSocket-Protocol") or ""
                assert [p.strip() for p in protocols.split(",")] == ["kit.v2", "kit.v1"]
                assert stream.subprotocol == "kit.v2"
                echo = asyncio.create_task(serve_echo(stream))
                ready = await sender.expect("ready")
                assert ready["protocol"] == "kit.v2"
                assert ready["extensions"] == []  # permessage-deflate offered, not accepted
                result = await sender.expect("result", within=40)
                assert await sender.wait() == 0, sender.describe()
                messages, size = await asyncio.wait_for(echo, 10)
    assert result["ok"] is True
    assert result["sha256_sent"] == result["sha256_received"]
    assert (messages, size) == (result["messages"], result["bytes"])
    assert size > 4 * MiB


@pytest.mark.parametrize("token_in", ["header", "query"])
async def test_hyco_ws_listener_hyco_ws_sender(token_in: str) -> None:
    """Both ends Microsoft's: header token via relayedConnect(url, createRelayToken(...)), and a
    token of our signer in the sb-hc-token query parameter."""
    async with running_relay() as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--token-fn",  # hyco-ws' token-function form
            "--exit-after-connections",
            "1",
            "--lifetime",
            "50",
            env={"HYCO_KEY": KEY, "HYCO_KEY_NAME": KEY_NAME},
        ) as listener:
            token = await listener.expect("token")
            assert token["audience"] == f"http://127.0.0.1:{server.port}/{ENTITY}"
            await listener.expect("ready")
            sender_env = (
                {"HYCO_KEY": KEY, "HYCO_KEY_NAME": KEY_NAME}
                if token_in == "header"
                else {"HYCO_TOKEN": python_token(server)}
            )
            async with node_script(
                "ws-sender.js",
                "--url",
                connect_url(server),
                "--token-in",
                token_in,
                "--expect-protocol",
                "none",
                "--lifetime",
                "50",
                env=sender_env,
            ) as sender:
                ready = await sender.expect("ready")
                assert (ready["protocol"], ready["extensions"]) == (None, [])
                result = await sender.expect("result", within=40)
                assert await sender.wait() == 0, sender.describe()
            closed = await listener.expect("closed")
            await listener.expect("done")
            assert await listener.wait() == 0, listener.describe()
    assert result["sha256_sent"] == result["sha256_received"]
    assert result["bytes"] > 4 * MiB
    assert (closed["messages"], closed["bytes"]) == (result["messages"], result["bytes"])
    assert closed["code"] == 1000


async def test_hyco_ws_sender_suffix_and_query() -> None:
    """A sender URL with a path suffix and its own query: the listener's rendezvous address is
    /$hc/{entity}{suffix}?{sender query}&sb-hc-... (PROTOCOL.md 5.2); Node's createRelayToken
    signs the suffix URL (audience .../compat/sub/path)."""
    async with running_relay() as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--exit-after-connections",
            "1",
            "--lifetime",
            "30",
            env={"HYCO_KEY": KEY},
        ) as listener:
            await listener.expect("ready")
            url = (
                f"{server.base_url}/$hc/{ENTITY}/sub/path?app=1&x=two%20words&sb-hc-action=connect"
            )
            async with node_script(
                "ws-sender.js", "--url", url, "--plan", "t:5,b:5", env={"HYCO_KEY": KEY}
            ) as sender:
                result = await sender.expect("result")
                assert await sender.wait() == 0, sender.describe()
            connection = await listener.expect("connection")
            await listener.expect("done")
    assert result["sha256_sent"] == result["sha256_received"]
    assert connection["scheme"] == "ws"
    assert connection["path"] == f"/$hc/{ENTITY}/sub/path"
    assert connection["query"] == "app=1&x=two%20words"


async def test_node_listeners_survive_keep_alive_pings() -> None:
    """The relay pings idle control channels (here every second; 30 s by default) and drops
    those that do not answer; ws@1 (hyco-ws) and ws@6 (hyco-https) answer by themselves, so
    neither listener may be dropped and reconnect. Idling is the point here: 3.5 s = 3 pings."""
    async with running_relay(limits={"keep_alive_interval": 1.0}) as server:
        async with (
            node_script(
                "ws-listener.js", "--url", listen_url(server), env={"HYCO_KEY": KEY}
            ) as ws_listener,
            node_script(
                "https-listener.js",
                "--url",
                listen_url(server, OTHER_ENTITY),
                "--entity",
                OTHER_ENTITY,
                env={"HYCO_KEY": KEY},
            ) as https_listener,
        ):
            await ws_listener.expect("ready")
            await https_listener.expect("ready")
            await asyncio.sleep(3.5)
            async with (
                HybridConnectionClient(server.base_url, ENTITY, token_provider()) as client,
                await client.create_connection() as stream,
            ):
                plan: list[bytes | str] = ["still there?", b"yes"]
                assert_same_messages(await echo_messages(stream, plan), plan)
            async with httpx.AsyncClient(timeout=30) as http:
                response = await http.get(
                    f"{http_url(server, OTHER_ENTITY)}/small",
                    headers={"ServiceBusAuthorization": python_token(server, OTHER_ENTITY)},
                )
            assert response.status_code == 200
            await https_listener.expect("request")
            await ws_listener.expect("closed")
        for node in (ws_listener, https_listener):
            reconnects = [e for e in node.events if e["event"] in ("listening", "error")]
            assert not reconnects, node.describe()


async def test_tls_node_and_python(tls_files: Tls) -> None:
    """wss:// with a certificate from a private CA, trusted through NODE_EXTRA_CA_CERTS."""
    ca_env = {"NODE_EXTRA_CA_CERTS": str(tls_files.ca)}
    async with running_relay(tls_files) as server:
        assert server.base_url.startswith("wss://")
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--lifetime",
            "50",
            env={**ca_env, "HYCO_KEY": KEY},
        ) as listener:
            await listener.expect("ready")

            async with node_script(
                "ws-sender.js",
                "--url",
                connect_url(server),
                "--protocols",
                "kit.v1",
                "--expect-protocol",
                "kit.v1",
                "--lifetime",
                "50",
                env={**ca_env, "HYCO_KEY": KEY},
            ) as sender:
                result = await sender.expect("result", within=40)
                assert await sender.wait() == 0, sender.describe()
            assert result["sha256_sent"] == result["sha256_received"]
            connection = await listener.expect("connection")
            assert connection["scheme"] == "wss"  # the rendezvous address keeps TLS

            async with (
                HybridConnectionClient(
                    server.base_url, ENTITY, token_provider(), ca_file=str(tls_files.ca)
                ) as client,
                await client.create_connection() as stream,
            ):
                plan: list[bytes | str] = [binary(3 * MiB, 11), text(1000, 12)]
                assert_same_messages(await echo_messages(stream, plan), plan)

            # hyco-https over wss:// on the other entity, HTTPS senders.
            async with node_script(
                "https-listener.js",
                "--url",
                listen_url(server, OTHER_ENTITY),
                "--entity",
                OTHER_ENTITY,
                "--lifetime",
                "50",
                env={**ca_env, "HYCO_KEY": KEY},
            ) as https_listener:
                await https_listener.expect("ready")
                verify = ssl.create_default_context(cafile=str(tls_files.ca))
                async with httpx.AsyncClient(timeout=30, verify=verify) as http:
                    token = python_token(server, OTHER_ENTITY)
                    await check_https_routes(http, http_url(server, OTHER_ENTITY), token, "header")

            # The certificate is really checked: without the CA, Node refuses the relay.
            async with node_script(
                "ws-sender.js",
                "--url",
                connect_url(server),
                "--plan",
                "b:1",
                "--lifetime",
                "30",
                env={"HYCO_KEY": KEY},
            ) as untrusting:
                fatal = await untrusting.expect("fatal", "ready")
                assert fatal["event"] == "fatal"
                assert "certificate" in fatal["error"], fatal
                assert await untrusting.wait() != 0


async def python_round_trip(
    server: RelayServer, good: HybridConnectionListener, label: str
) -> None:
    async with HybridConnectionClient(server.base_url, ENTITY, token_provider()) as client:
        async with asyncio.timeout(20):
            connecting = asyncio.create_task(client.create_connection())
            listener_stream = await good.accept_connection()
            sender_stream = await connecting
        assert listener_stream is not None
        echo = asyncio.create_task(serve_echo(listener_stream))
        async with sender_stream:
            plan: list[bytes | str] = [binary(MiB, 21), label]
            assert_same_messages(await echo_messages(sender_stream, plan), plan)
        await asyncio.wait_for(echo, 10)


async def test_bad_token_listener_storm() -> None:
    """A hyco-ws listener with a bad signature gets 401 and, having an error handler, reconnects
    at once, twice per failure (PROTOCOL.md 4.5). The relay answers every attempt and keeps
    serving a good listener and sender during and after the storm.

    The storm is capped (the script closes the server after --max-errors failures) so that
    neither side runs into a 1024 file-descriptor limit on CI.
    """
    async with (
        running_relay() as server,
        HybridConnectionListener(server.base_url, ENTITY, token_provider()) as good,
    ):
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--expect-status",
            "401",
            "--max-errors",
            "500",
            "--lifetime",
            "50",
            env={"HYCO_TOKEN": python_token(server, key="not-the-key-not-the-key")},
        ) as storm:
            first = await storm.expect("error")
            assert first["status"] == 401, first
            await python_round_trip(server, good, "during the storm")
            done = await storm.expect("done", within=40)
            assert await storm.wait() == 0, storm.describe()
        await python_round_trip(server, good, "after the storm")
    assert done["first_status"] == 401
    assert done["errors"] >= 500
    # Every attempt got an HTTP answer (401, or a rate-limit status), none was reset or hung.
    assert set(done["statuses"]) <= {"401", "429", "503"}, done
    assert not any(e["event"] in ("ready", "listening") for e in storm.events)


async def test_static_token_expiry_closes_hyco_ws_listener() -> None:
    """A static token is never renewed by hyco-ws: when it expires (no grace configured) the
    relay closes the control channel with 1008; hyco-ws reconnects with the same token and gets
    401 (PROTOCOL.md 4.4, 4.6). The wait is the token's 3 s lifetime."""
    async with running_relay(limits={"token_grace_period": 0}) as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--max-errors",
            "20",
            "--lifetime",
            "30",
            env={"HYCO_TOKEN": python_token(server, ttl=3)},
        ) as listener:
            await listener.expect("ready")
            closed = await listener.expect("control-closed", within=10)
            error = await listener.expect("error", within=10)
            done = await listener.expect("done", within=10)
            assert await listener.wait() == 0, listener.describe()
    assert closed["code"] == 1008, closed
    assert error["status"] == 401, error
    assert done["first_status"] == 401


async def test_relay_shutdown_closes_hyco_ws_listener_with_1001() -> None:
    """Relay shutdown ends control channels with 1001 (PROTOCOL.md 4.4). hyco-ws then redials
    at once (connection refused, twice per failure); the script stops after 20 errors."""
    async with running_relay() as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--max-errors",
            "20",
            "--lifetime",
            "30",
            env={"HYCO_KEY": KEY},
        ) as listener:
            await listener.expect("ready")
            await server.aclose()
            closed = await listener.expect("control-closed", within=10)
            await listener.expect("done", within=10)
            assert await listener.wait() == 0, listener.describe()
    assert closed["code"] == 1001, closed
    # Redials meet a closed port (or, racing the shutdown, a 503), never a listening relay.
    errors = [e for e in listener.events if e["event"] == "error"]
    assert errors and all(e["status"] in (None, 503) for e in errors), errors


@pytest.mark.parametrize(
    ("case", "status"),
    [("bad-signature", 401), ("other-entity-token", 403), ("unknown-entity", 404)],
)
async def test_hyco_ws_sender_rejected(case: str, status: int) -> None:
    """hyco-ws senders see the status codes of PROTOCOL.md 3.6 with a TrackingId reason."""
    async with running_relay() as server:
        url = connect_url(server)
        if case == "bad-signature":
            token = python_token(server, key="not-the-key-not-the-key")
        elif case == "other-entity-token":
            token = python_token(server, entity=OTHER_ENTITY)
        else:
            url = connect_url(server, "no-such-entity")
            token = python_token(server, entity="no-such-entity")
        async with node_script(
            "ws-sender.js",
            "--url",
            url,
            "--expect-status",
            str(status),
            "--plan",
            "b:1",
            "--lifetime",
            "30",
            env={"HYCO_TOKEN": token},
        ) as sender:
            rejected = await sender.expect("rejected")
            code = await sender.wait()
    assert rejected["status"] == status, rejected
    assert "TrackingId:" in rejected["reason"], rejected
    assert code == 0


def http_url(server: RelayServer, entity: str = ENTITY) -> str:
    scheme = "https" if server.base_url.startswith("wss:") else "http"
    return f"{scheme}://127.0.0.1:{server.port}/{entity}"


async def check_https_routes(http: httpx.AsyncClient, base: str, token: str, token_in: str) -> None:
    """The routes of https-listener.js through the relay, token in a header or the query."""
    headers = {"ServiceBusAuthorization": token} if token_in == "header" else {}

    def url(route: str, query: str = "") -> str:
        if token_in == "query":
            query += ("&" if query else "") + "sb-hc-token=" + quote(token, safe="")
        return f"{base}{route}?{query}" if query else f"{base}{route}"

    small = await http.get(url("/small"), headers=headers)
    assert small.status_code == 200, small.text
    assert small.text == "hello from hyco-https\n"
    assert small.headers["x-hyco-kit"] == "small"
    assert small.headers["content-type"] == "text/plain; charset=utf-8"

    size = 3 * MiB + 5
    large = await http.get(url("/large", f"size={size}"), headers=headers)
    assert large.status_code == 200
    assert len(large.content) == size
    assert large.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(large.content).hexdigest() == large.headers["x-hyco-kit-sha256"]

    # 1000 bytes go inline on the control channel, 300 KiB over a request rendezvous (6.2).
    for body in (binary(1000, 31), binary(300 * 1024, 32)):
        echo = await http.post(
            url("/echo"), content=body, headers={**headers, "Content-Type": "application/x-kit"}
        )
        assert echo.status_code == 200
        assert echo.headers["x-hyco-kit-sha256"] == hashlib.sha256(body).hexdigest()
        assert echo.headers["content-type"] == "application/x-kit"
        assert echo.content == body

    status = await http.get(url("/status"), headers=headers)
    assert (status.status_code, status.reason_phrase) == (204, "Kit Reason")
    assert status.headers["x-hyco-kit"] == "status"
    assert status.content == b""

    seen = await http.get(
        url("/headers", "a=1&b=two%20words"),
        headers=[
            *headers.items(),
            ("X-Kit-Custom", "hello kit"),
            ("X-Kit-Multi", "v1"),
            ("X-Kit-Multi", "v2"),
        ],
    )
    assert seen.status_code == 200
    request = seen.json()
    entity = base.rsplit("/", 1)[1]
    assert request["url"] == f"/{entity}/headers?a=1&b=two%20words"  # sb-hc-token stripped
    assert request["method"] == "GET"
    assert request["headers"]["x-kit-custom"] == "hello kit"
    assert request["headers"]["x-kit-multi"] == "v1, v2"
    assert "servicebusauthorization" not in request["headers"]


@pytest.mark.parametrize("auth_in", ["header", "query"])
async def test_hyco_https_listener_http_requests(auth_in: str) -> None:
    """hyco-https listener (token function from createRelayToken) + plain HTTP senders."""
    async with running_relay() as server:
        async with node_script(
            "https-listener.js",
            "--url",
            listen_url(server),
            "--token-fn",
            "--lifetime",
            "50",
            env={"HYCO_KEY": KEY, "HYCO_KEY_NAME": KEY_NAME},
        ) as listener:
            await listener.expect("ready")
            async with httpx.AsyncClient(timeout=30) as http:
                await check_https_routes(http, http_url(server), python_token(server), auth_in)
                seen = [(await listener.expect("request"))["url"] for _ in range(6)]
                assert [u.split("?")[0] for u in seen] == [
                    f"/{ENTITY}/{route}"
                    for route in ("small", "large", "echo", "echo", "status", "headers")
                ]
                assert not any("sb-hc-token" in u for u in seen)

                unauthorized = await http.get(f"{http_url(server)}/small?unauthorized=1")
                assert unauthorized.status_code == 401
                assert "TrackingId:" in unauthorized.reason_phrase
                authorized = await http.get(
                    f"{http_url(server)}/small?authorized=1",
                    headers={"ServiceBusAuthorization": python_token(server)},
                )
                assert authorized.status_code == 200
                # The next request the listener sees is the authorized one.
                following = await listener.expect("request")
                assert following["url"] == f"/{ENTITY}/small?authorized=1"


async def test_hyco_https_concurrent_requests() -> None:
    """40 requests at once, bodies inline on the control channel (<= 64 KiB) and over request
    rendezvous (> 64 KiB) mixed: hyco-https treats "the next binary message" on a socket as the
    body of the last request, so the relay must never interleave (PROTOCOL.md 4.2)."""
    async with running_relay() as server:
        async with node_script(
            "https-listener.js", "--url", listen_url(server), env={"HYCO_KEY": KEY}
        ) as listener:
            await listener.expect("ready")
            headers = {"ServiceBusAuthorization": python_token(server)}
            sizes = [10, 5000, 60000, 70000, 200_000]
            async with httpx.AsyncClient(
                timeout=30, limits=httpx.Limits(max_connections=40)
            ) as http:

                async def post(i: int) -> tuple[int, bytes, bytes]:
                    body = binary(sizes[i % len(sizes)], i)
                    response = await http.post(
                        f"{http_url(server)}/echo?i={i}", content=body, headers=headers
                    )
                    return response.status_code, response.content, body

                results = await asyncio.gather(*(post(i) for i in range(40)))
    for i, (status, content, body) in enumerate(results):
        assert status == 200, i
        assert content == body, f"request {i}: {len(content)} bytes back for {len(body)}"


async def test_hyco_ws_listener_concurrent_python_senders() -> None:
    """One hyco-ws listener, ten SDK senders at once, each with its own data."""
    async with running_relay() as server:
        async with node_script(
            "ws-listener.js", "--url", listen_url(server), env={"HYCO_KEY": KEY}
        ) as listener:
            await listener.expect("ready")
            async with HybridConnectionClient(server.base_url, ENTITY, token_provider()) as client:

                async def one(i: int) -> None:
                    async with await client.create_connection() as stream:
                        plan: list[bytes | str] = [binary(200_000 + i, i), text(1000 + i, i)]
                        assert_same_messages(await echo_messages(stream, plan), plan)

                async with asyncio.timeout(30):
                    await asyncio.gather(*(one(i) for i in range(10)))
            opened = [await listener.expect("open") for _ in range(10)]
    assert sorted(e["n"] for e in opened) == list(range(1, 11))


async def test_empty_messages() -> None:
    """Empty text and binary messages are messages too: hyco-ws echoes them, and a
    message-level API should hand them over (None, not b"", is EOF there)."""
    async with running_relay() as server:
        async with node_script(
            "ws-listener.js",
            "--url",
            listen_url(server),
            "--lifetime",
            "30",
            env={"HYCO_KEY": KEY},
        ) as listener:
            await listener.expect("ready")
            async with (
                HybridConnectionClient(server.base_url, ENTITY, token_provider()) as client,
                await client.create_connection() as stream,
            ):
                plan: list[bytes | str] = [b"", "", b"end", "", "stop"]
                for message in plan:
                    await stream.send_message(message)
                received: list[bytes | str | None] = []
                async with asyncio.timeout(10):
                    while not received or received[-1] not in ("stop", None):
                        received.append(await stream.receive_message())
            closed = await listener.expect("closed")
    assert closed["messages"] == len(plan)  # the relay and hyco-ws carry them
    assert received == plan


def test_text_helper_is_exact() -> None:
    for size in (0, 1, 2, 3, 125, 126, 65536, 300_000):
        assert len(text(size, 4).encode()) == size
