#!/usr/bin/env python3
"""Diagnosis: ``hybridrelay`` at ``--log-level debug`` with each relay control channel's last
reads and keep-alive ticks kept in memory, and logged (one WARNING line, ``KEEPALIVE-TRACE``)
when the keep-alive drops the channel or when the channel ends.

Nothing is written per read or per tick (a log line at every ping and pong changed the timing
enough to hide the drop it was looking for): each read records (loop time, bytes, its first
two bytes in hex: ``8a80`` a masked pong, ``8980`` a masked ping), each tick (``tick``, loop
time, when the peer was last heard from). Used by ``bench/experiments/cluster_idle_drop.py``;
by hand: ``BENCH_HYBRIDRELAY=bench/experiments/keepalive_trace_wrapper.py python -m bench ...``.
"""

from __future__ import annotations

import collections
import logging
import sys
from typing import Any

from hybridrelay.cli.main import main
from hybridrelay.transport import control_leg
from hybridrelay.transport.receive_buffer import receive_buffer

_logger = logging.getLogger("hybridrelay.server")
Leg = control_leg.ControlLeg


def _trace(leg: Leg) -> collections.deque[tuple[Any, ...]]:
    found: collections.deque[tuple[Any, ...]] = leg.__dict__.setdefault(
        "_keepalive_trace", collections.deque(maxlen=8)
    )
    return found


def _wrap() -> None:
    buffer_updated, tick, link_dead, gone = (
        Leg.buffer_updated,
        Leg._keep_alive_tick,
        Leg._link_dead,
        Leg._gone,
    )

    def traced_buffer_updated(self: Leg, nbytes: int) -> None:
        _trace(self).append((self._clock(), nbytes, bytes(receive_buffer()[:2]).hex()))
        buffer_updated(self, nbytes)

    def traced_tick(self: Leg) -> None:
        _trace(self).append(("tick", self._clock(), self._heard_at))
        tick(self)

    def traced_link_dead(self: Leg, reason: str) -> None:
        _logger.warning("KEEPALIVE-TRACE dropped (%s): %r", reason, list(_trace(self)))
        link_dead(self, reason)

    def traced_gone(self: Leg, news: bool) -> None:
        _logger.warning("KEEPALIVE-TRACE ended: %r", list(_trace(self)))
        gone(self, news)

    Leg.buffer_updated = traced_buffer_updated  # type: ignore[method-assign]
    Leg._keep_alive_tick = traced_tick  # type: ignore[method-assign]
    Leg._link_dead = traced_link_dead  # type: ignore[method-assign]
    Leg._gone = traced_gone  # type: ignore[method-assign]


if __name__ == "__main__":
    _wrap()
    sys.argv.append("--log-level=debug")
    sys.exit(main())
