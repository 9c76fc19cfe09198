"""The relay's metrics (observability/metrics.py): values after known events, label cap, the
bounded table of HTTP series."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hybridrelay.observability import metrics as metrics_module
from hybridrelay.observability.metrics import OTHER, RelayMetrics, SenderOutcome


def samples(metrics: RelayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_values_follow_the_events() -> None:
    metrics = RelayMetrics(process=False)
    for _ in range(3):
        metrics.listener_connected("Plant/Line-1")
    metrics.listener_disconnected("plant/line-1", "closed")
    for _ in range(5):
        metrics.sender("plant/line-1", SenderOutcome.ACCEPTED, accept_seconds=0.002)
    metrics.sender("plant/line-1", SenderOutcome.FORBIDDEN)
    metrics.connection_opened("plant/line-1")
    metrics.connection_opened("plant/line-1")
    metrics.connection_closed("plant/line-1", to_listener=100, to_sender=7)
    metrics.http_request("plant/line-1", 204, 0.01)
    metrics.http_request("plant/line-1", 502, 0.2)
    metrics.rendezvous_pending.inc()
    metrics.rendezvous_expired.inc()
    got = samples(metrics)
    entity = (("entity", "plant/line-1"),)
    assert got[("hybridrelay_listeners_online", entity)] == 2
    assert got[("hybridrelay_control_channels_opened_total", entity)] == 3
    lost = (("entity", "plant/line-1"), ("reason", "closed"))
    assert got[("hybridrelay_control_channels_lost_total", lost)] == 1
    accepted = (("entity", "plant/line-1"), ("outcome", "accepted"))
    assert got[("hybridrelay_sender_connections_total", accepted)] == 5
    forbidden = (("entity", "plant/line-1"), ("outcome", "403"))
    assert got[("hybridrelay_sender_connections_total", forbidden)] == 1
    assert got[("hybridrelay_accept_latency_seconds_count", entity)] == 5
    assert got[("hybridrelay_relayed_connections_active", entity)] == 1
    to_listener = (("direction", "to_listener"), ("entity", "plant/line-1"))
    assert got[("hybridrelay_relayed_bytes_total", to_listener)] == 100
    two = (("entity", "plant/line-1"), ("status_class", "2xx"))
    assert got[("hybridrelay_http_requests_total", two)] == 1
    assert got[("hybridrelay_http_request_latency_seconds_count", entity)] == 2
    assert got[("hybridrelay_rendezvous_pending", ())] == 1
    assert got[("hybridrelay_rendezvous_expired_total", ())] == 1


def test_entity_labels_are_capped() -> None:
    metrics = RelayMetrics(max_entities=2, process=False)
    for name in ("a", "b", "c", "d", "c", "A"):
        metrics.sender(name, SenderOutcome.NO_LISTENER)
    got = samples(metrics)

    def count(entity: str) -> float:
        labels = (("entity", entity), ("outcome", "no_listener"))
        return got.get(("hybridrelay_sender_connections_total", labels), 0)

    assert count("a") == 2 and count("b") == 1
    assert count(OTHER) == 3  # c, d, c
    assert count("c") == 0
    assert got[("hybridrelay_metric_entities_overflowed_total", ())] == 2  # c and d, once each


def test_two_relays_do_not_share_counters() -> None:
    first, second = RelayMetrics(), RelayMetrics()
    first.sender("x", SenderOutcome.ACCEPTED)
    labels = (("entity", "x"), ("outcome", "accepted"))
    assert samples(first)[("hybridrelay_sender_connections_total", labels)] == 1
    assert ("hybridrelay_sender_connections_total", labels) not in samples(second)
    assert any(name.startswith("process_") for name, _ in samples(first))


# -- the table of HTTP series (metrics.py _HttpSeries) -----------------------------------------


def http_counts(metrics: RelayMetrics, entity: str) -> tuple[dict[str, float], float]:
    """``entity``'s HTTP request counts by status class and its latency histogram's count."""
    got = samples(metrics)
    by_class = {
        dict(labels)["status_class"]: value
        for (name, labels), value in got.items()
        if name == "hybridrelay_http_requests_total" and ("entity", entity) in labels
    }
    latency = got.get(("hybridrelay_http_request_latency_seconds_count", (("entity", entity),)))
    return by_class, latency or 0.0


def test_http_series_table_is_bounded_and_values_survive_eviction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "HTTP_SERIES_NAMES", 3)
    metrics = RelayMetrics(process=False)
    for name in ("a", "b", "c", "d", "e"):
        metrics.http_request(name, 200, 0.001)
    table = metrics._http_series
    assert list(table) == ["c", "d", "e"]  # the oldest went first
    # "a" comes back (made again): its series are the ones it had, and count on.
    metrics.http_request("a", 200, 0.003)
    metrics.http_request("a", 503, 2.0)
    assert len(table) == 3 and "a" in table and "c" not in table
    assert http_counts(metrics, "a") == ({"2xx": 2, "5xx": 1}, 3)
    assert http_counts(metrics, "c") == ({"2xx": 1}, 1)
    got = samples(metrics)
    slow = (("entity", "a"), ("le", "2.5"))
    assert got[("hybridrelay_http_request_latency_seconds_bucket", slow)] == 3
    fast = (("entity", "a"), ("le", "0.001"))
    assert got[("hybridrelay_http_request_latency_seconds_bucket", fast)] == 1


def test_http_statuses_kept_per_name_are_bounded_and_all_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "HTTP_SERIES_STATUSES", 4)
    metrics = RelayMetrics(process=False)
    # A listener that answers with every status there is: the table keeps 4 of them, the
    # rest are looked up each time, and every request is counted under its class.
    statuses = list(range(100, 1000))
    for status in statuses + statuses:
        metrics.http_request("Tenant/API", status, 0.01)
    assert len(metrics._http_series) == 1
    assert len(metrics._http_series["Tenant/API"].by_status) == 4
    by_class, latency = http_counts(metrics, "tenant/api")
    assert by_class == {f"{n}xx": 200 for n in range(1, 10)}
    assert latency == 2 * len(statuses)


def test_http_series_keep_the_label_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "HTTP_SERIES_NAMES", 2)
    metrics = RelayMetrics(max_entities=1, process=False)
    # Names differing only in case share one label; past the cap, names count as _other,
    # each counted as overflowed once however often it leaves the table and comes back.
    for name in ("one", "ONE", "two", "three", "two", "three", "one", "two"):
        metrics.http_request(name, 204, 0.001)
    assert http_counts(metrics, "one") == ({"2xx": 3}, 3)
    assert http_counts(metrics, OTHER) == ({"2xx": 5}, 5)
    got = samples(metrics)
    assert got[("hybridrelay_metric_entities_overflowed_total", ())] == 2  # two and three
