"""Several relay endpoints (the nodes of a cluster, docs/CLUSTER.md) for a listener or a sender.

No I/O of its own. :class:`EndpointRing` keeps the endpoint in use and the order in which the others
are tried; :func:`worth_another_endpoint` says which failures another node may not share:

* the relay could not be reached (refused, reset, timed out, a TLS or handshake failure): that
  node may be down while the others are up;
* it answered **502 or 503**: a relay shutting down (a drain answers new connects 503), one
  without room right now, or a load balancer in front of it with no healthy node.

Everything else is the namespace's answer and the same on every node: 401/403 (the key),
404 (no such hybrid connection, or no listener), 429 (a limit), a listener's own rejection,
504 (the listener was told and did not answer in time: the time is spent).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from hybridrelay.exceptions import (
    ConfigurationError,
    RelayConnectionError,
    RelayError,
    RelayHttpError,
)
from hybridrelay.protocol.addressing import Endpoint, parse_endpoint

__all__ = ["FAIL_OVER_STATUSES", "EndpointRing", "first_that_answers", "worth_another_endpoint"]

T = TypeVar("T")

#: Refusals of one node that another node may not give.
FAIL_OVER_STATUSES = frozenset({502, 503})


def worth_another_endpoint(exc: BaseException) -> bool:
    """Whether a connect that failed with ``exc`` may succeed on another node."""
    if isinstance(exc, RelayHttpError):
        return exc.status in FAIL_OVER_STATUSES
    return isinstance(exc, RelayConnectionError)


class EndpointRing:
    """The endpoints given, in turn; :attr:`current` is the one in use (sticky: it stays until
    something fails on it)."""

    def __init__(self, endpoint: str | Sequence[str]) -> None:
        texts = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        self._endpoints = [parse_endpoint(text) for text in texts]
        if not self._endpoints:
            raise ConfigurationError("at least one endpoint is required")
        self._index = 0

    def __len__(self) -> int:
        return len(self._endpoints)

    @property
    def current(self) -> Endpoint:
        return self._endpoints[self._index]

    @property
    def index(self) -> int:
        """The position of :attr:`current` in the order given."""
        return self._index

    @property
    def given(self) -> Sequence[Endpoint]:
        """The endpoints in the order given."""
        return self._endpoints

    def in_turn(self) -> list[Endpoint]:
        """Every endpoint once, the current one first."""
        return self._endpoints[self._index :] + self._endpoints[: self._index]

    def stick(self, endpoint: Endpoint) -> None:
        """Use ``endpoint`` (one of :attr:`given`) from now on, first (it worked, or it is
        being tried)."""
        self._index = self._endpoints.index(endpoint)


async def first_that_answers(
    endpoints: Sequence[Endpoint],
    attempt: Callable[[Endpoint], Awaitable[T]],
    *,
    give_up: Callable[[], bool],
    on_failure: Callable[[Endpoint, RelayError], None],
) -> tuple[Endpoint, T]:
    """``attempt`` on ``endpoints`` in turn until one works: the endpoint and its result. A
    failure another node may not share (:func:`worth_another_endpoint`) is reported to
    ``on_failure`` and the next one tried, unless it was the last or ``give_up()``; any
    other failure is raised at once."""
    for index, endpoint in enumerate(endpoints):
        try:
            return endpoint, await attempt(endpoint)
        except RelayError as exc:
            last = index == len(endpoints) - 1
            if last or give_up() or not worth_another_endpoint(exc):
                raise
            on_failure(endpoint, exc)
    raise ConfigurationError("at least one endpoint is required")
