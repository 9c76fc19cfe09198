"""The load generator: raw asyncio Protocols (no streams), one JSON result on stdout.

``python -m bench.loadgen MODE --port PORT [options]`` talks to :mod:`bench.dest` through
whatever listens on PORT (the destination itself, our ingress, socat, a peer tunnel). With
``--ws PATH`` it speaks WebSocket to PORT instead of raw TCP (for websockify, which only has a
WebSocket side): an upgrade, then each write as one masked binary frame (mask key 0, so no
XOR work here), and server frames are de-framed.

Modes (the last stdout line is ``RESULT {json}``):

* ``down``: one connection, the destination streams; bytes/s received in the window.
* ``up``: one connection, we stream to the destination's sink; after the window we half-close
  and the sink answers how much it received (TCP only).
* ``lat``: sequential connections; time from ``connect()`` to the first byte of the reply
  to a 1-byte request (connect-to-first-byte).
* ``rr``: ``--conns`` connections each doing ``--size`` ping-pong; round trips/s, latency.
* ``connrate``: ``--conns`` workers each opening a connection, doing a 1-byte echo, closing.
* ``idle``: open ``--count`` connections (each checked with a 1-byte echo), print
  ``OPEN {json}``, hold them until a line on stdin (or ``--hold`` seconds), close, ``RESULT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any, cast

from bench.common import CpuClock, install_loop, percentile, raise_nofile

__all__ = ["Conn", "main"]

CHUNK = 256 * 1024
_ZERO_MASK = b"\x00\x00\x00\x00"


def mark(what: str) -> None:
    """Tell the orchestrator the measurement window starts or ends (it samples CPU then)."""
    print(f"MARK {what}", flush=True)


def ws_frame(payload: bytes) -> bytes:
    """A masked binary frame with mask key 0 (payload unchanged)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x82, 0x80 | n))
    elif n < 65536:
        header = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x82, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


class Conn(asyncio.Protocol):
    """A client connection; ``on_payload`` gets the bytes after any WebSocket framing."""

    def __init__(
        self,
        *,
        ws_path: str | None = None,
        port: int = 0,
        on_payload: Callable[[Conn, bytes], None] | None = None,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self.ws_path = ws_path
        self.port = port
        self.on_payload = on_payload
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.paused = False
        self.resumed: asyncio.Event = asyncio.Event()
        self.resumed.set()
        self._handshake = bytearray() if ws_path else None
        self._hdr = bytearray()
        self._remaining = 0  # payload bytes left in the current server frame
        self._control = False

    # -- Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=4 * CHUNK, low=CHUNK)
        if self.ws_path is None:
            self.opened.set_result(None)
            return
        transport.write(
            (
                f"GET {self.ws_path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: binary\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            self._handshake += data
            end = self._handshake.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = bytes(self._handshake[:end]), bytes(self._handshake[end + 4 :])
            self._handshake = None
            if not head.startswith(b"HTTP/1.1 101"):
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(head.split(b"\r\n")[0].decode()))
                if self.transport:
                    self.transport.close()
                return
            self.opened.set_result(None)
            if rest:
                self._deframe(rest)
            return
        if self.ws_path is None:
            if self.on_payload is not None:
                self.on_payload(self, data)
            return
        self._deframe(data)

    def _deframe(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining:
                n = min(self._remaining, len(view))
                self._remaining -= n
                if not self._control and self.on_payload is not None:
                    self.on_payload(self, bytes(view[:n]))
                view = view[n:]
                continue
            hdr = self._hdr
            if len(hdr) < 2:
                take = min(2 - len(hdr), len(view))
                hdr += view[:take]
                view = view[take:]
                continue
            length = hdr[1] & 0x7F
            need = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            need += 4 if hdr[1] & 0x80 else 0
            if len(hdr) < need:
                take = min(need - len(hdr), len(view))
                hdr += view[:take]
                view = view[take:]
                if len(hdr) < need:
                    continue
            if length == 126:
                length = int.from_bytes(hdr[2:4], "big")
            elif length == 127:
                length = int.from_bytes(hdr[2:10], "big")
            opcode = hdr[0] & 0x0F
            self._control = opcode >= 8
            if opcode == 8 and self.transport is not None:
                self.transport.close()
            self._hdr = bytearray()
            self._remaining = length

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(ws_frame(data) if self.ws_path is not None else data)

    def pause_writing(self) -> None:
        self.paused = True
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.resumed.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before open"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.resumed.set()


async def open_conn(args: argparse.Namespace, on_payload: Callable[[Conn, bytes], None]) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: Conn(ws_path=args.ws, port=args.port, on_payload=on_payload),
        "127.0.0.1",
        args.port,
    )
    await conn.opened
    return conn


# -- modes -----------------------------------------------------------------------------------


async def mode_down(args: argparse.Namespace) -> dict[str, Any]:
    got = [0]

    def count(_: Conn, data: bytes) -> None:
        got[0] += len(data)

    conn = await open_conn(args, count)
    conn.send(b"D")
    await asyncio.sleep(args.warmup)
    cpu = CpuClock()
    mark("start")
    start, t0 = got[0], time.monotonic()
    await asyncio.sleep(args.duration)
    moved, wall = got[0] - start, time.monotonic() - t0
    load = cpu.percent()
    mark("end")
    assert conn.transport is not None
    conn.transport.abort()
    return {"bytes": moved, "seconds": wall, "MBps": moved / wall / 1e6, "loadgen_cpu": load}


async def mode_up(args: argparse.Namespace) -> dict[str, Any]:
    reply = bytearray()
    done = asyncio.get_running_loop().create_future()

    def on_reply(_: Conn, data: bytes) -> None:
        reply.extend(data)
        if len(reply) >= 8 and not done.done():
            done.set_result(None)

    conn = await open_conn(args, on_reply)
    assert conn.transport is not None
    conn.send(b"S")
    payload = bytes(CHUNK)
    cpu = CpuClock()
    mark("start")
    t0 = time.monotonic()
    end = t0 + args.warmup + args.duration
    sent = 0
    while time.monotonic() < end:
        conn.transport.write(payload)
        sent += CHUNK
        if conn.paused:
            await conn.resumed.wait()
        if conn.closed.done():
            raise ConnectionError("closed while sending")
    conn.transport.write_eof()
    try:
        async with asyncio.timeout(5):
            await done
    except TimeoutError:
        raise ConnectionError("no answer to our half-close within 5 s") from None
    wall = time.monotonic() - t0
    received = int.from_bytes(reply[:8], "big")
    load = cpu.percent()
    mark("end")
    conn.transport.close()
    return {
        "bytes": received,
        "sent": sent,
        "seconds": wall,
        "MBps": received / wall / 1e6,
        "loadgen_cpu": load,
    }


async def _one_echo(args: argparse.Namespace) -> tuple[Conn, float, float]:
    """Open, send ``E`` + 1 byte, wait for it: (conn, connect s, connect-to-first-byte s)."""
    first = asyncio.get_running_loop().create_future()

    def on_data(_: Conn, data: bytes) -> None:
        if not first.done():
            first.set_result(time.perf_counter())

    t0 = time.perf_counter()
    conn = await open_conn(args, on_data)
    t_conn = time.perf_counter()
    conn.send(b"E\x01")
    t1 = await first
    return conn, t_conn - t0, t1 - t0


async def mode_lat(args: argparse.Namespace) -> dict[str, Any]:
    samples: list[float] = []
    connects: list[float] = []
    errors = 0
    cpu = CpuClock()
    mark("start")
    deadline = time.monotonic() + args.duration
    while len(samples) < args.count and time.monotonic() < deadline:
        try:
            async with asyncio.timeout(10):
                conn, tc, tf = await _one_echo(args)
        except (OSError, TimeoutError):
            errors += 1
            continue
        samples.append(tf)
        connects.append(tc)
        assert conn.transport is not None
        conn.transport.close()
        await asyncio.sleep(args.gap)
    load = cpu.percent()
    mark("end")
    return {
        "n": len(samples),
        "errors": errors,
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "mean_ms": sum(samples) / len(samples) * 1e3 if samples else float("nan"),
        "connect_p50_ms": percentile(connects, 50) * 1e3,
        "loadgen_cpu": load,
    }


async def mode_rr(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size
    payload = b"r" * size
    measuring = [False]
    rts: list[float] = []
    state: dict[Conn, list[float]] = {}  # conn -> [bytes pending, t_sent]

    def on_data(conn: Conn, data: bytes) -> None:
        st = state[conn]
        st[0] -= len(data)
        if st[0] <= 0:
            now = time.perf_counter()
            if measuring[0]:
                rts.append(now - st[1])
            st[0], st[1] = size, now
            conn.send(payload)

    conns: list[Conn] = []
    sem = asyncio.Semaphore(50)

    async def opener() -> None:
        async with sem:
            conn = await open_conn(args, on_data)
            state[conn] = [1.0, time.perf_counter()]
            conns.append(conn)
            conn.send(b"E\x01")  # the 1-byte echo answer starts the ping-pong

    async with asyncio.timeout(60):
        await asyncio.gather(*(opener() for _ in range(args.conns)))
    await asyncio.sleep(args.warmup)
    cpu = CpuClock()
    mark("start")
    measuring[0] = True
    t0 = time.monotonic()
    await asyncio.sleep(args.duration)
    measuring[0] = False
    wall = time.monotonic() - t0
    n = len(rts)
    load = cpu.percent()
    mark("end")
    for conn in conns:
        if conn.transport is not None:
            conn.transport.abort()
    return {
        "conns": len(conns),
        "round_trips": n,
        "rt_per_s": n / wall,
        "p50_ms": percentile(rts, 50) * 1e3,
        "p99_ms": percentile(rts, 99) * 1e3,
        "loadgen_cpu": load,
    }


async def mode_connrate(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    w0 = t_start + args.warmup
    w1 = w0 + args.duration
    done: list[float] = []
    errors = [0]

    async def worker() -> None:
        while loop.time() < w1:
            try:
                async with asyncio.timeout(10):
                    conn, _, tf = await _one_echo(args)
            except (OSError, TimeoutError):
                errors[0] += 1
                await asyncio.sleep(0.01)
                continue
            assert conn.transport is not None
            conn.transport.close()
            if w0 <= loop.time() < w1:
                done.append(tf)

    cpu = CpuClock()
    loads: list[float] = []

    def window_start() -> None:
        cpu.reset()
        mark("start")

    def window_end() -> None:
        loads.append(cpu.percent())
        mark("end")

    loop.call_at(w0, window_start)
    loop.call_at(w1, window_end)
    await asyncio.gather(*(worker() for _ in range(args.conns)))
    await asyncio.sleep(max(0.0, w1 - loop.time() + 0.01))
    load = loads[0] if loads else cpu.percent()
    return {
        "conns_per_s": len(done) / args.duration,
        "completed": len(done),
        "errors": errors[0],
        "p50_ms": percentile(done, 50) * 1e3,
        "p99_ms": percentile(done, 99) * 1e3,
        "loadgen_cpu": load,
    }


async def mode_idle(args: argparse.Namespace) -> dict[str, Any]:
    conns: list[Conn] = []
    errors = 0
    sem = asyncio.Semaphore(args.conns)
    t0 = time.monotonic()

    async def opener() -> None:
        nonlocal errors
        async with sem:
            try:
                async with asyncio.timeout(30):
                    conn, _, _ = await _one_echo(args)
            except (OSError, TimeoutError):
                errors += 1
                return
            conns.append(conn)

    async with asyncio.timeout(max(60.0, args.count / 100)):
        await asyncio.gather(*(opener() for _ in range(args.count)))
    opened = time.monotonic() - t0
    print(
        "OPEN " + json.dumps({"open": len(conns), "errors": errors, "seconds": opened}), flush=True
    )
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.hold):
            await loop.run_in_executor(None, sys.stdin.readline)
    alive = sum(1 for c in conns if not c.closed.done())
    for conn in conns:
        if conn.transport is not None:
            conn.transport.abort()
    return {"open": len(conns), "alive_at_end": alive, "errors": errors, "open_seconds": opened}


MODES = {
    "down": mode_down,
    "up": mode_up,
    "lat": mode_lat,
    "rr": mode_rr,
    "connrate": mode_connrate,
    "idle": mode_idle,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ws", metavar="PATH", help="speak WebSocket (upgrade to PATH)")
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--gap", type=float, default=0.002)
    parser.add_argument("--hold", type=float, default=120.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    args = parser.parse_args()
    loop_name = install_loop(args.loop)
    raise_nofile()
    try:
        limit = args.warmup + args.duration + args.hold + 120.0
        result = asyncio.run(asyncio.wait_for(MODES[args.mode](args), limit))
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["loop"] = loop_name
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
