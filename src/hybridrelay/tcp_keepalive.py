"""TCP keep-alive on the raw TCP hops: a client's connection to the relay's own ``ingress:``
port, and to a ``bridge -L`` port.

No WebSocket ping can cross those hops, so a link that goes silent (a NAT that forgot the
flow, a cable pulled, a peer powered off without a FIN) would hold the connection, its
relayed partner and their buffers until the kernel's defaults give up: two hours of idle
before the first probe, and some fifteen minutes of retransmissions for data sent into the
void. The same interval that paces the WebSocket keep-alive paces these probes instead:
the first after ``interval`` seconds of silence, then three more ``interval / 3`` apart, so a
dead peer is dropped about ``2 × interval`` after it went quiet (``TCP_USER_TIMEOUT`` bounds
the case where our own data is unacknowledged the same way). A peer that is alive but slow
to read acknowledges the probes and the data, so backpressure is never mistaken for death.
"""

from __future__ import annotations

import math
import socket
from typing import Any

__all__ = ["KEEPALIVE_PROBES", "keepalive_options", "set_tcp_keepalive"]

#: Probes after the first silent interval before the kernel drops the connection.
KEEPALIVE_PROBES = 3


def keepalive_options(interval: float) -> dict[str, int]:
    """The socket options for ``interval`` seconds (by their ``socket`` module names): whole
    seconds, at least one, as the kernel takes them; the user timeout in milliseconds."""
    idle = max(1, math.ceil(interval))
    between = max(1, math.ceil(interval / KEEPALIVE_PROBES))
    return {
        "TCP_KEEPIDLE": idle,
        "TCP_KEEPINTVL": between,
        "TCP_KEEPCNT": KEEPALIVE_PROBES,
        "TCP_USER_TIMEOUT": (idle + between * KEEPALIVE_PROBES) * 1000,
    }


def set_tcp_keepalive(transport: Any, interval: float) -> bool:
    """Turn on keep-alive probes for ``transport``'s socket (see the module); False when it
    is not a TCP socket (a Unix socket) or the transport has none. Options this platform
    lacks are skipped: ``SO_KEEPALIVE`` with the system's timing is still better than none."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in keepalive_options(interval).items():
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:  # the connection is already gone: nothing to keep alive
        return False
    return True
