"""What the relay's endpoints report as they work: one call per event, fanned out to the
metrics (``observability/metrics.py``), the access and refusal logs
(``observability/access_log.py``, docs/LOGGING.md) and the recent errors the dashboard shows.

The endpoints call :class:`RelayObserver` once per listener, sender, relayed connection and
HTTP request, never per byte or frame: the bytes of a relayed connection are read from the
splice's own counters when it ends (``legs.py``).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from hybridrelay.observability.access_log import AccessLog, RefusalLog, redact
from hybridrelay.observability.metrics import RelayMetrics, SenderOutcome
from hybridrelay.server.legs import RelayedConnection

__all__ = ["RECENT_ERRORS", "RecentError", "RelayObserver"]

#: How many refusals and failures the dashboard keeps.
RECENT_ERRORS = 100

_OUTCOME_BY_STATUS = {
    401: SenderOutcome.UNAUTHORIZED,
    403: SenderOutcome.FORBIDDEN,
    404: SenderOutcome.NOT_FOUND,
    503: SenderOutcome.OVERLOADED,
    504: SenderOutcome.TIMED_OUT,
}


@dataclass(frozen=True, slots=True)
class RecentError:
    """A refusal or failure, as the dashboard lists it (never a token or an address secret)."""

    at: float
    kind: str
    entity: str
    status: int
    reason: str
    remote: str | None


class RelayObserver:
    """The relay's metrics, logs and recent errors, fed by its endpoints."""

    def __init__(
        self,
        metrics: RelayMetrics | None = None,
        *,
        access: AccessLog | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.metrics = metrics or RelayMetrics()
        self.access = access or AccessLog()
        self.refusals = refusals or RefusalLog()
        self.recent_errors: collections.deque[RecentError] = collections.deque(maxlen=RECENT_ERRORS)

    def _error(self, kind: str, entity: str, status: int, reason: str, remote: str | None) -> None:
        reason = redact(reason)
        self.recent_errors.append(RecentError(time.time(), kind, entity, status, reason, remote))
        self.refusals.refused(kind, entity, status, reason, remote)

    def totals(self) -> tuple[float, float]:
        """Bytes relayed by the connections that ended, and senders accepted (WebSocket,
        ingress) plus HTTP requests relayed, since the start (the dashboard's rates)."""
        moved = accepted = 0.0
        for metric in (self.metrics.relayed_bytes, self.metrics.sender_connections):
            for family in metric.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    if metric is self.metrics.relayed_bytes:
                        moved += sample.value
                    elif sample.labels.get("outcome") == SenderOutcome.ACCEPTED:
                        accepted += sample.value
        for family in self.metrics.http_requests.collect():
            accepted += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return moved, accepted

    # -- listeners ---------------------------------------------------------------------------

    def listener_online(self, entity: str) -> None:
        self.metrics.listener_connected(entity)

    def listener_offline(self, entity: str, reason: str) -> None:
        self.metrics.listener_disconnected(entity, reason)

    def listen_refused(self, entity: str, status: int, reason: str, remote: str | None) -> None:
        self._error("listen", entity, status, reason, remote)

    # -- senders -----------------------------------------------------------------------------

    def sender_refused(
        self,
        kind: str,
        entity: str,
        status: int,
        reason: str,
        remote: str | None,
        *,
        by_listener: bool = False,
        accept_seconds: float | None = None,
    ) -> None:
        """A sender (``connect`` or ``ingress``) that was not relayed."""
        if by_listener:
            outcome = SenderOutcome.REJECTED
        elif status == 404 and reason.startswith("There are no listeners"):
            outcome = SenderOutcome.NO_LISTENER
        else:
            outcome = _OUTCOME_BY_STATUS.get(status, SenderOutcome.FAILED)
        self.metrics.sender(entity, outcome, accept_seconds)
        if outcome == SenderOutcome.TIMED_OUT:
            self.metrics.rendezvous_expired.inc()
        self._error(kind, entity, status, reason, remote)

    def connection_joined(self, connection: RelayedConnection, accept_seconds: float) -> None:
        self.metrics.sender(connection.entity, SenderOutcome.ACCEPTED, accept_seconds)
        self.metrics.connection_opened(connection.entity)

    def connection_finished(self, connection: RelayedConnection) -> None:
        self.metrics.connection_closed(
            connection.entity,
            to_listener=connection.bytes_to_listener,
            to_sender=connection.bytes_to_sender,
        )
        self.access.connection(
            connection.tracking_id,
            connection.entity,
            kind=connection.kind,
            duration=connection.duration,
            bytes_to_listener=connection.bytes_to_listener,
            bytes_to_sender=connection.bytes_to_sender,
            sender=connection.sender_address,
            listener=connection.listener_address,
        )

    # -- HTTP --------------------------------------------------------------------------------

    def http_request(
        self,
        tracking_id: str,
        entity: str,
        *,
        method: str,
        status: int,
        seconds: float,
        request_bytes: int | None,
        response_bytes: int | None,
        remote: str | None,
    ) -> None:
        """A relayed HTTP request ended (its response sent, or refused)."""
        self.metrics.http_request(entity, status, seconds)
        self.access.http_request(
            tracking_id,
            entity,
            method=method,
            status=status,
            duration=seconds,
            request_bytes=request_bytes,
            response_bytes=response_bytes,
            sender=remote,
        )
        if status in (401, 403, 404, 429) or status >= 500:
            self._error("http", entity, status, f"answered {status}", remote)
