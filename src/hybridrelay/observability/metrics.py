"""The relay's and the bridge's Prometheus metrics, made with ``prometheus_client``.

Each process owns one :class:`~prometheus_client.CollectorRegistry` (not the library's global
one), so two relays in one test process, or a relay and a bridge, never share a counter.

Label cardinality: metrics are labelled by hybrid connection, and a namespace may hold
thousands. :class:`EntityLabels` gives the first ``max_entities`` names their own label value
(lower-cased, as entity paths compare) and every later one the value ``_other``, so the number
of series is bounded whatever clients do; ``hybridrelay_metric_entities_overflowed_total``
counts the names folded into ``_other``. docs/METRICS.md lists every metric.

The HTTP request metrics are written once per relayed request: their labelled series are kept
at hand per hybrid connection name (:class:`_HttpSeries`, a bounded table) rather than looked
up through ``labels()`` each time (docs/DECISIONS.md D24).
"""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER",
    "EntityLabels",
    "MetricMaker",
    "RelayMetrics",
    "SenderOutcome",
    "new_registry",
]

#: The label value of every hybrid connection past the cap.
OTHER = "_other"

#: Latency buckets in seconds: sub-millisecond loopback to a slow edge across the world (the
#: bridge's too: loopback upstream to a slow one).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: Hybrid connection names whose HTTP series are kept at hand; past it the oldest is dropped
#: (its series stay in the metrics: only the shortcut to them goes).
HTTP_SERIES_NAMES = 1024
#: Statuses kept at hand per name (a listener answers with a handful); the rest are looked up.
HTTP_SERIES_STATUSES = 16


class SenderOutcome:
    """The values of the ``outcome`` label of ``hybridrelay_sender_connections_total``."""

    ACCEPTED = "accepted"
    REJECTED = "rejected_by_listener"
    UNAUTHORIZED = "401"
    FORBIDDEN = "403"
    NOT_FOUND = "404"
    NO_LISTENER = "no_listener"
    OVERLOADED = "503"
    TIMED_OUT = "504"
    FAILED = "failed"


class EntityLabels:
    """Bounded label values for hybrid connection names."""

    def __init__(self, max_entities: int, overflowed: Counter) -> None:
        self._max = max_entities
        self._known: set[str] = set()
        self._overflowed: set[str] = set()
        self._overflow_counter = overflowed
        #: Bound on the names remembered as overflowed (so the counter counts each once).
        self._max_overflow_memory = 100_000

    def __call__(self, entity: str) -> str:
        name = entity.strip("/").lower() or "/"
        if name in self._known:
            return name
        if len(self._known) < self._max:
            self._known.add(name)
            return name
        if name not in self._overflowed and len(self._overflowed) < self._max_overflow_memory:
            self._overflowed.add(name)
            self._overflow_counter.inc()
        return OTHER


def new_registry(max_entities: int, process: bool) -> tuple[CollectorRegistry, EntityLabels]:
    """A registry of the process' own (never the library's global one), with the process and
    platform collectors when ``process``, and the capped entity labels of its metrics."""
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    overflowed = Counter(
        "hybridrelay_metric_entities_overflowed",
        "Hybrid connection names past the label cap, counted under entity='_other'.",
        registry=registry,
    )
    return registry, EntityLabels(max_entities, overflowed)


class MetricMaker:
    """Makes the metrics of one registry, labelled by ``labels`` unless told otherwise;
    histograms have :data:`LATENCY_BUCKETS`."""

    def __init__(self, registry: CollectorRegistry, labels: tuple[str, ...]) -> None:
        self._registry = registry
        self._labels = labels

    def counter(self, name: str, doc: str, labels: tuple[str, ...] | None = None) -> Counter:
        return Counter(
            name, doc, self._labels if labels is None else labels, registry=self._registry
        )

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] | None = None) -> Gauge:
        return Gauge(name, doc, self._labels if labels is None else labels, registry=self._registry)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] | None = None) -> Histogram:
        return Histogram(
            name,
            doc,
            self._labels if labels is None else labels,
            buckets=LATENCY_BUCKETS,
            registry=self._registry,
        )


class _HttpSeries:
    """One hybrid connection name's HTTP series: its latency histogram and, per status seen,
    its status class's counter (``prometheus_client``'s ``labels()`` takes a lock and builds
    a tuple of the label values on each call; this is two dict lookups)."""

    __slots__ = ("by_status", "label", "latency")

    def __init__(self, label: str, latency: Histogram) -> None:
        self.label = label
        self.latency = latency
        self.by_status: dict[int, Counter] = {}


def _running_tasks() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped from outside the loop's thread
        return float("nan")


class RelayMetrics:
    """Every metric of the relay, in a registry of its own.

    The methods are what the relay's code calls at each event; they do the label lookup once
    and keep the data path free of anything but a counter increment.
    """

    def __init__(self, *, max_entities: int = 1000, process: bool = True) -> None:
        registry, self.entity_label = new_registry(max_entities, process)
        self.registry = registry
        make = MetricMaker(registry, ("entity",))
        self.listeners_online = make.gauge(
            "hybridrelay_listeners_online", "Listener control channels connected now."
        )
        self.control_channels_opened = make.counter(
            "hybridrelay_control_channels_opened", "Listener control channels accepted."
        )
        self.control_channels_lost = make.counter(
            "hybridrelay_control_channels_lost",
            "Listener control channels that ended, by why.",
            ("entity", "reason"),
        )
        self.sender_connections = make.counter(
            "hybridrelay_sender_connections",
            "Senders (WebSocket connects and relay-ingress connections) by outcome.",
            ("entity", "outcome"),
        )
        self.relayed_connections_active = make.gauge(
            "hybridrelay_relayed_connections_active",
            "Relayed connections (sender spliced to a listener's rendezvous) open now.",
        )
        self.relayed_bytes = make.counter(
            "hybridrelay_relayed_bytes",
            "Bytes relayed as forwarded (WebSocket frames with their headers; raw bytes on an "
            "ingress leg), counted when a relayed connection ends.",
            ("entity", "direction"),
        )
        self.accept_latency = make.histogram(
            "hybridrelay_accept_latency_seconds",
            "From a sender's arrival to the listener's rendezvous (or refusal).",
        )
        self.http_requests = make.counter(
            "hybridrelay_http_requests",
            "HTTP requests relayed, by status class of the answer.",
            ("entity", "status_class"),
        )
        self.http_request_latency = make.histogram(
            "hybridrelay_http_request_latency_seconds",
            "From an HTTP request's arrival to its response's head.",
        )
        self.rendezvous_pending = make.gauge(
            "hybridrelay_rendezvous_pending",
            "Rendezvous offered to a listener and not yet answered.",
            (),
        )
        self.rendezvous_expired = make.counter(
            "hybridrelay_rendezvous_expired", "Rendezvous the listener did not answer in time.", ()
        )
        self._http_series: dict[str, _HttpSeries] = {}
        if process:
            # With the process' open fds and RSS, what a leak check reads (docs/RELIABILITY.md):
            # a task left without an owner shows here long before it shows in memory.
            Gauge(
                "hybridrelay_asyncio_tasks",
                "asyncio tasks alive in the relay's event loop.",
                registry=registry,
            ).set_function(_running_tasks)

    # -- events -------------------------------------------------------------------------------

    def listener_connected(self, entity: str) -> None:
        label = self.entity_label(entity)
        self.listeners_online.labels(label).inc()
        self.control_channels_opened.labels(label).inc()

    def listener_disconnected(self, entity: str, reason: str) -> None:
        label = self.entity_label(entity)
        self.listeners_online.labels(label).dec()
        self.control_channels_lost.labels(label, reason).inc()

    def sender(self, entity: str, outcome: str, accept_seconds: float | None = None) -> None:
        label = self.entity_label(entity)
        self.sender_connections.labels(label, outcome).inc()
        if accept_seconds is not None:
            self.accept_latency.labels(label).observe(accept_seconds)

    def connection_opened(self, entity: str) -> None:
        self.relayed_connections_active.labels(self.entity_label(entity)).inc()

    def connection_closed(self, entity: str, *, to_listener: int, to_sender: int) -> None:
        label = self.entity_label(entity)
        self.relayed_connections_active.labels(label).dec()
        self.relayed_bytes.labels(label, "to_listener").inc(to_listener)
        self.relayed_bytes.labels(label, "to_sender").inc(to_sender)

    def http_request(self, entity: str, status: int, seconds: float) -> None:
        series = self._http_series.get(entity)
        if series is None:
            series = self._new_http_series(entity)
        counter = series.by_status.get(status)
        if counter is None:
            counter = self.http_requests.labels(series.label, f"{status // 100}xx")
            if len(series.by_status) < HTTP_SERIES_STATUSES:
                series.by_status[status] = counter
        counter.inc()
        series.latency.observe(seconds)

    def _new_http_series(self, entity: str) -> _HttpSeries:
        """``entity``'s entry in the table of HTTP series, made now (the oldest entry dropped
        when the table is full). The series themselves live in the metrics, which never drop
        one (not even a deleted hybrid connection's), so an entry made again finds the same
        series and its values go on from where they were."""
        table = self._http_series
        if len(table) >= HTTP_SERIES_NAMES:
            del table[next(iter(table))]
        label = self.entity_label(entity)
        series = table[entity] = _HttpSeries(label, self.http_request_latency.labels(label))
        return series

    def exposition(self) -> bytes:
        """The text format of every metric, for ``GET /metrics``."""
        return generate_latest(self.registry)
