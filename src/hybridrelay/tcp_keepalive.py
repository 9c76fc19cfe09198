"""Finding a TCP link that went silent (a NAT that forgot the flow, a cable pulled, a peer
powered off without a FIN): no byte comes, and nothing tells us.

Two cases, two tools:

* Nothing to send (the connection is idle): on the raw TCP hops (a client's connection to
  the relay's own ``ingress:`` port, and to a ``bridge -L`` port) no WebSocket ping can
  cross, so the kernel's keep-alive probes do it (:func:`set_tcp_keepalive`): the first
  after ``interval`` seconds of silence, then three more ``interval / 3`` apart, so a dead
  peer is dropped about ``2 × interval`` after it went quiet. Without them the kernel's
  defaults wait two hours before the first probe.
* Bytes to send (our data, or a ping, waits for the peer's acknowledgement): keep-alive
  probes are not sent then, and a ping would wait behind the data. The kernel retransmits
  for some fifteen minutes before it gives up. ``TCP_USER_TIMEOUT`` would bound that, but
  Linux (since 5.11) applies it to a zero window too: a peer that is alive and merely not
  reading is dropped once it has read nothing for the timeout (measured: a socket with a
  2 s timeout, its peer not reading, was aborted after 2.5 s). So the acknowledgements are
  watched instead (:func:`acks_stalled`, ``TCP_INFO``): a peer that owes acknowledgements
  (for data in flight, or for two window probes in a row) and sent none for an interval, at
  two checks an interval apart, is dead. A peer with a closed window has acknowledged
  everything sent (the rest waits unsent) and answers the window probes, so backpressure is
  never mistaken for death. The relay's legs and the SDK's streams run this check in their
  keep-alive timers; :func:`set_tcp_keepalive` arms a timer of its own for the raw hops.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import socket
import sys
import termios
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KEEPALIVE_PROBES",
    "TcpInfo",
    "acks_stalled",
    "keepalive_options",
    "send_queued",
    "set_tcp_keepalive",
    "tcp_info",
]

logger = logging.getLogger("hybridrelay.tcp")

#: Probes after the first silent interval before the kernel drops the connection.
KEEPALIVE_PROBES = 3

#: The ioctl that reads a socket's unsent and unacknowledged bytes (SIOCOUTQ on Linux); where
#: there is none, only the transport's own buffer is looked at.
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
#: ``struct tcp_info`` (linux/tcp.h): ``tcpi_probes`` (probes sent since the last
#: acknowledgement) is byte 3, ``tcpi_unacked`` (segments in flight) the 32-bit word at 24,
#: ``tcpi_last_ack_recv`` (milliseconds since the last acknowledgement) the word at 56.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_TCP_INFO_SIZE = 60
#: Window probes in a row without an answer that only a dead link gives (see acks_stalled).
_UNANSWERED_PROBES = 2


def keepalive_options(interval: float) -> dict[str, int]:
    """The keep-alive socket options for ``interval`` seconds (by their ``socket`` module
    names): whole seconds, at least one, as the kernel takes them."""
    return {
        "TCP_KEEPIDLE": max(1, math.ceil(interval)),
        "TCP_KEEPINTVL": max(1, math.ceil(interval / KEEPALIVE_PROBES)),
        "TCP_KEEPCNT": KEEPALIVE_PROBES,
    }


def set_tcp_keepalive(transport: Any, interval: float) -> bool:
    """Turn on keep-alive probes for ``transport``'s socket and watch its acknowledgements
    while data is outstanding (see the module): the transport is aborted once its peer owes
    an acknowledgement and has sent none for an interval, at two checks an interval apart.
    False when it is not a TCP socket (a Unix socket) or the transport has none. Options
    this platform lacks are skipped: ``SO_KEEPALIVE`` with the system's timing is still
    better than none."""
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
    _watch_acks(transport, sock, interval)
    return True


def _watch_acks(transport: Any, sock: Any, interval: float) -> None:
    """Every ``interval`` until the transport closes: abort it at the second check in a row
    that finds its acknowledgements stalled. One timer per connection; it ends by itself."""
    loop = asyncio.get_running_loop()
    suspect = False

    def check() -> None:
        nonlocal suspect
        if transport.is_closing():
            return
        stalled = acks_stalled(sock, interval)
        if stalled and suspect:
            logger.info(
                "TCP connection from %s dropped: no acknowledgement for %g s",
                _peer(transport),
                2 * interval,
            )
            transport.abort()
            return
        suspect = stalled
        loop.call_later(interval, check)

    loop.call_later(interval, check)


def _peer(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def acks_stalled(sock: Any, seconds: float) -> bool:
    """Whether the peer of TCP socket ``sock`` owes acknowledgements and has sent none for
    at least ``seconds``: data is in flight, or (its window closed, so nothing is) the
    kernel's window probes went unanswered twice in a row. False where the kernel does not
    say (not Linux, not TCP, the socket closed).

    One unanswered probe is not enough: a receiver rate-limits its answers to them (Linux:
    one per ``tcp_invalid_ratelimit``, 500 ms), so a live peer with a closed window was seen
    owing one for over a second; the next probe, sent after twice the wait, is answered. The
    probes back off (up to two minutes apart), so a link that dies after the peer's window
    has long been closed is found only after two of them."""
    info = tcp_info(sock)
    if info is None:
        return False
    owed = info.unacked > 0 or info.probes >= _UNANSWERED_PROBES
    return owed and info.last_ack_ms >= seconds * 1000


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """What :func:`acks_stalled` reads of the kernel's ``TCP_INFO``."""

    #: Probes (window or keep-alive) sent since the last acknowledgement.
    probes: int
    #: Segments in flight, not acknowledged yet.
    unacked: int
    #: Milliseconds since the last acknowledgement came.
    last_ack_ms: int


def tcp_info(sock: Any) -> TcpInfo | None:
    """The kernel's ``TCP_INFO`` of ``sock``; None where it does not say (not Linux, not
    TCP, the socket closed)."""
    if sock is None or _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    if len(info) < _TCP_INFO_SIZE:
        return None
    return TcpInfo(
        probes=info[3],
        unacked=int.from_bytes(info[24:28], sys.byteorder),
        last_ack_ms=int.from_bytes(info[56:60], sys.byteorder),
    )


def send_queued(transport: Any) -> bool:
    """Whether bytes wait to go out on ``transport`` (in its own buffer, or in the kernel's
    send queue, not yet acknowledged by the peer): a ping now would wait behind them."""
    if transport.get_write_buffer_size():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None or _OUTQ is None:
        return False
    try:
        queued = bytearray(4)
        fcntl.ioctl(sock.fileno(), _OUTQ, queued)
    except (OSError, ValueError):
        return False
    return int.from_bytes(queued, "little") > 0
