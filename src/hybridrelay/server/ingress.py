"""The relay's own ingress: TCP ports on the relay, each carried to a hybrid connection.

Azure Relay only accepts WebSockets and HTTP, so with Azure a plain TCP client needs a bridge
``-L`` in front of it (client -> ingress bridge -> relay -> edge agent). A self-hosted relay
can listen on the port itself, as frp's ``remotePort`` or rathole's ``bind_addr`` do (PEERS.md
§6): the relay is then the sender. Each accepted connection is offered to a listener of the
hybrid connection exactly as a sender's connect is (an ``accept`` on a control channel, the
listener's rendezvous WebSocket, re-offer when a listener dies), and the connection is spliced
to that WebSocket as a :class:`~hybridrelay.transport.splice.RawLeg`: one process and one
WebSocket hop fewer, and nothing changes for the listener (our bridge ``-R``, azbridge, or any
SDK listener; the ``accept`` carries the client's address as ``remoteEndpoint``).

Who may connect is the operator's configuration (``ingress:`` in the relay's YAML, with an
allow-list and a connection limit), not a SAS token: the port is as open as its bind address
and ``allow`` make it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
import uuid
from typing import Any

from hybridrelay.protocol.azbridge import Mode, encode_preamble
from hybridrelay.server.broker import Accepted, Connection, Rejection, remote_endpoint
from hybridrelay.server.config import IngressConfig
from hybridrelay.server.connection_gate import ConnectionGate
from hybridrelay.server.context import RelayContext
from hybridrelay.server.legs import RelayedConnection
from hybridrelay.tcp_keepalive import set_tcp_keepalive
from hybridrelay.transport.splice import RawLeg

__all__ = ["RelayIngress"]

logger = logging.getLogger("hybridrelay.server")


def _format(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


class RelayIngress:
    """One ``ingress:`` entry: a listening TCP socket of the relay.

    Each accepted connection gets one short task, owned here, that finds it a listener through
    the relay's broker; once joined, the connection lives on its transports alone (tracked among
    the relay's legs for shutdown) and the task ends.
    """

    def __init__(
        self,
        config: IngressConfig,
        relay: RelayContext,
        *,
        gate: ConnectionGate | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        self._relay = relay
        #: SO_REUSEPORT: the port is shared by the workers of ``serve --workers``.
        self._reuse_port = reuse_port
        #: The relay's connection caps, shared with its WebSocket/HTTP port (one fd budget).
        self._gate = gate
        self._server: asyncio.Server | None = None
        self._legs: set[RawLeg] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: The address actually bound (port 0 resolved), once started.
        self.address: tuple[str, int] | None = None

    @property
    def connections(self) -> int:
        """Connections open or being set up."""
        return len(self._legs)

    async def start(self) -> None:
        """Bind and listen.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        factory = self._gate.wrap(self._new_leg, read_head=False) if self._gate else self._new_leg
        self._server = await loop.create_server(
            factory,
            self.config.host,
            self.config.port,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            backlog=1024,
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        name = f"/{self.config.port_name}" if self.config.port_name else ""
        logger.info(
            "ingress listening on %s%s -> %r",
            _format(self.address),
            name,
            self.config.hybrid_connection,
        )

    @property
    def accepting(self) -> bool:
        """The port takes new connections (started, and no drain or close began)."""
        return self._server is not None and self._server.is_serving()

    def stop_accepting(self) -> None:
        """Close the listening socket (a drain): connections already made carry on."""
        if self._server is not None:
            self._server.close()

    async def aclose(self) -> None:
        """Stop accepting; connections still looking for a listener are reset. Joined
        connections are the server's to close (they are among its tracked legs)."""
        self.stop_accepting()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- per connection --------------------------------------------------------------------

    def _new_leg(self) -> RawLeg:
        return RawLeg(on_connected=self._accepted, on_lost=self._lost)

    def _accepted(self, leg: RawLeg) -> None:
        peer = leg.peername
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        # Refusals are logged by the observer, rate-limited (a flood cannot fill a disk).
        if host and not self.config.allows(host):
            self._relay.observer.sender_refused(
                "ingress",
                self.config.hybrid_connection,
                403,
                "not in the allow-list",
                _format(peer),
            )
            leg.abort()
            return
        if len(self._legs) >= self.config.max_connections:
            self._relay.observer.sender_refused(
                "ingress",
                self.config.hybrid_connection,
                503,
                f"max_connections {self.config.max_connections} reached",
                _format(peer),
            )
            leg.abort()
            return
        self._legs.add(leg)
        # No WebSocket ping crosses this hop: the kernel's probes find a silent client.
        set_tcp_keepalive(leg.transport, self._relay.config.limits.keep_alive_interval)
        task = asyncio.get_running_loop().create_task(self._connect(leg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self, leg: RawLeg) -> None:
        self._legs.discard(leg)
        if leg.peer is not None:  # joined: tracked among the relay's legs
            self._relay.legs.lost(leg)

    async def _connect(self, leg: RawLeg) -> None:
        started = time.monotonic()
        entity = self._relay.store.get(self.config.hybrid_connection)
        if entity is None:
            reason = "the hybrid connection does not exist (yet)"
            self._relay.observer.sender_refused(
                "ingress", self.config.hybrid_connection, 404, reason, _format(leg.peername)
            )
            self._refuse(leg, reason)
            return
        connection_id = str(uuid.uuid4())
        leg.name = f"{connection_id} on {entity.name!r} (ingress {_format(leg.peername)})"
        # The accept carries the headers of the upgrade a sender would have made: listeners
        # check them (hyco-ws refuses an accept without Sec-WebSocket-Key, PROTOCOL.md 9).
        headers = {
            "Host": _format(self.address),
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode("ascii"),
        }
        connection = Connection(connection_id, headers, remote=remote_endpoint(leg.peername))
        try:
            async with self._relay.broker.offer(
                entity.name, connection, self._relay.config.limits
            ) as (pending, outcome):
                if not isinstance(outcome, Accepted):
                    reason = outcome.description
                    self._relay.observer.sender_refused(
                        "ingress",
                        entity.name,
                        outcome.status,
                        reason,
                        _format(leg.peername),
                        by_listener=isinstance(outcome, Rejection),
                        accept_seconds=time.monotonic() - started,
                    )
                    if isinstance(outcome, Rejection):
                        reason = f"the listener refused it ({outcome.status} {reason})"
                    self._refuse(leg, reason)
                    return
                assert pending is not None
                if leg.lost:
                    return  # the client went away meanwhile; leaving closes the listener's leg
                if self.config.port_name:
                    leg.set_preamble(encode_preamble(self.config.port_name, Mode.STREAM))
                self._relay.legs.track(leg)
                listener = pending.splice.listener
                pending.splice.join(leg)
                if listener is not None:
                    relayed = RelayedConnection(
                        connection_id,
                        entity.name,
                        "ingress",
                        leg,
                        listener,
                        _format(leg.peername),
                        pending.listener_address,
                    )
                    self._relay.legs.joined(relayed)
                    self._relay.observer.connection_joined(relayed, time.monotonic() - started)
        except BaseException:
            if leg.peer is None:
                leg.abort()
            raise
        logger.debug("%s: relayed", leg.name)

    def _refuse(self, leg: RawLeg, reason: str) -> None:
        logger.debug(
            "ingress %s: connection from %s reset: %s",
            self.config.label,
            _format(leg.peername),
            reason,
        )
        leg.abort()
