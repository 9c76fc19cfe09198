"""``hybridrelay serve --workers N``: the supervisor, the parent of N worker processes.

Each worker is ``hybridrelay serve`` again (the same arguments, :data:`WORKER_ENV` naming its
index, ``--port`` the port resolved here), a full cluster node (``server/worker.py``). The
supervisor:

* holds the shared port bound (SO_REUSEPORT, not listening: it takes no connection) for its
  whole life, so a restarted worker binds the same port, even when ``server.port`` is 0;
* prints ``... relay listening on URL`` once every worker printed its own (readiness), after a
  ``worker I (pid P) ready: ...`` line per worker; the workers' other output is passed on with
  a ``[worker I]`` prefix (their logs go to stderr directly);
* restarts a worker that dies, after a backoff (0.5 s, doubling to 30 s; back to 0.5 s once a
  worker ran 60 s), and logs it; a worker that fails before the first readiness stops the
  whole start, with that worker's exit status (its one-line error is on stderr already);
* forwards SIGTERM/SIGINT (each worker drains as a node does: listeners told 1012, relayed
  connections get the grace period; a second signal stops them at once) and SIGHUP (reload),
  and exits once all have exited: 0 if they all exited 0, else 1. A worker that outlives its
  grace period by :data:`_EXIT_SLACK` seconds is killed.

Workers get SIGTERM if the supervisor dies (Linux's parent-death signal), so none is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hybridrelay import __version__
from hybridrelay.cli.logs import say
from hybridrelay.cli.signals import stop_on_signals
from hybridrelay.exceptions import ConfigurationError
from hybridrelay.server.config import RelayConfig
from hybridrelay.server.worker import WORKER_ENV
from hybridrelay.socket_errors import bind_failure

__all__ = ["READY_MARK", "supervise"]

logger = logging.getLogger("hybridrelay.workers")

#: What a worker (and the supervisor, once all are ready) prints when it serves.
READY_MARK = "relay listening on "
#: A worker's line naming the base URL its rendezvous addresses use (``serve`` prints it).
RENDEZVOUS_MARK = "rendezvous addresses name "
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
#: A worker that ran this long before it died is restarted after the first backoff again.
_BACKOFF_RESET_AFTER = 60.0
#: How long past the grace period a stopping worker may take before it is killed.
_EXIT_SLACK = 15.0
#: How long a worker may take to print its readiness line.
_START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The worker gets SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def shared_socket(host: str, port: int) -> socket.socket:
    """The shared port, bound with SO_REUSEPORT and not listening (port 0 resolved).

    Raises:
        ConfigurationError: the platform has no SO_REUSEPORT, or the port cannot be bound.
    """
    reuse_port = getattr(socket, "SO_REUSEPORT", None)
    if reuse_port is None:
        raise ConfigurationError(
            "server.workers: this platform has no SO_REUSEPORT to share the port: run 1 "
            "worker per port (several nodes on several ports)"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not host[0].isdigit() and ":" not in host:  # a host name: its first address
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(bind_failure(f"{host}:{port}", exc, port_option="--port")) from exc
    return sock


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = _BACKOFF_FIRST
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    rendezvous: str = "-"
    #: The exit status of its last process (None while it runs).
    status: int | None = None


class Supervisor:
    """N workers of one ``serve``; :meth:`run` returns the exit status."""

    def __init__(self, config: RelayConfig, argv: Sequence[str], port: int) -> None:
        self._config = config
        self._argv = list(argv)
        self._port = port
        self._workers = [_Worker(i) for i in range(config.server.workers)]
        self._stopping = False
        self._stop = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        #: The first worker that failed before the first readiness: its exit status.
        self._failed_start: int | None = None

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "hybridrelay", *self._argv, "--port", str(self._port)]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with stop_on_signals(self._on_stop, reload=self._on_reload):
            self._tasks = [
                loop.create_task(self._keep(worker), name=f"hybridrelay-worker-{worker.index}")
                for worker in self._workers
            ]
            ready = loop.create_task(self._announce_when_ready())
            await self._stop.wait()
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
            await self._stop_all()
        if self._failed_start is not None:
            return self._failed_start
        failed = [w for w in self._workers if w.status not in (0, None)]
        say("hybridrelay: relay stopped" + (" (a worker failed)" if failed else ""))
        return 1 if failed else 0

    def _on_stop(self) -> None:
        if self._stopping:  # a second signal: the workers stop draining at once
            self._signal_all(signal.SIGTERM)
            return
        self._stopping = True
        logger.info("stopping %d worker(s): each drains", len(self._workers))
        self._stop.set()

    def _on_reload(self) -> None:
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def _announce_when_ready(self) -> None:
        for worker in self._workers:
            await worker.ready.wait()
        self._all_ready.set()
        base = _base_url(self._config, self._port)
        say(f"hybridrelay {__version__}: {len(self._workers)} workers ready; {READY_MARK}{base}")

    async def _keep(self, worker: _Worker) -> None:
        """Run ``worker``, again after a backoff each time it dies, until the stop."""
        while not self._stopping:
            status = await self._run_once(worker)
            if self._stopping:
                return
            if not self._all_ready.is_set() and not worker.ready.is_set():
                # It never served: the configuration, a port, Redis. Stop the start.
                logger.error(
                    "worker %d exited with status %s before it was ready: stopping",
                    worker.index,
                    status,
                )
                self._failed_start = status or 1
                self._stopping = True
                self._stop.set()
                return
            ran = time.monotonic() - worker.started_at
            if ran >= _BACKOFF_RESET_AFTER:
                worker.backoff = _BACKOFF_FIRST
            logger.warning(
                "worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                worker.index,
                worker.process.pid if worker.process else "-",
                _describe_status(status),
                ran,
                worker.backoff,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(worker.backoff):
                    await self._stop.wait()
            worker.backoff = min(worker.backoff * 2, _BACKOFF_MAX)

    async def _run_once(self, worker: _Worker) -> int:
        """Start ``worker``'s process, pass its output on, return its exit status."""
        worker.ready.clear()
        env = {**os.environ, WORKER_ENV: str(worker.index)}
        process = await asyncio.create_subprocess_exec(
            *self._command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        worker.process, worker.status = process, None
        worker.started_at = time.monotonic()
        assert process.stdout is not None
        loop = asyncio.get_running_loop()
        reading = loop.create_task(self._read(worker, process.stdout))
        ready = loop.create_task(worker.ready.wait())
        try:
            async with asyncio.timeout(_START_TIMEOUT):
                await asyncio.wait([reading, ready], return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            logger.error(
                "worker %d (pid %d) not ready in %gs: killed",
                worker.index,
                process.pid,
                _START_TIMEOUT,
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        finally:
            ready.cancel()
        await reading  # ends with the process's stdout
        worker.status = await process.wait()
        return worker.status

    async def _read(self, worker: _Worker, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            if RENDEZVOUS_MARK in text:  # named in the ready line
                worker.rendezvous = text.rsplit(RENDEZVOUS_MARK, 1)[1].split()[0]
                continue
            if READY_MARK in text and not worker.ready.is_set():
                pid = worker.process.pid if worker.process else "-"
                say(f"worker {worker.index} (pid {pid}) ready: rendezvous {worker.rendezvous}")
                worker.ready.set()
                continue
            say(f"[worker {worker.index}] {text}")

    async def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        grace = self._config.server.shutdown_grace_period
        try:
            async with asyncio.timeout(grace + _EXIT_SLACK):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        except TimeoutError:
            logger.error("workers still running %gs after the stop: killed", grace + _EXIT_SLACK)
            self._signal_all(signal.SIGKILL)
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _describe_status(status: int | None) -> str:
    if status is not None and status < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-status).name}"
    return f"status {status}"


def _base_url(config: RelayConfig, port: int) -> str:
    host = config.server.host
    if ":" in host:
        host = f"[{host}]"
    return f"{'wss' if config.server.tls else 'ws'}://{host}:{port}"


def supervise(config: RelayConfig, argv: Sequence[str]) -> int:
    """Run ``config.server.workers`` workers of ``hybridrelay <argv>`` until SIGTERM/SIGINT;
    the exit status."""
    shared = shared_socket(config.server.host, config.server.port)
    if config.store.spread == "weighted":
        logger.info(
            "store.spread is weighted: a sender on one worker is given to another worker's "
            "listener through Redis half the time; local-first (auto, the default, with "
            "--workers) avoids that (docs/CLUSTER.md)"
        )
    try:
        port = int(shared.getsockname()[1])
        return asyncio.run(Supervisor(config, argv, port).run())
    finally:
        shared.close()
