"""The legs of relayed connections, tracked for the relay's ordered shutdown.

Once spliced, a connection lives on its transports alone (``transport/splice.py``): no task
owns it. The relay keeps its legs here so that a shutdown can send each a close frame (1001),
wait a bounded time for the peers' answers, and abort what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from hybridrelay.transport.base import CloseCode
from hybridrelay.transport.splice import RawLeg, SpliceLeg

__all__ = ["RelayedLegs"]

logger = logging.getLogger("hybridrelay.server")


class RelayedLegs:
    """The relay's live legs (senders', listeners' rendezvous and ingress connections)."""

    def __init__(self) -> None:
        self._legs: set[SpliceLeg | RawLeg] = set()
        self._gone = asyncio.Event()

    def __len__(self) -> int:
        return len(self._legs)

    def __iter__(self) -> Iterator[SpliceLeg | RawLeg]:
        return iter(list(self._legs))

    def track(self, leg: SpliceLeg | RawLeg) -> None:
        """Track ``leg`` until it is lost; :meth:`lost` must be the leg's ``on_lost``."""
        self._legs.add(leg)
        self._gone.clear()

    def lost(self, leg: SpliceLeg | RawLeg) -> None:
        self._legs.discard(leg)
        if not self._legs:
            self._gone.set()
        logger.debug("%s closed: %d bytes forwarded from it", leg.name, leg.bytes_forwarded)

    async def close(self, grace: float) -> None:
        """Send every leg a close frame (1001) and wait up to ``grace`` seconds for the peers'
        answers to end the splices; abort the legs still open then."""
        for leg in list(self._legs):
            leg.send_close(CloseCode.GOING_AWAY, "relay shutting down")
            leg.expect_close_answer()
        if self._legs:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._gone.wait()
            for leg in list(self._legs):  # no answer within the grace period
                leg.abort()
