"""The bridge's Prometheus metrics, made with ``prometheus_client`` (docs/METRICS.md).

Like the relay's (:mod:`hybridrelay.observability.metrics`), they live in a registry of the
process' own, never the library's global one, and hybrid connections are labelled through
:class:`~hybridrelay.observability.metrics.EntityLabels` (capped; past the cap
``entity="_other"``).

A bridge's forwards are fixed by its configuration, so the label lookup is done once per
forward, not once per event: :meth:`BridgeMetrics.forward` gives a :class:`ForwardMetrics`
holding the labelled series of that forward, and the data path calls its methods, each one or
two increments of a series it already holds. Nothing is recorded per chunk: the bytes of a
connection are added once at its end, from the pump's own counters
(:class:`~hybridrelay.bridge.pipe.PipeStats`).
"""

from __future__ import annotations

import enum

from prometheus_client import Counter

from hybridrelay.exceptions import RelayConnectionError, RelayHttpError
from hybridrelay.observability.metrics import MetricMaker, new_registry

__all__ = [
    "BridgeMetrics",
    "DropReason",
    "ForwardKind",
    "ForwardMetrics",
    "ListenerMetrics",
    "Outcome",
    "relay_refusal",
]


class ForwardKind(enum.StrEnum):
    """The ``kind`` label: which sort of forward."""

    LOCAL = "local"  # -L: a local socket carried to a hybrid connection
    REMOTE = "remote"  # -R: a hybrid connection carried to a destination
    HTTP = "http"  # -H: relayed HTTP requests to an upstream


class Outcome:
    """Values of the ``outcome`` label of ``hybridrelay_bridge_connections_total``.

    A relay refusal with a status is ``relay_STATUS`` for the statuses in
    :data:`RELAY_STATUSES` and ``relay_refused`` for any other (so the label stays bounded
    whatever a listener answers).
    """

    ACCEPTED = "accepted"
    REFUSED_ALLOW_LIST = "refused_allow_list"
    REFUSED_CAPACITY = "refused_capacity"
    REFUSED_DRAINING = "refused_draining"
    RELAY_UNREACHABLE = "relay_unreachable"
    RELAY_REFUSED = "relay_refused"
    PORT_REFUSED = "port_refused"
    HANDSHAKE_FAILED = "handshake_failed"
    DESTINATION_UNREACHABLE = "destination_unreachable"
    DESTINATION_TIMEOUT = "destination_timeout"
    FAILED = "failed"
    #: The statuses that get a value of their own.
    RELAY_STATUSES = frozenset({400, 401, 403, 404, 429, 500, 502, 503, 504})


class DropReason:
    """Values of the ``reason`` label of ``hybridrelay_bridge_udp_datagrams_dropped_total``."""

    ALLOW_LIST = "allow_list"  # a new flow's sender is outside the allow-list
    MAX_FLOWS = "max_flows"  # a new flow beyond max_udp_flows
    QUEUE_FULL = "queue_full"  # a flow's queue was full (the relay was slower than the sender)


def relay_refusal(exc: BaseException) -> str:
    """The outcome for an error of opening a relayed connection (-L)."""
    if isinstance(exc, RelayHttpError):
        status = exc.status
        if status in Outcome.RELAY_STATUSES:
            return f"relay_{status}"
        return Outcome.RELAY_REFUSED
    if isinstance(exc, TimeoutError | RelayConnectionError):
        # RelayTimeoutError is a RelayConnectionError: nothing answered, or not in time.
        return Outcome.RELAY_UNREACHABLE
    return Outcome.FAILED  # a token that could not be made, a protocol error, ...


class ForwardMetrics:
    """The series of one forward (one ``kind`` and hybrid connection): what its data path
    calls. Made by :meth:`BridgeMetrics.forward`."""

    def __init__(self, metrics: BridgeMetrics, kind: ForwardKind, entity: str) -> None:
        label = metrics.entity_label(entity)
        self._connections = metrics.connections
        self._kind = kind.value
        self._label = label
        self._outcomes: dict[str, Counter] = {}
        self._accepted = self._outcome(Outcome.ACCEPTED)
        self._active = metrics.connections_active.labels(kind.value, label)
        self._to_relay = metrics.bytes.labels(kind.value, label, "to_relay")
        self._from_relay = metrics.bytes.labels(kind.value, label, "from_relay")
        self._flows = metrics.udp_flows_active.labels(kind.value, label)
        self._dropped = metrics.udp_datagrams_dropped
        self._http = metrics.http_requests
        self._http_classes: dict[str, Counter] = {}
        self._latency = metrics.http_request_latency.labels(label)

    def _outcome(self, outcome: str) -> Counter:
        series = self._outcomes.get(outcome)
        if series is None:
            series = self._outcomes[outcome] = self._connections.labels(
                self._kind, self._label, outcome
            )
        return series

    # -- TCP and Unix connections, UDP flows ------------------------------------------------

    def outcome(self, outcome: str) -> None:
        """A connection (or flow, or request) that was not forwarded, and why (the accepted
        ones are counted by :meth:`opened`, :meth:`flow_opened` and :meth:`http_request`)."""
        self._outcome(outcome).inc()

    def opened(self) -> None:
        """A stream connection is forwarded from now on (counted as accepted)."""
        self._accepted.inc()
        self._active.inc()

    def closed(self, to_relay: int, from_relay: int) -> None:
        """A stream connection of :meth:`opened` ended; its bytes each way."""
        self._active.dec()
        self._to_relay.inc(to_relay)
        self._from_relay.inc(from_relay)

    def flow_opened(self) -> None:
        """A UDP flow is forwarded from now on (counted as accepted)."""
        self._accepted.inc()
        self._flows.inc()

    def flow_closed(self, to_relay: int, from_relay: int, dropped: int = 0) -> None:
        """A UDP flow of :meth:`flow_opened` ended: payload bytes each way, datagrams its
        full queue dropped."""
        self._flows.dec()
        self._to_relay.inc(to_relay)
        self._from_relay.inc(from_relay)
        if dropped:
            self.datagrams_dropped(DropReason.QUEUE_FULL, dropped)

    def datagrams_dropped(self, reason: str, count: int = 1) -> None:
        self._dropped.labels(self._kind, self._label, reason).inc(count)

    # -- HTTP requests (-H) -----------------------------------------------------------------

    def http_request(
        self, status: int | None, seconds: float | None, outcome: str = Outcome.ACCEPTED
    ) -> None:
        """A relayed HTTP request given to the upstream: answered with ``status`` (None: cut
        after its head), ``seconds`` to its response's head (None: no head was sent), and
        the ``outcome`` it counts under (``accepted``: the upstream answered)."""
        self._outcome(outcome).inc()
        status_class = "cut" if status is None else f"{status // 100}xx"
        series = self._http_classes.get(status_class)
        if series is None:
            series = self._http_classes[status_class] = self._http.labels(self._label, status_class)
        series.inc()
        if seconds is not None:
            self._latency.observe(seconds)


class ListenerMetrics:
    """The control channel of one ``-R`` or ``-H`` listener: the SDK listener's status
    callback (``on_status``) feeds it, and it knows whether the listener is online now."""

    def __init__(self, metrics: BridgeMetrics, kind: ForwardKind, entity: str) -> None:
        label = metrics.entity_label(entity)
        self.online = False
        self._gauge = metrics.listeners_online.labels(kind.value, label)
        self._connects = metrics.control_channel_connects.labels(kind.value, label)
        self._losses = metrics.control_channel_losses.labels(kind.value, label)

    def status(self, status: str, error: BaseException | None = None) -> None:
        """``HybridConnectionListener.on_status``'s callback: ``"connecting"``, ``"online"``
        or ``"offline"`` (``error`` None: closed on purpose, which is not a loss)."""
        online = status == "online"
        if online and not self.online:
            self._gauge.inc()
            self._connects.inc()
        elif self.online and not online:
            self._gauge.dec()
            if error is not None:
                self._losses.inc()
        self.online = online


class BridgeMetrics:
    """Every metric of a bridge, in a registry of its own.

    Args:
        max_entities: hybrid connections with a label value of their own.
        process: add the process and platform collectors (CPU, memory, open files, Python).
    """

    def __init__(self, *, max_entities: int = 1000, process: bool = True) -> None:
        registry, self.entity_label = new_registry(max_entities, process)
        self.registry = registry
        make = MetricMaker(registry, ("kind", "entity"))
        self.listeners_online = make.gauge(
            "hybridrelay_bridge_listeners_online",
            "Listeners (-R, -H) whose control channel is connected now.",
        )
        self.control_channel_connects = make.counter(
            "hybridrelay_bridge_control_channel_connects",
            "Times a listener's control channel came online (first connect and reconnects).",
        )
        self.control_channel_losses = make.counter(
            "hybridrelay_bridge_control_channel_losses",
            "Times a listener's control channel was lost (not closed by the bridge).",
        )
        self.connections = make.counter(
            "hybridrelay_bridge_connections",
            "Connections, UDP flows and HTTP requests the forwards were given, by outcome.",
            ("kind", "entity", "outcome"),
        )
        self.connections_active = make.gauge(
            "hybridrelay_bridge_connections_active", "TCP and Unix connections being forwarded now."
        )
        self.bytes = make.counter(
            "hybridrelay_bridge_bytes",
            "Payload bytes forwarded, counted when a connection or UDP flow ends.",
            ("kind", "entity", "direction"),
        )
        self.udp_flows_active = make.gauge(
            "hybridrelay_bridge_udp_flows_active", "UDP flows being forwarded now."
        )
        self.udp_datagrams_dropped = make.counter(
            "hybridrelay_bridge_udp_datagrams_dropped",
            "UDP datagrams not forwarded, by why.",
            ("kind", "entity", "reason"),
        )
        self.http_requests = make.counter(
            "hybridrelay_bridge_http_requests",
            "HTTP requests forwarded (-H), by status class of the answer ('cut': cut after "
            "its head).",
            ("entity", "status_class"),
        )
        self.http_request_latency = make.histogram(
            "hybridrelay_bridge_http_request_latency_seconds",
            "From a relayed HTTP request's arrival at the bridge to its response's head.",
            ("entity",),
        )

    def forward(self, kind: ForwardKind, entity: str) -> ForwardMetrics:
        """The series of one forward (looked up once; keep it)."""
        return ForwardMetrics(self, kind, entity)

    def listener(self, kind: ForwardKind, entity: str) -> ListenerMetrics:
        """The control-channel series of one ``-R`` or ``-H`` listener."""
        return ListenerMetrics(self, kind, entity)
