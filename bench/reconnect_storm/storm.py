"""What a reconnect storm is made of, and its summary: shared by the real run and the model.

An :class:`Attempt` is one reconnect attempt of one listener after the node it was on died:
when it started and ended (seconds after the node's death), the node it went to, and whether
it brought the listener back. :func:`summarize` turns the attempts into the figures
docs/SCALING.md quotes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BUCKET", "Attempt", "StormSummary", "format_summary", "summarize"]

#: The width of the rate buckets, seconds ("attempts per 100 ms per surviving node").
BUCKET = 0.1


@dataclass(frozen=True)
class Attempt:
    listener: int
    target: str
    start: float
    end: float
    ok: bool


@dataclass(frozen=True)
class StormSummary:
    moved: int  # listeners that had to reconnect
    recovered: int  # of them, back online
    attempts: int
    #: the time the last of them was back (seconds after the death), None if one never was
    full_recovery: float | None
    attempts_per_listener_max: int
    attempts_per_listener_mean: float
    #: the most attempts that reached one surviving node in one BUCKET
    peak_per_bucket: int
    #: the most attempts in progress at once on one surviving node
    max_in_flight: int
    #: listeners that came back on each node (node -> count)
    landed: dict[str, int]
    #: attempts per BUCKET on each node: node -> [count of bucket 0, 1, ...]
    timeline: dict[str, list[int]]


def _max_in_flight(attempts: Sequence[Attempt]) -> int:
    # Ends sort before starts at the same instant: an attempt that ends as another starts
    # does not overlap it.
    edges = sorted([(a.start, 1) for a in attempts] + [(a.end, -1) for a in attempts])
    best = current = 0
    for _, step in edges:
        current += step
        best = max(best, current)
    return best


def summarize(attempts: Sequence[Attempt], moved: int, survivors: Sequence[str]) -> StormSummary:
    """The storm on ``survivors`` (attempts at a dead node count per listener, not per node)."""
    per_listener = Counter(a.listener for a in attempts)
    back = {a.listener: a.end for a in attempts if a.ok}
    timeline: dict[str, list[int]] = {}
    in_flight = 0
    for node in survivors:
        mine = [a for a in attempts if a.target == node]
        buckets = Counter(int(max(a.start, 0.0) / BUCKET) for a in mine)
        timeline[node] = [buckets.get(i, 0) for i in range(max(buckets, default=-1) + 1)]
        in_flight = max(in_flight, _max_in_flight(mine))
    counts = list(per_listener.values()) or [0]
    return StormSummary(
        moved=moved,
        recovered=len(back),
        attempts=len(attempts),
        full_recovery=max(back.values()) if len(back) == moved and back else None,
        attempts_per_listener_max=max(counts),
        attempts_per_listener_mean=sum(counts) / max(moved, 1),
        peak_per_bucket=max((max(t, default=0) for t in timeline.values()), default=0),
        max_in_flight=in_flight,
        landed=dict(Counter(a.target for a in attempts if a.ok)),
        timeline=timeline,
    )


def format_summary(summary: StormSummary, *, timeline_buckets: int = 0) -> str:
    """A few lines; with ``timeline_buckets``, the first that many buckets of every node."""
    recovery = (
        f"{summary.full_recovery:.2f} s"
        if summary.full_recovery is not None
        else f"NOT ALL BACK ({summary.recovered}/{summary.moved})"
    )
    lines = [
        f"  listeners moved {summary.moved:,}, back {summary.recovered:,}; "
        f"all back after {recovery}",
        f"  attempts {summary.attempts:,}: per listener mean "
        f"{summary.attempts_per_listener_mean:.2f}, max {summary.attempts_per_listener_max}",
        f"  peak attempts on one surviving node: {summary.peak_per_bucket:,} per "
        f"{BUCKET * 1000:.0f} ms (= {summary.peak_per_bucket / BUCKET:,.0f}/s); "
        f"max in flight on one node {summary.max_in_flight:,}",
    ]
    if timeline_buckets:
        for node, counts in sorted(summary.timeline.items()):
            shown = " ".join(str(c) for c in counts[:timeline_buckets])
            more = " ..." if len(counts) > timeline_buckets else ""
            landed = summary.landed.get(node, 0)
            lines.append(f"    {node}: {landed} came back here; per 100 ms: {shown}{more}")
    return "\n".join(lines)
