"""The floor of relay CPU per relayed HTTP request: the least a Python relay must do.

``python -m bench.experiments.http_floor [--seconds 8] [--runs 3]`` starts a *floor relay*
and a *floor listener* (this file, two processes, uvloop), drives small GETs through them with
wrk (50 keep-alive connections, as ``python -m bench --only http``) and prints the floor
relay's CPU-ms per 1,000 requests. Alternated with it, in the same run, it drives the real
relay (``hybridrelay serve`` + ``bridge -H`` → ``bench.httpdest``, bench's HTTP topology) and
prints its CPU-ms per 1,000 too, and the ratio.

The floor relay does, per request, only what the Hybrid Connections protocol asks of any
relay (docs/PROTOCOL.md 6), each with the cheapest tool this machine has:

* the sender's request parsed by httptools (llhttp, C), one asyncio Protocol per connection
  and no task per request;
* the entity taken from the path, the token from its header and checked against a cache (the
  real relay caches its HMAC checks too);
* a request id and a rendezvous secret from ``os.urandom``, the ``request`` message with its
  rendezvous address and headers written by orjson, sent as one unmasked WebSocket text frame
  on the listener's control channel;
* the listener's ``response`` message and its binary body read from masked frames (unmasked
  by aiohttp's C helper), the response head built and written with the body in one write;
* one access-log line formatted and written in batches (D14) and one Prometheus counter.

It leaves out what a real relay needs beyond that (limits, timeouts, the broker's choice of
listener, drains, metrics histograms), so a real relay cannot be cheaper than this floor: it
is the yardstick for DECISIONS D17's "3x". The floor listener answers every request inline
with a 2-byte body.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TOKEN = "SharedAccessSignature sr=floor&sig=x&se=9999999999&skn=k"
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "te"})


def _frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    """One final WebSocket frame; masked with a zero key when ``mask`` (the listener's side:
    its cost is not what is measured)."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    return head + (b"\0\0\0\0" if mask else b"") + payload


class _Frames:
    """Splits a byte stream into (opcode, payload) frames; unmasks with aiohttp's C helper."""

    def __init__(self) -> None:
        from aiohttp._websocket.mask import (  # type: ignore[import-not-found]
            _websocket_mask_cython,
        )

        self._unmask = _websocket_mask_cython
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if len(buf) - at < 2:
                    break
                (n,) = struct.unpack_from("!H", buf, at)
                at += 2
            elif n == 127:
                if len(buf) - at < 8:
                    break
                (n,) = struct.unpack_from("!Q", buf, at)
                at += 8
            key = None
            if b1 & 0x80:
                if len(buf) - at < 4:
                    break
                key = bytes(buf[at : at + 4])
                at += 4
            if len(buf) - at < n:
                break
            payload = bytearray(buf[at : at + n])
            if key is not None:
                self._unmask(key, payload)
            out.append((b0 & 0x0F, bytes(payload)))
            pos = at + n
        del buf[:pos]
        return out


# -- the floor relay ----------------------------------------------------------------------


async def relay_main(port: int, keys: dict[str, str], entities: set[str]) -> None:
    """The floor relay on one port, as a relay serves senders and listeners: a sender's
    request to ``/{entity}/...``, a listener's WebSocket upgrade to ``/$hc/{entity}``
    (``keys``: SAS key by name, ``entities``: the hybrid connections)."""
    import base64
    import hashlib
    import hmac
    from urllib.parse import unquote

    import httptools
    import orjson
    from prometheus_client import Counter

    from hybridrelay.auth.sas import parse_token
    from hybridrelay.exceptions import TokenError

    requests_total = Counter("floor_requests", "requests", ["entity"]).labels(entity="floor")
    #: Each token's signature checked once (the real relay caches its decisions too).
    tokens: dict[str, tuple[str, float]] = {}
    pending: dict[str, Sender] = {}
    control: dict[str, asyncio.Transport] = {}
    log_lines: list[str] = []
    date = [b"", 0]

    def token_entity(token: str | None) -> tuple[str, float] | None:
        if not token:
            return None
        known = tokens.get(token)
        if known is None:
            try:
                parsed = parse_token(token)
            except TokenError:
                return None
            key = keys.get(parsed.key_name)
            signed = f"{parsed.raw_sr}\n{parsed.raw_se}".encode()
            if key is None or not hmac.compare_digest(
                hmac.new(key.encode(), signed, hashlib.sha256).digest(), parsed.signature
            ):
                return None
            entity = unquote(parsed.raw_sr).split("://", 1)[-1].split("/")[1]
            known = tokens[token] = (entity, float(parsed.expiry))
        return known

    def date_header() -> bytes:
        now = int(time.time())
        if date[1] != now:
            date[0] = (
                b"Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
            )
            date[1] = now
        return date[0]  # type: ignore[return-value]

    log_fd = os.open(os.devnull, os.O_WRONLY)  # the lines are written, nobody reads them

    async def flush_log() -> None:
        while True:
            await asyncio.sleep(0.1)
            if log_lines:
                os.write(log_fd, "".join(log_lines).encode())
                log_lines.clear()

    class Sender(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.headers: dict[str, str] = {}
            self.url = b""
            self.transport: asyncio.Transport | None = None
            self.peer: Any = None
            self.started = 0.0
            self.listen: str | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.peer = transport.get_extra_info("peername")

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                if self.listen is None:
                    raise
                self.accept_listener(data[upgrade.args[0] :])

        def on_message_begin(self) -> None:
            self.headers = {}
            self.started = time.monotonic()

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode("latin-1")] = value.decode("latin-1")

        def accept_listener(self, rest: bytes) -> None:
            """A listener's upgrade: 101, and the connection is a control channel."""
            assert self.transport is not None and self.listen is not None
            key = self.headers.get("Sec-WebSocket-Key", "")
            accept = base64.b64encode(
                hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            )
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            channel = Control(self.listen)
            self.transport.set_protocol(channel)
            channel.connection_made(self.transport)
            if rest:
                channel.data_received(rest)

        def on_message_complete(self) -> None:
            assert self.transport is not None
            path = self.url.decode("latin-1")
            target, _, query = path.partition("?")
            headers = self.headers
            token = headers.pop("ServiceBusAuthorization", None)
            if target.startswith("/$hc/"):
                entity = target[5:].strip("/")
                known = token_entity(token)
                if "sb-hc-action=listen" in query and known is not None and known[0] == entity:
                    self.listen = entity  # the upgrade follows (HttpParserUpgrade)
                else:
                    self.transport.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                return
            entity = target.split("/", 2)[1]
            known = token_entity(token)
            if (
                entity not in entities
                or known is None
                or known[0] != entity
                or known[1] < time.time()
                or entity not in control
            ):
                self.transport.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                return
            forwarded = {k: v for k, v in headers.items() if k.lower() not in _HOP}
            rid = os.urandom(16).hex()
            secret = os.urandom(16).hex()
            host = headers.get("Host", "")
            message = {
                "request": {
                    "address": f"wss://{host}/$hc/{entity}?sb-hc-action=request"
                    f"&sb-hc-id={rid}&sb-hc-secret={secret}",
                    "id": rid,
                    "requestTarget": path,
                    "method": self.parser.get_method().decode(),
                    "requestHeaders": forwarded,
                    "remoteEndpoint": {"address": self.peer[0], "port": self.peer[1]},
                    "body": False,
                }
            }
            pending[rid] = self
            control[entity].write(_frame(0x1, orjson.dumps(message), mask=False))

        def answer(self, response: dict[str, Any], body: bytes) -> None:
            assert self.transport is not None
            if self.transport.is_closing():  # wrk's warm-up run left before its answer
                return
            reason = response.get("statusDescription") or "OK"
            head = [f"HTTP/1.1 {response['statusCode']} {reason}".encode()]
            via = "1.1 floor"
            for name, value in response.get("responseHeaders", {}).items():
                lower = name.lower()
                if lower == "via":
                    via = f"{value}, {via}"
                elif lower not in _HOP and lower != "content-length":  # the relay's own
                    head.append(f"{name}: {value}".encode("latin-1"))
            head.append(b"Via: " + via.encode("latin-1"))
            head.append(date_header())
            head.append(b"Content-Length: " + str(len(body)).encode())
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            requests_total.inc()
            log_lines.append(
                f'{self.peer[0]} "GET {self.url.decode("latin-1")}" {response["statusCode"]} '
                f"{len(body)} {time.monotonic() - self.started:.4f}\n"
            )

    class Control(asyncio.Protocol):
        """A listener's control channel: its responses (and their bodies), its pings."""

        def __init__(self, entity: str) -> None:
            self.entity = entity
            self.frames = _Frames()
            self.head: tuple[Sender, dict[str, Any]] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            control[self.entity] = self.transport
            print("floor relay ready", flush=True)

        def data_received(self, data: bytes) -> None:
            for opcode, payload in self.frames.feed(data):
                if opcode == 0x1:
                    response = orjson.loads(payload).get("response")
                    if response is None:  # renewToken: nothing to do on a floor
                        continue
                    sender = pending.pop(response["requestId"], None)
                    if sender is None:
                        continue
                    if response.get("body"):
                        self.head = (sender, response)
                    else:
                        sender.answer(response, b"")
                elif opcode == 0x2 and self.head is not None:
                    sender, response = self.head
                    self.head = None
                    sender.answer(response, payload)
                elif opcode == 0x9:
                    self.transport.write(_frame(0xA, payload, mask=False))
                elif opcode == 0x8:
                    self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if control.get(self.entity) is self.transport:
                del control[self.entity]

    loop = asyncio.get_running_loop()
    asyncio.ensure_future(flush_log())
    server = await loop.create_server(Sender, "127.0.0.1", port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    # The line bench's topology waits for (the real relay's, D25's wrapper).
    print(f"floor relay listening on ws://127.0.0.1:{bound}", flush=True)
    await asyncio.Event().wait()


# -- the floor listener -------------------------------------------------------------------


async def listener_main(control_port: int, token: str) -> None:
    """The floor listener on a relay's control channel (the floor relay's or a real one's):
    the listen handshake with ``token``, then frames."""
    import orjson

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    class Listener(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.frames = _Frames()
            self.head: bytearray | None = bytearray()
            if True:  # the listen handshake
                self.transport.write(
                    (
                        "GET /$hc/floor?sb-hc-action=listen HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{control_port}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        f"ServiceBusAuthorization: {token}\r\n\r\n"
                    ).encode()
                )

        def data_received(self, data: bytes) -> None:
            if self.head is not None:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                assert self.head.startswith(b"HTTP/1.1 101"), bytes(self.head[:100])
                data, self.head = bytes(self.head[end + 4 :]), None
                print("floor listener ready", flush=True)
            out = []
            for opcode, payload in self.frames.feed(data):
                if opcode != 0x1:
                    continue
                request = orjson.loads(payload)["request"]
                head = {
                    "response": {
                        "requestId": request["id"],
                        "statusCode": 200,
                        "statusDescription": "OK",
                        "responseHeaders": {"Content-Type": "text/plain"},
                        "body": True,
                    }
                }
                out.append(_frame(0x1, orjson.dumps(head), mask=True))
                out.append(_frame(0x2, b"ok", mask=True))
            if out:
                self.transport.write(b"".join(out))

        def connection_lost(self, exc: Exception | None) -> None:
            done.set_result(None)

    await loop.create_connection(Listener, "127.0.0.1", control_port)
    await done


# -- the driver ---------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wrk(url: str, seconds: int, headers: list[str], cpus: str | None = None) -> dict[str, Any]:
    from bench.httpload import parse_wrk, wrk_argv

    argv = wrk_argv(url, seconds=seconds, connections=50, headers=headers)
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    text = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    return parse_wrk(text)


def _key_and_token(port: int) -> tuple[str, str]:
    """A SAS key for rule ``k`` and a Listen/Send token made with it for ``floor``."""
    from hybridrelay.auth.sas import create_token, token_audience

    key = "floor-key-" + "x" * 34
    audience = token_audience(f"127.0.0.1:{port}", "floor")
    return key, create_token(audience, "k", key, expiry=int(time.time()) + 3600)


def _measure_floor(seconds: int) -> tuple[float, float]:
    port = _free_port()
    key, token = _key_and_token(port)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")])}
    me = [sys.executable, "-m", "bench.experiments.http_floor"]
    relay = subprocess.Popen(
        [*me, "--role", "relay", str(port), "--key", key],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    listener = None
    try:
        assert relay.stdout is not None
        assert "floor relay listening on" in relay.stdout.readline()
        listener = subprocess.Popen(
            [*me, "--role", "listener", str(port), "--token", token], env=env
        )
        assert "ready" in relay.stdout.readline()
        url = f"http://127.0.0.1:{port}/floor/small"
        return _load(relay.pid, url, seconds, [f"ServiceBusAuthorization: {token}"])
    finally:
        _end(listener, relay)


def _load(pid: int, url: str, seconds: int, headers: list[str]) -> tuple[float, float]:
    """wrk against ``url`` (after a second's warm-up): req/s, and process ``pid``'s CPU-ms
    per 1,000 requests."""
    _wrk(url, 1, headers)
    before = _cpu_seconds(pid)
    result = _wrk(url, seconds, headers)
    cpu = _cpu_seconds(pid) - before
    return result["req_per_s"], 1e6 * cpu / max(1, result["requests"])


def _end(*procs: subprocess.Popen[Any] | None) -> None:
    for proc in procs:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def _measure_real_relay(seconds: int) -> tuple[float, float]:
    """``hybridrelay serve`` with the floor listener on its control channel: the relay is the
    only Python process of the path that does more than the floor, and the limit."""
    import tempfile

    port = _free_port()
    key, token = _key_and_token(port)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [*filter(None, [os.environ.get("PYTHONPATH")]), str(REPO / "src"), str(REPO)]
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.yaml"
        config.write_text(
            f"server:\n  host: 127.0.0.1\n  port: {port}\n  plaintext: true\n"
            "namespace:\n  authorization_rules:\n"
            f'    - {{name: k, primary_key: "{key}", rights: [Listen, Send]}}\n'
            "  hybrid_connections:\n    - {name: floor}\n"
        )
        log = Path(tmp) / "relay.log"
        with log.open("wb") as err:
            relay = subprocess.Popen(
                [sys.executable, "-m", "hybridrelay", "serve", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        listener = None
        try:
            deadline = time.monotonic() + 20
            while b"relay listening on" not in log.read_bytes():
                assert time.monotonic() < deadline and relay.poll() is None, log.read_text()
                time.sleep(0.05)
            me = [sys.executable, "-m", "bench.experiments.http_floor"]
            listener = subprocess.Popen(
                [*me, "--role", "listener", str(port), "--token", token],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert listener.stdout is not None
            assert "ready" in listener.stdout.readline()
            url = f"http://127.0.0.1:{port}/floor/small"
            return _load(relay.pid, url, seconds, [f"ServiceBusAuthorization: {token}"])
        finally:
            _end(listener, relay)


def _floor_command(tmp: Path) -> Path:
    """A stand-in for our console script: ``serve`` starts the floor relay in place of ours
    (on the configuration written for the relay), anything else (``bridge``) is
    ``hybridrelay``."""
    wrapper = tmp / "hybridrelay-floor"
    path = os.pathsep.join([str(REPO), str(REPO / "src")])
    wrapper.write_text(
        "#!/bin/sh\n"
        f"export PYTHONPATH={path}\n"
        'if [ "$1" = serve ]; then shift; '
        f'exec {sys.executable} -m bench.experiments.http_floor --role serve "$@"; fi\n'
        f'exec {sys.executable} -m hybridrelay "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _measure_http_path(seconds: int, command: list[str], tmp: Path) -> tuple[float, float]:
    """bench's HTTP path (scenario 6): ``command serve`` (the relay) + ``command bridge -H``
    → ``bench.httpdest``, wrk with 50 connections, each process pinned as bench pins it (its
    relay configuration, bridge configuration and token too). Only the HTTP forward runs:
    the floor relay serves no TCP tunnels. req/s, and the relay's CPU-ms per 1,000."""
    import base64

    from bench.procs import ProcGroup, read_cpu
    from bench.topologies import (
        HTTP_HC,
        KEY_NAME,
        CpuLayout,
        _bridge_config,
        _http_token,
        _relay_config,
    )

    cpus = CpuLayout()
    key = base64.b64encode(os.urandom(32)).decode()
    with ProcGroup() as procs:
        dest = procs.start("httpdest", [sys.executable, "-m", "bench.httpdest"], cpus=cpus.dest)
        dest_port = int(dest.wait_line(r"httpdest listening on 127\.0\.0\.1:(\d+)").group(1))
        config = _relay_config(tmp, key, None)
        relay = procs.start("relay", [*command, "serve", "--config", str(config)], cpus=cpus.relay)
        port = int(relay.wait_line(r"relay listening on ws://127\.0\.0\.1:(\d+)").group(1))
        cs = f"Endpoint=ws://127.0.0.1:{port}/;SharedAccessKeyName={KEY_NAME};SharedAccessKey={key}"
        agent_config = _bridge_config(
            tmp, "agent", cs, None, f'http_forwards: ["{HTTP_HC}:http://127.0.0.1:{dest_port}"]'
        )
        agent = procs.start("agent", [*command, "bridge", "-f", str(agent_config)])
        agent.wait_line(r"all forwards are up")
        url = f"http://127.0.0.1:{port}/{HTTP_HC}/x"
        headers = [f"ServiceBusAuthorization: {_http_token(key)}"]
        _wrk(url, 1, headers, cpus.loadgen)  # the bridge's upstream pool warms up
        before = read_cpu(relay.pid).seconds
        result = _wrk(url, seconds, headers, cpus.loadgen)
        cpu = read_cpu(relay.pid).seconds - before
        return result["req_per_s"], 1e6 * cpu / max(1, result["requests"])


def _serve_as_floor(config_path: str) -> None:
    """``hybridrelay serve --config PATH`` done by the floor relay: the port, keys and hybrid
    connections of bench's relay configuration."""
    import uvloop
    import yaml

    config = yaml.safe_load(Path(config_path).read_text())
    namespace = config["namespace"]
    keys = {rule["name"]: rule["primary_key"] for rule in namespace["authorization_rules"]}
    entities = {hc["name"] for hc in namespace["hybrid_connections"]}
    uvloop.run(relay_main(int(config["server"]["port"]), keys, entities))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["relay", "listener", "serve"])
    parser.add_argument("ports", nargs="*", type=int)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--token", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--config", default="")
    args = parser.parse_args()
    if args.role == "serve":
        _serve_as_floor(args.config)
        return
    if args.role is not None:
        import uvloop

        main_coro = (
            relay_main(args.ports[0], {"k": args.key}, {"floor"})
            if args.role == "relay"
            else listener_main(args.ports[0], token=args.token)
        )
        uvloop.run(main_coro)
        return
    import tempfile

    print(
        "| run | floor relay + floor listener: req/s, CPU-ms/1000 |"
        " hybridrelay serve + floor listener: req/s, CPU-ms/1000 |"
        " bench's HTTP path, floor relay: req/s, relay CPU-ms/1000 |"
        " bench's HTTP path, hybridrelay serve: req/s, relay CPU-ms/1000 |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        floor_command = _floor_command(Path(tmp))
        for run in range(args.runs):
            floor_rate, floor_cpu = _measure_floor(args.seconds)
            serve_rate, serve_cpu = _measure_real_relay(args.seconds)
            ours = [sys.executable, "-m", "hybridrelay"]
            bench_floor_rate, bench_floor_cpu = _measure_http_path(
                args.seconds, [str(floor_command)], Path(tmp)
            )
            bench_rate, bench_cpu = _measure_http_path(args.seconds, ours, Path(tmp))
            print(
                f"| {run + 1} | {floor_rate:,.0f}, {floor_cpu:.0f} | {serve_rate:,.0f}, "
                f"{serve_cpu:.0f} | {bench_floor_rate:,.0f}, {bench_floor_cpu:.0f} | "
                f"{bench_rate:,.0f}, {bench_cpu:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
