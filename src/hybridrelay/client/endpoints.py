"""Several relay endpoints (the nodes of a cluster, docs/CLUSTER.md) for a listener or a sender.

Pure: no I/O. :class:`EndpointRing` keeps the endpoint in use and the order in which the others
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

from collections.abc import Sequence

from hybridrelay.exceptions import ConfigurationError, RelayConnectionError, RelayHttpError
from hybridrelay.protocol.addressing import Endpoint, parse_endpoint

__all__ = ["FAIL_OVER_STATUSES", "EndpointRing", "worth_another_endpoint"]

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

    def use(self, index: int) -> None:
        """Make the endpoint at ``index`` (in the order given) the one in use."""
        self._index = index

    def advance(self) -> None:
        """Move to the next endpoint (after the last: the first)."""
        self._index = (self._index + 1) % len(self._endpoints)

    def in_turn(self) -> list[Endpoint]:
        """Every endpoint once, the current one first."""
        return self._endpoints[self._index :] + self._endpoints[: self._index]

    def stick(self, endpoint: Endpoint) -> None:
        """``endpoint`` worked: use it first from now on."""
        self._index = self._endpoints.index(endpoint)
