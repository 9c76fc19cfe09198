"""Every file in examples/ runs as shipped, as real processes, and carries bytes end to end.

The relay examples run with ``hybridrelay serve --config``, the bridge examples with
``hybridrelay bridge -f`` against the relay they name (examples/relay-local.yaml), taking the
connection string that relay-local.yaml's comments print from ``$HYBRIDRELAY_CONNECTION_STRING``
as their own comments say. The SDK samples run as ``python3 examples/NAME.py`` against a test
relay.

What is rewritten, and only that: a fixed port that a test on a shared machine cannot take
becomes 0 (any free port; the process logs the port it got, which the test reads) or the port of
the test's own destination server. Each rewrite is an exact substring of the example's text,
checked to occur once (:func:`rewritten`), so an edit of the example that moves it fails here
instead of testing something else. relay.yaml is also run after the two steps its header asks
for (keys and a certificate).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from hybridrelay import HybridConnectionClient, HybridConnectionListener
from hybridrelay.auth.sas import create_token
from tests.bridge.helpers import UdpClient, UdpEcho, tcp_server
from tests.conftest import ROOT_KEY, ROOT_KEY_NAME, Relay, TlsFiles

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CLI = [sys.executable, "-m", "hybridrelay"]
#: How long a process may take to say it is ready (the bridges and the relay start in < 2 s).
READY_TIMEOUT = 30.0
#: A line that a bridge logs once it listens: ``-L 0:web: listening on 127.0.0.1:41234``.
LISTENING = re.compile(r"-L (\S+): listening on (?:\[?[\d.:a-f]+\]?):(\d+)")


class Process:
    """A subprocess whose stdout and stderr lines are read as they come."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            async with self._new_line:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    async def wait_for(self, pattern: str | re.Pattern[str], count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in the output, once there are as many."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        async with asyncio.timeout(READY_TIMEOUT), self._new_line:
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                if self._reader.done():
                    output = "\n".join(self.lines)
                    raise AssertionError(f"{self.name} exited before {regex.pattern!r}:\n{output}")
                await self._new_line.wait()

    async def stop(self) -> int:
        """SIGTERM, and its exit code; one that does not stop in 30 s is killed (no process
        outlives its test) and fails it."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                code = await self.process.wait()
                await self._reader
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise
        return code


@asynccontextmanager
async def started(
    name: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    exit_codes: tuple[int, ...] = (0,),
) -> AsyncIterator[Process]:
    """Run ``args`` for the block; SIGTERM must then end it with one of ``exit_codes``."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    running = Process(process, name)
    try:
        yield running
    finally:
        code = await running.stop()
    assert code in exit_codes, f"{name} exited {code}:\n" + "\n".join(running.lines)


def rewritten(example: str, tmp_path: Path, *changes: tuple[str, str]) -> Path:
    """examples/``example`` with each (old, new) substring replaced, written to ``tmp_path``;
    each ``old`` must occur exactly once."""
    text = (EXAMPLES / example).read_text(encoding="utf-8")
    for old, new in changes:
        assert text.count(old) == 1, f"{example}: {old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    path = tmp_path / example
    path.write_text(text, encoding="utf-8")
    return path


def connection_strings() -> dict[str, str]:
    """relay-local.yaml's connection strings, by rule name, as its comments print them."""
    text = (EXAMPLES / "relay-local.yaml").read_text(encoding="utf-8")
    found = re.findall(r'HYBRIDRELAY_CONNECTION_STRING="([^"]+)"', text)
    by_rule = {re.search(r"SharedAccessKeyName=([^;]+)", cs).group(1): cs for cs in found}  # type: ignore[union-attr]
    assert set(by_rule) == {"RootManageSharedAccessKey", "bridge-listen", "bridge-send"}
    return by_rule


@asynccontextmanager
async def local_relay(tmp_path: Path) -> AsyncIterator[tuple[int, dict[str, str]]]:
    """relay-local.yaml running (its ports 9400 and 9401 made free ones); its port and its
    connection strings pointed at that port."""
    config = rewritten(
        "relay-local.yaml", tmp_path, ("port: 9400\n", "port: 0\n"), ("port: 9401 ", "port: 0 ")
    )
    async with started("relay", *CLI, "serve", "--config", str(config)) as relay:
        (match,) = await relay.wait_for(r"relay listening on ws://127\.0\.0\.1:(\d+)")
        port = int(match.group(1))
        strings = {
            rule: cs.replace("127.0.0.1:9400", f"127.0.0.1:{port}")
            for rule, cs in connection_strings().items()
        }
        yield port, strings


def bridge(example: Path) -> tuple[str, ...]:
    """The example's command line: the credential comes from the environment."""
    return (*CLI, "bridge", "-f", str(example))


async def bridge_ports(process: Process, count: int) -> dict[str, int]:
    """The ports of a bridge's first ``count`` -L forwards, by spec, once all are up."""
    await process.wait_for("all forwards are up")
    matches = await process.wait_for(LISTENING, count)
    return {m.group(1): int(m.group(2)) for m in matches}


async def echo_through(port: int, payload: bytes = b"x") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(15):
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.timeout(120)
async def test_edge_and_ingress_examples_carry_a_byte_through_relay_local(tmp_path: Path) -> None:
    async with (
        tcp_server() as destination,
        local_relay(tmp_path) as (_, strings),
    ):
        edge = rewritten(
            "bridge-edge.yaml",
            tmp_path,
            ('"web:localhost:8000"', f'"web:localhost:{destination.port}"'),
        )
        ingress = rewritten(
            "bridge-ingress.yaml",
            tmp_path,
            ('"8080:web"', '"0:web"'),
            ("port: 2222", "port: 0"),
            ("port: 15432", "port: 0"),
            ("port: 13389", "port: 0"),
        )
        async with (
            started(
                "edge",
                *bridge(edge),
                env={"HYBRIDRELAY_CONNECTION_STRING": strings["bridge-listen"]},
            ) as edge_process,
            started(
                "ingress",
                *bridge(ingress),
                env={"HYBRIDRELAY_CONNECTION_STRING": strings["bridge-send"]},
            ) as ingress_process,
        ):
            await edge_process.wait_for("all forwards are up")
            ports = await bridge_ports(ingress_process, 4)
            assert await echo_through(ports["0:web"]) == b"x"
            # Nothing listens beyond loopback unless the file says so.
            assert not any("beyond loopback" in line for line in ingress_process.lines)


@pytest.mark.timeout(120)
async def test_udp_example_carries_a_datagram_through_relay_local(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    # The example's destination is 127.0.0.53:53 (a local resolver); the test's echo takes
    # that address on a free port.
    transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.53", 0))
    try:
        echo_port = transport.get_extra_info("sockname")[1]
        async with local_relay(tmp_path) as (_, strings):
            config = rewritten(
                "bridge-udp.yaml",
                tmp_path,
                ('"127.0.0.1:5353/dns/udp:udp-services"', '"127.0.0.1:0/dns/udp:udp-services"'),
                ("port: 53\n", f"port: {echo_port}\n"),
            )
            async with started(
                "udp bridge",
                *bridge(config),
                env={"HYBRIDRELAY_CONNECTION_STRING": strings["RootManageSharedAccessKey"]},
            ) as process:
                await process.wait_for("all forwards are up")
                (match,) = await process.wait_for(r"listening on 127\.0\.0\.1:(\d+)/udp")
                client_transport, client = await loop.create_datagram_endpoint(
                    UdpClient, remote_addr=("127.0.0.1", int(match.group(1)))
                )
                try:
                    client_transport.sendto(b"x")
                    async with asyncio.timeout(15):
                        assert await client.received.get() == b"echo:x"
                finally:
                    client_transport.close()
    finally:
        transport.close()


@pytest.mark.timeout(120)
async def test_http_example_forwards_a_request_through_relay_local(tmp_path: Path) -> None:
    async def upstream(request: web.Request) -> web.Response:
        return web.Response(text=f"upstream saw {request.path_qs}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]
    try:
        async with local_relay(tmp_path) as (port, strings):
            config = rewritten(
                "bridge-http.yaml",
                tmp_path,
                ('"api:http://127.0.0.1:8000/v1"', f'"api:http://127.0.0.1:{upstream_port}/v1"'),
            )
            async with started(
                "http bridge",
                *bridge(config),
                env={"HYBRIDRELAY_CONNECTION_STRING": strings["bridge-listen"]},
            ) as process:
                await process.wait_for("all forwards are up")
                send_key = strings["bridge-send"].rsplit("SharedAccessKey=", 1)[1]
                token = create_token(
                    f"http://127.0.0.1:{port}/api",
                    "bridge-send",
                    send_key,
                    expiry=int(time.time()) + 60,
                )
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(
                        f"http://127.0.0.1:{port}/api/items?x=1",
                        headers={"Authorization": token},
                        timeout=aiohttp.ClientTimeout(total=15),
                    ) as response,
                ):
                    assert response.status == 200
                    assert await response.text() == "upstream saw /v1/items?x=1"
    finally:
        await runner.cleanup()


@pytest.mark.timeout(120)
async def test_azbridge_interop_example_against_our_bridge_in_azbridges_place(
    tmp_path: Path,
) -> None:
    async with (
        tcp_server() as office_rdp,
        tcp_server() as cloud_db,
        local_relay(tmp_path) as (_, strings),
    ):
        config = rewritten(
            "bridge-azbridge-interop.yaml",
            tmp_path,
            ('"127.0.0.1:13389/rdp:to-office"', '"127.0.0.1:0/rdp:to-office"'),
            ('"to-cloud:db/127.0.0.1:5432"', f'"to-cloud:db/127.0.0.1:{cloud_db.port}"'),
        )
        env = {"HYBRIDRELAY_CONNECTION_STRING": strings["RootManageSharedAccessKey"]}
        # The other side, as the file's header writes azbridge's command lines.
        partner = (
            *CLI,
            "bridge",
            "-R",
            f"to-office:rdp/127.0.0.1:{office_rdp.port}",
            "-L",
            "127.0.0.1:0/db:to-cloud",
        )
        async with (
            started("interop bridge", *bridge(config), env=env) as ours,
            started("partner", *partner, env=env) as theirs,
        ):
            (our_port,) = (await bridge_ports(ours, 1)).values()
            (their_port,) = (await bridge_ports(theirs, 1)).values()
            assert await echo_through(our_port, b"r") == b"r"
            assert await echo_through(their_port, b"d") == b"d"


@pytest.mark.timeout(60)
async def test_relay_example_refuses_its_placeholder_keys_in_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "serve",
        "--config",
        str(EXAMPLES / "relay.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    lines = err.decode().strip().splitlines()
    assert process.returncode == 2 and len(lines) == 1, lines
    assert "relay.yaml" in lines[0] and "authorization_rules[0].primary_key" in lines[0]
    assert "placeholder" in lines[0] and "openssl rand -base64 32" in lines[0]
    assert b"listening" not in out


@pytest.mark.timeout(120)
async def test_relay_example_with_keys_and_a_certificate_serves_locally(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """The header's two steps done, nothing else changed: a local listener and sender (tokens
    for 127.0.0.1, not relay.example.com) meet, so no audience or rendezvous host is pinned."""
    keys = {name: os.urandom(32).hex() for name in ("primary", "secondary", "edge", "devices")}
    config = rewritten(
        "relay.yaml",
        tmp_path,
        ('"REPLACE-ME-primary"', f'"{keys["primary"]}"'),
        ('"REPLACE-ME-secondary"', f'"{keys["secondary"]}"'),
        ('"REPLACE-ME-orders-edge"', f'"{keys["edge"]}"'),
        ('"REPLACE-ME-orders-devices"', f'"{keys["devices"]}"'),
        ("/etc/hybridrelay/tls/cert.pem", tls_files.cert_file),
        ("/etc/hybridrelay/tls/key.pem", tls_files.key_file),
        ("port: 9400\n", "port: 0\n"),
        ("0.0.0.0:5020", "0.0.0.0:0"),
    )
    async with started("relay", *CLI, "serve", "--config", str(config)) as relay:
        (match,) = await relay.wait_for(r"relay listening on wss://[^:]+:(\d+)")
        endpoint = f"sb://127.0.0.1:{match.group(1)}/"
        edge = f"Endpoint={endpoint};SharedAccessKeyName=orders-edge;SharedAccessKey={keys['edge']}"
        device = (
            f"Endpoint={endpoint};SharedAccessKeyName=orders-devices;"
            f"SharedAccessKey={keys['devices']}"
        )
        ca = tls_files.ca_file
        async with (
            HybridConnectionListener.from_connection_string(edge, "orders", ca_file=ca) as listener,
            HybridConnectionClient.from_connection_string(device, "orders", ca_file=ca) as client,
            asyncio.timeout(15),
        ):
            sent = await client.create_connection()
            accepted = await listener.accept_connection()
            assert accepted is not None
            await sent.write(b"x")
            assert await accepted.read() == b"x"
            await asyncio.gather(sent.aclose(), accepted.aclose())


# -- the SDK samples ---------------------------------------------------------------------------


def sample(name: str) -> tuple[str, ...]:
    return (sys.executable, str(EXAMPLES / name))


@pytest.mark.timeout(90)
async def test_listener_and_sender_samples_echo_through_a_test_relay(relay: Relay) -> None:
    env = {"HYBRIDRELAY_CONNECTION_STRING": relay.connection_string()}
    async with started("listener.py", *sample("listener.py"), "hc", env=env) as listener:
        await listener.wait_for("listening on hc")
        sender = await asyncio.create_subprocess_exec(
            *sample("sender.py"),
            "hc",
            "hello through the relay",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **env},
        )
        async with asyncio.timeout(30):
            out, err = await sender.communicate()
        assert sender.returncode == 0, err.decode()
        assert out.decode().strip() == "hello through the relay"


@pytest.mark.timeout(60)
async def test_sender_sample_says_why_when_nobody_listens(relay: Relay) -> None:
    sender = await asyncio.create_subprocess_exec(
        *sample("sender.py"),
        "hc",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HYBRIDRELAY_CONNECTION_STRING": relay.connection_string()},
    )
    async with asyncio.timeout(30):
        _, err = await sender.communicate()
    assert sender.returncode == 1
    assert err.decode().startswith("sender: hc: ") and "Traceback" not in err.decode()


async def get(relay: Relay, path: str, entity: str) -> tuple[int, str]:
    headers = {"Authorization": relay.token(entity, key_name=ROOT_KEY_NAME, key=ROOT_KEY)}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            relay.http_url + path,
            data=b"abc",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=15),
        ) as response,
    ):
        return response.status, await response.text()


@pytest.mark.timeout(90)
async def test_http_handler_sample_answers_a_relayed_request(relay: Relay) -> None:
    env = {"HYBRIDRELAY_CONNECTION_STRING": relay.connection_string()}
    async with started("http_handler.py", *sample("http_handler.py"), "hc", env=env) as handler:
        await handler.wait_for("listening on hc")
        status, text = await get(relay, "/hc/hello", "hc")
    assert (status, text) == (200, "POST /hc/hello (3 bytes)\n")


@pytest.mark.timeout(90)
async def test_asgi_app_sample_served_by_serve_app(relay: Relay) -> None:
    env = {"HYBRIDRELAY_CONNECTION_STRING": relay.connection_string()}
    async with started(
        "serve-app",
        *CLI,
        "serve-app",
        "asgi_app:app",
        "--app-dir",
        "examples",
        "-e",
        "hc",
        env=env,
    ) as served:
        await served.wait_for("serving the ASGI application")
        status, text = await get(relay, "/hc/hello", "hc")
    # The path as the ASGI adapter reports it (with or without the hybrid connection's name).
    assert status == 200 and re.fullmatch(r"hello from asgi_app: POST (/hc)?/hello\n", text)


# -- the quick start's pieces ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_bench_finds_our_command_next_to_its_interpreter_without_path() -> None:
    """``python -m bench`` from a virtual environment that is not activated: the console
    script is not on PATH, but next to the interpreter (or ``-m hybridrelay`` runs)."""
    import subprocess

    code = (
        "import subprocess; from bench.topologies import _hybridrelay_command as c; "
        "print(c()); subprocess.run([*c(), '--version'], check=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PATH": "/nonexistent", "BENCH_HYBRIDRELAY": ""},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "hybridrelay 0" in done.stdout


def walkthrough_terminals() -> tuple[list[str], str]:
    """README's walkthrough: the commands of its four terminals (comments dropped) and the
    closing curl line."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Walkthrough: the pattern on one machine", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    steps = re.split(r"^# \d\. .*\n", block, flags=re.MULTILINE)[1:]
    assert len(steps) == 4, block
    terminals = []
    for step in steps:
        lines = [line for line in step.splitlines() if line and not line.startswith("#")]
        terminals.append(lines)
    *last, curl = terminals[-1]
    assert curl.startswith("curl ")
    terminals[-1] = last
    return ["\n".join(lines[:-1] + ["exec " + lines[-1]]) for lines in terminals], curl


def substituted(text: str, *changes: tuple[str, str]) -> str:
    for old, new in changes:
        assert old in text, f"{old!r} not in {text!r}"
        text = text.replace(old, new)
    return text


@pytest.mark.timeout(180)
async def test_the_readme_walkthrough_runs_twice_as_written(tmp_path: Path) -> None:
    """Each terminal's commands run as written in bash (-e: a failing command fails the test),
    twice over (the second time finds the
    directory, the store and the hybrid connection already there). Changed: the fixed ports
    (8000, 9400, 8080) become free ones, read back from what each process prints, and /tmp/site
    a directory of the test's."""
    terminals, curl = walkthrough_terminals()
    site = str(tmp_path / "site")
    env = {
        # The walkthrough's shell has the environment activated: our python3 and hybridrelay.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",  # http.server's "Serving HTTP on" line, at once
        "HYBRIDRELAY_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("HYBRIDRELAY_CONNECTION_STRING", None)
    for _ in range(2):
        destination_script = substituted(
            terminals[0], ("/tmp/site", site), ("http.server 8000 ", "http.server 0 ")
        )
        # http.server has no SIGTERM handler (a person stops it with Ctrl-C): -15 is its end.
        async with started(
            "terminal 1",
            "bash",
            "-ec",
            destination_script,
            env=env,
            exit_codes=(0, -signal.SIGTERM),
        ) as one:
            (match,) = await one.wait_for(r"Serving HTTP on 127\.0\.0\.1 port (\d+)")
            http_port = match.group(1)
            relay_script = substituted(
                terminals[1],
                ("hybridrelay serve", "hybridrelay serve --port 0 --management-port 0"),
            )
            async with started("terminal 2", "bash", "-ec", relay_script, env=env) as two:
                await two.wait_for("relay listening on")
                edge_script = substituted(
                    terminals[2], ("127.0.0.1:8000", f"127.0.0.1:{http_port}")
                )
                async with started("terminal 3", "bash", "-ec", edge_script, env=env) as three:
                    await three.wait_for("all forwards are up")
                    ingress_script = substituted(terminals[3], ("127.0.0.1:8080:", "127.0.0.1:0:"))
                    async with started(
                        "terminal 4", "bash", "-ec", ingress_script, env=env
                    ) as four:
                        (ingress_port,) = (await bridge_ports(four, 1)).values()
                        command = substituted(curl, ("127.0.0.1:8080", f"127.0.0.1:{ingress_port}"))
                        command = command.split("#", 1)[0].strip()  # the "→ hello" comment
                        done = await asyncio.create_subprocess_shell(
                            command + " --silent --max-time 15",
                            stdout=asyncio.subprocess.PIPE,
                            env={**os.environ, **env},
                        )
                        async with asyncio.timeout(30):
                            out, _ = await done.communicate()
                        assert out.decode() == "hello from behind the firewall\n"
                    # The key never goes on a command line: the bridges read the environment.
                    assert " -x " not in edge_script + ingress_script
