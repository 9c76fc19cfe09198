"""Subprocesses of a benchmark run: start (pinned), wait for readiness, sample, stop by PID.

Every process is started by :class:`Proc` and stopped by its own PID (SIGTERM, then SIGKILL
after a grace period) when the :class:`ProcGroup` that owns it closes; nothing is ever killed
by name. Readiness is a line on stdout or stderr matched by a regular expression, or a TCP
port that accepts a connection, both bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLK_TCK",
    "CpuSample",
    "Proc",
    "ProcGroup",
    "free_port",
    "proc_tree",
    "read_cpu",
    "read_mem_kib",
    "wait_port",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
_NCPU = os.cpu_count() or 1


def free_port() -> int:
    """A port the OS considers free now (for tools that cannot report a port-0 bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until 127.0.0.1:port accepts a TCP connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listens on 127.0.0.1:{port} after {timeout} s"
                ) from None
            time.sleep(0.02)


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def read_mem_kib(pid: int, tree: bool = True) -> tuple[int, int]:
    """(VmRSS, Pss) in KiB of ``pid`` (summed over its descendants when ``tree``)."""
    pids = proc_tree(pid) if tree else [pid]
    return sum(_status_kib(p, "VmRSS") for p in pids), sum(_pss_kib(p) for p in pids)


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds (user+sys, children that exited included) of a process tree at a time."""

    at: float
    seconds: float

    def percent_since(self, before: CpuSample) -> float:
        """CPU % between two samples (100 = one core)."""
        wall = self.at - before.at
        return 100.0 * (self.seconds - before.seconds) / wall if wall > 0 else 0.0


def read_cpu(pid: int, tree: bool = True) -> CpuSample:
    total = 0.0
    for p in proc_tree(pid) if tree else [pid]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 (1-based), i.e. 11-14 after the name.
        total += sum(int(x) for x in fields[11:15]) / CLK_TCK
    return CpuSample(time.monotonic(), total)


class Proc:
    """One subprocess: output captured by reader threads (last lines kept), pinned to CPUs."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None = None,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self._on_line = on_line
        full = list(argv)
        if cpus is not None and _NCPU > 1:
            full = ["taskset", "-c", cpus, *full]
        self.argv = full
        self._lines: deque[str] = deque(maxlen=400)
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            text=True,
            bufsize=1,
        )
        self.pid = self.popen.pid
        self._pumps: list[threading.Thread] = []
        for stream in (self.popen.stdout, self.popen.stderr):
            assert stream is not None
            pump = threading.Thread(target=self._pump, args=(stream,), daemon=True)
            pump.start()
            self._pumps.append(pump)

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            text = str(line).rstrip("\n")
            if self._on_line is not None:
                self._on_line(text)
            with self._cond:
                self._lines.append(text)
                self._cond.notify_all()

    @property
    def output(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def wait_line(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first output line (stdout or stderr) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                lines = list(self._lines)
                for line in lines[seen:] if seen <= len(lines) else lines:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(lines)
                left = deadline - time.monotonic()
                if self.popen.poll() is not None and not left > 0.2:
                    break
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        tail = "\n    ".join(self.output[-15:])
        raise TimeoutError(
            f"{self.name} (pid {self.pid}, rc {self.popen.poll()}): no line matching {pattern!r} "
            f"in {timeout} s; last output:\n    {tail}"
        )

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def mem_kib(self) -> tuple[int, int]:
        return read_mem_kib(self.pid)

    def cpu(self) -> CpuSample:
        return read_cpu(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM this PID (and the descendants it forked), SIGKILL what is left; close its
        pipes once their readers have seen the end."""
        if self.popen.poll() is None:
            self._terminate(grace)
        for pump in self._pumps:
            pump.join(2.0)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _terminate(self, grace: float) -> None:
        tree = proc_tree(self.pid)
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        for p in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(2.0)


class ProcGroup:
    """Owns processes; stops them all (reverse start order) on exit."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], **kwargs: object) -> Proc:
        proc = Proc(name, argv, **kwargs)  # type: ignore[arg-type]
        self.procs.append(proc)
        return proc

    def result_line(
        self, name: str, argv: Sequence[str], pattern: str, timeout: float, **kwargs: object
    ) -> re.Match[str]:
        """Run ``argv`` until it prints a line matching ``pattern`` (its match), then stop it."""
        proc = self.start(name, argv, **kwargs)
        try:
            return proc.wait_line(pattern, timeout=timeout)
        finally:
            proc.stop()
            self.procs.remove(proc)

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as error:  # keep stopping the others
                print(f"bench: stopping {proc.name} (pid {proc.pid}): {error}", file=sys.stderr)
        self.procs.clear()
