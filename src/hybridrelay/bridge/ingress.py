"""The ingress (``-L``): a local TCP or Unix listening socket carried to a hybrid connection.

Each accepted socket gets one task (owned by the forward's :class:`ConnectionGroup`) that
opens a relayed stream, sends the azbridge preamble when the forward has a port name, and then
runs :func:`pipe`. The socket's first bytes wait in its bounded buffer (reading pauses when it
is full) until the relay connection is up.

Clients outside the forward's allow-list, and clients beyond ``max_connections``, are reset
at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from hybridrelay.bridge.config import BridgeConfig, LocalForward
from hybridrelay.bridge.pipe import (
    ConnectionGroup,
    RelayStream,
    SocketLeg,
    close_stream,
    pipe,
)
from hybridrelay.bridge.preamble import PreambleRejectedError, send_preamble
from hybridrelay.bridge.specs import Protocol
from hybridrelay.exceptions import ConfigurationError, RelayError
from hybridrelay.observability.bridge_metrics import ForwardMetrics, Outcome, relay_refusal
from hybridrelay.protocol.azbridge import Mode
from hybridrelay.socket_errors import bind_failure
from hybridrelay.tcp_keepalive import set_tcp_keepalive

__all__ = ["Connect", "StreamIngress", "describe_failure", "format_address", "peer_host"]

logger = logging.getLogger("hybridrelay.bridge")

#: Pending connections the kernel queues for a listening socket (as the relay's own ports).
LISTEN_BACKLOG = 1024

#: Opens a relayed stream to the forward's hybrid connection.
Connect = Callable[[], Awaitable[RelayStream]]


def format_address(address: Any) -> str:
    """``host:port``, ``[v6]:port`` or the Unix path, for logs."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address) if address else "unix-peer"


def peer_host(address: Any) -> str | None:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return None


class StreamIngress:
    """Serves one TCP or Unix ``-L`` forward.

    Args:
        forward: the forward.
        config: global options (timeouts, limits, default bind address).
        connect: opens a stream to the hybrid connection.
        metrics: the forward's series (each connection's outcome and bytes).
    """

    def __init__(
        self,
        forward: LocalForward,
        config: BridgeConfig,
        connect: Connect,
        *,
        metrics: ForwardMetrics,
    ) -> None:
        if not forward.spec.protocol.is_stream:
            raise ValueError("StreamIngress serves TCP and Unix forwards")
        self.forward = forward
        self.config = config
        self._connect = connect
        self._metrics = metrics
        self._name = f"-L {forward.spec}"
        self._group: ConnectionGroup | None = None
        #: The addresses actually bound (port 0 resolved), set once listening.
        self.addresses: list[Any] = []

    async def serve(self, started: Callable[[], None], stop: asyncio.Event) -> None:
        """Listen until ``stop`` is set, then stop accepting and drain the open connections.

        Raises:
            ConfigurationError: the address cannot be bound.
        """
        spec = self.forward.spec
        loop = asyncio.get_running_loop()
        async with ConnectionGroup(
            self._name, self.config.max_connections_of(self.forward)
        ) as group:
            self._group = group
            try:
                # A burst of clients must wait in the accept queue, not be reset: asyncio's
                # default backlog of 100 dropped clients of a 500-connection burst.
                if spec.protocol is Protocol.UNIX:
                    assert spec.path is not None
                    _remove_stale_unix_socket(spec.path)
                    server = await loop.create_unix_server(
                        self._new_leg, spec.path, backlog=LISTEN_BACKLOG
                    )
                else:
                    host = self.config.bind_host(self.forward)
                    server = await loop.create_server(
                        self._new_leg, host, spec.port, reuse_address=True, backlog=LISTEN_BACKLOG
                    )
            except OSError as exc:
                raise ConfigurationError(
                    f"{self._name}: "
                    + bind_failure(spec.endpoint_text(), exc, port_option="in the -L spec")
                ) from exc
            try:
                self.addresses = [s.getsockname() for s in server.sockets]
                logger.info(
                    "%s: listening on %s",
                    self._name,
                    ", ".join(format_address(a) for a in self.addresses),
                )
                started()
                await stop.wait()
            finally:
                server.close()
                if spec.protocol is Protocol.UNIX and spec.path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(spec.path)
            await group.drain(self.config.shutdown_grace_period)

    def _new_leg(self) -> SocketLeg:
        return SocketLeg(on_connected=self._accepted)

    def _accepted(self, leg: SocketLeg) -> None:
        group = self._group
        peer = format_address(leg.peername)
        host = peer_host(leg.peername)
        if host is not None and not self.forward.allows(host):
            logger.warning("%s: refused %s (not in the allow-list)", self._name, peer)
            self._metrics.outcome(Outcome.REFUSED_ALLOW_LIST)
            leg.abort()
            return
        if group is None or group.full:
            logger.warning("%s: refused %s (max_connections reached)", self._name, peer)
            self._metrics.outcome(Outcome.REFUSED_CAPACITY)
            leg.abort()
            return
        # No WebSocket ping crosses this hop: the kernel's probes find a silent client.
        set_tcp_keepalive(leg.transport, self.config.keep_alive_interval)
        cid = uuid.uuid4().hex[:12]
        group.spawn(self._handle(leg, cid, peer), name=f"ingress-{cid}")

    async def _handle(self, leg: SocketLeg, cid: str, peer: str) -> None:
        spec = self.forward.spec
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                stream = await self._connect()
        except (RelayError, TimeoutError) as exc:
            logger.warning(
                "%s: [%s] from %s: cannot reach hybrid connection %r: %s",
                self._name,
                cid,
                peer,
                spec.hybrid_connection,
                describe_failure(exc),
            )
            self._metrics.outcome(relay_refusal(exc))
            leg.abort()
            return
        except BaseException:
            leg.abort()
            raise
        # One INFO line per connection (at its end) keeps logging off the hot path.
        logger.debug("%s: [%s] %s -> relay connection %s", self._name, cid, peer, stream.id)
        initial = b""
        try:
            if spec.port_name is not None:
                async with asyncio.timeout(self.config.handshake_timeout):
                    initial = await send_preamble(stream, spec.port_name, Mode.STREAM)
        except (RelayError, TimeoutError) as exc:
            logger.warning(
                "%s: [%s] relay connection %s: port %r refused: %s",
                self._name,
                cid,
                stream.id,
                spec.port_name,
                describe_failure(exc),
            )
            refused = isinstance(exc, PreambleRejectedError)
            self._metrics.outcome(Outcome.PORT_REFUSED if refused else Outcome.HANDSHAKE_FAILED)
            leg.abort()
            await close_stream(stream, 1000, "")
            return
        except BaseException:
            leg.abort()
            await close_stream(stream, 1001, "bridge shutting down")
            raise
        stats = await pipe(leg, stream, self._metrics, initial=initial)
        logger.info(
            "%s: [%s] %s, relay connection %s closed%s: %d bytes up, %d bytes down, %.1f s",
            self._name,
            cid,
            peer,
            stream.id,
            f" ({stats.error})" if stats.error else "",
            stats.bytes_up,
            stats.bytes_down,
            stats.duration,
        )


def describe_failure(exc: BaseException) -> str:
    """A failed step's cause, for a log line: ``timed out``, else the error's type and text."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left behind by a dead process; refuse to touch anything else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError:
        return  # let the bind report it
    if not stat.S_ISSOCK(mode):
        raise ConfigurationError(f"-L unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)  # nobody is listening: stale
    else:
        raise ConfigurationError(f"-L unix:{path}: another process is listening on it")
    finally:
        probe.close()
