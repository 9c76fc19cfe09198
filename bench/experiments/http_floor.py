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


async def relay_main(http_port: int, control_port: int) -> None:
    import httptools
    import orjson
    from prometheus_client import Counter

    requests_total = Counter("floor_requests", "requests", ["entity"]).labels(entity="floor")
    tokens: dict[str, tuple[str, float]] = {TOKEN: ("floor", 9999999999.0)}
    entities = {"floor"}
    pending: dict[str, Sender] = {}
    control: list[asyncio.Transport] = []
    log_lines: list[str] = []
    date = [b"", 0]

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

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            self.peer = transport.get_extra_info("peername")

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_begin(self) -> None:
            self.headers = {}
            self.started = time.monotonic()

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode("latin-1")] = value.decode("latin-1")

        def on_message_complete(self) -> None:
            assert self.transport is not None
            path = self.url.decode("latin-1")
            target, _, _query = path.partition("?")
            entity = target.split("/", 2)[1]
            headers = self.headers
            token = headers.pop("ServiceBusAuthorization", None)
            known = tokens.get(token or "")
            if (
                entity not in entities
                or known is None
                or known[0] != entity
                or known[1] < time.time()
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
            control[0].write(_frame(0x1, orjson.dumps(message), mask=False))

        def answer(self, response: dict[str, Any], body: bytes) -> None:
            assert self.transport is not None
            if self.transport.is_closing():  # wrk's warm-up run left before its answer
                return
            reason = response.get("statusDescription") or "OK"
            head = [f"HTTP/1.1 {response['statusCode']} {reason}".encode()]
            for name, value in response.get("responseHeaders", {}).items():
                head.append(f"{name}: {value}".encode("latin-1"))
            head.append(b"Via: 1.1 floor")
            head.append(date_header())
            head.append(b"Content-Length: " + str(len(body)).encode())
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            requests_total.inc()
            log_lines.append(
                f'{self.peer[0]} "GET {self.url.decode("latin-1")}" {response["statusCode"]} '
                f"{len(body)} {time.monotonic() - self.started:.4f}\n"
            )

    class Control(asyncio.Protocol):
        def __init__(self) -> None:
            self.frames = _Frames()
            self.head: tuple[Sender, dict[str, Any]] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            control.append(transport)  # type: ignore[arg-type]
            print("floor relay ready", flush=True)

        def data_received(self, data: bytes) -> None:
            for opcode, payload in self.frames.feed(data):
                if opcode == 0x1:
                    response = orjson.loads(payload)["response"]
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

    loop = asyncio.get_running_loop()
    asyncio.ensure_future(flush_log())
    await loop.create_server(Control, "127.0.0.1", control_port)
    await loop.create_server(Sender, "127.0.0.1", http_port, backlog=1024)
    print(f"floor relay http {http_port}", flush=True)
    await asyncio.Event().wait()


# -- the floor listener -------------------------------------------------------------------


async def listener_main(control_port: int, token: str = "") -> None:
    """The floor listener; with ``token``, on a real relay's control channel (the listen
    handshake first, then the same frames)."""
    import orjson

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    class Listener(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.frames = _Frames()
            self.head = bytearray() if token else None
            if token:
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


def _wrk(url: str, seconds: int, headers: list[str]) -> dict[str, Any]:
    from bench.httpload import parse_wrk, wrk_argv

    argv = wrk_argv(url, seconds=seconds, connections=50, headers=headers)
    text = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    return parse_wrk(text)


def _measure_floor(seconds: int) -> tuple[float, float]:
    http_port, control_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    me = [sys.executable, "-m", "bench.experiments.http_floor"]
    relay = subprocess.Popen(
        [*me, "--role", "relay", str(http_port), str(control_port)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    listener = None
    try:
        assert relay.stdout is not None
        assert "floor relay http" in relay.stdout.readline()
        listener = subprocess.Popen([*me, "--role", "listener", str(control_port)], env=env)
        assert "ready" in relay.stdout.readline()
        url = f"http://127.0.0.1:{http_port}/floor/small"
        return _load(relay.pid, url, seconds, [f"ServiceBusAuthorization: {TOKEN}"])
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

    from hybridrelay.auth.sas import create_token, token_audience

    port = _free_port()
    key = "floor-key-" + "x" * 34
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
            token = create_token(
                token_audience(f"127.0.0.1:{port}", "floor"),
                "k",
                key,
                expiry=int(time.time()) + 3600,
            )
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


def _measure_real(seconds: int) -> tuple[float, float]:
    """bench's HTTP topology, one run: its own report of the relay's CPU per 1,000."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--only",
            "http",
            "--topology",
            "hybridrelay",
            "--runs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    ).stdout
    rate = cpu = float("nan")
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("(6) HTTP GET, 50"):
            rate = float(cells[1].replace(",", ""))
        if len(cells) == 2 and cells[0].startswith("(6) relay CPU-ms"):
            cpu = float(cells[1].replace(",", ""))
    return rate, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["relay", "listener"])
    parser.add_argument("ports", nargs="*", type=int)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--token", default="")
    args = parser.parse_args()
    if args.role is not None:
        import uvloop

        main_coro = (
            relay_main(args.ports[0], args.ports[1])
            if args.role == "relay"
            else listener_main(args.ports[0], token=args.token)
        )
        uvloop.run(main_coro)
        return
    print(
        "| run | floor relay: req/s, CPU-ms/1000 | hybridrelay serve + floor listener:"
        " req/s, CPU-ms/1000 | bench's HTTP path (serve + bridge -H): req/s, relay CPU-ms/1000 |"
        " serve/floor CPU |"
    )
    print("|---|---|---|---|---|")
    for run in range(args.runs):
        floor_rate, floor_cpu = _measure_floor(args.seconds)
        serve_rate, serve_cpu = _measure_real_relay(args.seconds)
        real_rate, real_cpu = _measure_real(args.seconds)
        print(
            f"| {run + 1} | {floor_rate:,.0f}, {floor_cpu:.0f} | {serve_rate:,.0f}, "
            f"{serve_cpu:.0f} | {real_rate:,.0f}, {real_cpu:.0f} | {serve_cpu / floor_cpu:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
