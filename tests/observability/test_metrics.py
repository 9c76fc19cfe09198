"""The relay's metrics (observability/metrics.py): values after known events, label cap."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

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
