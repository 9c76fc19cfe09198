"""Medians over runs, the markdown table, the target check and the optional PNG plot."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.topologies import ALL_TOPOLOGIES

__all__ = ["medians", "render_plot", "render_table"]

#: Paths in the order of the table's columns.
ORDER = ALL_TOPOLOGIES
OURS = "hybridrelay"
#: The same relay and agent with the relay's own ingress port: 2 processes, like wstunnel.
OURS_INGRESS = "hybridrelay-ingress"
PEERS = ("socat", "socat-chain", "socat-chain-tls", "socat-chain2", "websockify", "wstunnel")
#: The path a peer's "× ours" is against (default :data:`OURS`): the TLS ceiling vs our TLS path.
OURS_FOR = {"socat-chain-tls": "hybridrelay-tls", "socat-chain2": "hybridrelay-ingress"}
#: The same chains as ours in C: the best any relay chain of as many processes could do here.
CEILINGS = ("socat-chain", "socat-chain-tls", "socat-chain2")
CEILING_MARK = "(ceiling)"
#: Roles that make up a path (CPU and memory of "the path" = their sum).
PATH_ROLES = (
    "relay",
    "ingress",
    "agent",
    "socat",
    "chain-ingress",
    "chain-relay",
    "chain-agent",
    "websockify",
    "wst-client",
    "wst-server",
)
#: The middle process of a 3-process chain ("(7) relay CPU-s per GB").
RELAY_ROLES = ("relay", "chain-relay")

Medians = dict[tuple[str, str], dict[str, float]]


def medians(records: Iterable[dict[str, Any]]) -> Medians:
    """(topology, mode) -> metric -> median over runs (numeric metrics only)."""
    values: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if "error" in r:
            continue
        key = (str(r["topology"]), str(r["mode"]))
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "run":
                if not math.isnan(v):
                    values[key][k].append(float(v))
    return {key: {k: statistics.median(v) for k, v in m.items()} for key, m in values.items()}


def _path_cpu(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("cpu_") and k[4:] in PATH_ROLES)


def _path_mem(m: dict[str, float], kind: str = "rss") -> float:
    prefix = f"{kind}_kib_per_conn_"
    return sum(v for k, v in m.items() if k.startswith(prefix) and k[len(prefix) :] in PATH_ROLES)


class Row:
    def __init__(
        self,
        label: str,
        mode: str,
        get: Callable[[dict[str, float]], float | None],
        fmt: str = "{:,.0f}",
        higher_better: bool = True,
    ) -> None:
        self.label, self.mode, self.get, self.fmt, self.higher_better = (
            label,
            mode,
            get,
            fmt,
            higher_better,
        )

    def value(self, med: Medians, topo: str) -> float | None:
        m = med.get((topo, self.mode))
        if m is None:
            return None
        v = self.get(m)
        return None if v is None or math.isnan(v) else v


def _key(name: str) -> Callable[[dict[str, float]], float | None]:
    return lambda m: m.get(name)


def _cpu_per_gb(m: dict[str, float], role: str | None) -> float | None:
    mbps = m.get("MBps")
    if not mbps:
        return None
    if role is None:
        cpu: float | None = _path_cpu(m)
    elif role == "relay":
        cpu = next((m[f"cpu_{r}"] for r in RELAY_ROLES if f"cpu_{r}" in m), None)
    else:
        cpu = m.get(f"cpu_{role}")
    if not cpu:
        return None
    return cpu / 100.0 / (mbps / 1000.0)  # CPU-seconds per GB


def _cpu_per_krequests(m: dict[str, float], role: str | None) -> float | None:
    rate = m.get("req_per_s")
    cpu = _path_cpu(m) if role is None else m.get(f"cpu_{role}")
    if not rate or not cpu:
        return None
    return cpu / 100.0 / rate * 1e6  # CPU-milliseconds per 1,000 requests


ROWS = [
    Row("(1) throughput dest→client, MB/s", "down", _key("MBps")),
    Row("(1) throughput client→dest, MB/s", "up", _key("MBps")),
    Row("(2) connect-to-first-byte p50, ms", "lat", _key("p50_ms"), "{:.2f}", False),
    Row("(2) connect-to-first-byte p99, ms", "lat", _key("p99_ms"), "{:.2f}", False),
    Row("(3) 1 KiB req/resp, 100 conns, RT/s", "rr", _key("rt_per_s")),
    Row("(3) 1 KiB req/resp p50, ms", "rr", _key("p50_ms"), "{:.2f}", False),
    Row("(3) 1 KiB req/resp p99, ms", "rr", _key("p99_ms"), "{:.2f}", False),
    Row("(4) idle tunnels held open", "idle", _key("open")),
    Row("(4) idle RSS KiB/conn, relay", "idle", _key("rss_kib_per_conn_relay"), "{:.1f}", False),
    Row(
        "(4) idle RSS KiB/conn, edge agent", "idle", _key("rss_kib_per_conn_agent"), "{:.1f}", False
    ),
    Row(
        "(4) idle RSS KiB/conn, ingress", "idle", _key("rss_kib_per_conn_ingress"), "{:.1f}", False
    ),
    Row(
        "(4) idle Pss KiB/conn, whole path",
        "idle",
        lambda m: _path_mem(m, "pss") or None,
        "{:.1f}",
        False,
    ),
    Row("(5) new tunneled conns/s (50 openers)", "connrate", _key("conns_per_s")),
    Row("(5) open+echo+close p50 under load, ms", "connrate", _key("p50_ms"), "{:.1f}", False),
    Row(
        "(7) relay CPU-s per GB (dest→client)",
        "down",
        lambda m: _cpu_per_gb(m, "relay"),
        "{:.2f}",
        False,
    ),
    Row(
        "(7) whole-path CPU-s per GB (dest→client)",
        "down",
        lambda m: _cpu_per_gb(m, None),
        "{:.2f}",
        False,
    ),
    Row("(6) HTTP GET, 50 keep-alive conns (wrk), req/s", "http", _key("req_per_s")),
    Row("(6) HTTP GET p50, ms", "http", _key("p50_ms"), "{:.2f}", False),
    Row("(6) HTTP GET p99, ms", "http", _key("p99_ms"), "{:.2f}", False),
    Row(
        "(6) relay CPU-ms per 1,000 HTTP requests",
        "http",
        lambda m: _cpu_per_krequests(m, "relay"),
        "{:.0f}",
        False,
    ),
    Row(
        "(6) path CPU-ms per 1,000 HTTP requests",
        "http",
        lambda m: _cpu_per_krequests(m, None),
        "{:.0f}",
        False,
    ),
]

ROWS.sort(key=lambda row: row.label[:3])  # by scenario number, (6) before (7)


def _cell(row: Row, med: Medians, topo: str) -> str:
    v = row.value(med, topo)
    if v is None:
        return "–"
    text = row.fmt.format(v)
    refs = []
    d = row.value(med, "direct")
    if topo != "direct" and d:
        refs.append(f"{v / d:.2f}× direct")
    ours = OURS_FOR.get(topo, OURS)
    o = row.value(med, ours)
    if topo in PEERS and o:
        refs.append(f"{v / o:.2f}× ours" + (" TLS" if ours.endswith("-tls") else ""))
    return text + (f" ({', '.join(refs)})" if refs else "")


def render_table(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    med = medians(records)
    topos = [t for t in ORDER if any(k[0] == t for k in med)]
    lines = [
        f"Command: `{meta.get('command', '')}`  ",
        f"Machine: {meta.get('machine', {})}  ",
        f"Profile: {meta.get('profile', {})}; medians of {meta.get('profile', {}).get('runs')} "
        f"run(s); elapsed {meta.get('elapsed_s', 0):.0f} s; CPU layout {meta.get('cpu_layout')}",
        "",
        "| scenario | "
        + " | ".join(f"{t} {CEILING_MARK}" if t in CEILINGS else t for t in topos)
        + " |",
        "|---|" + "---|" * len(topos),
    ]
    for row in ROWS:
        cells = [_cell(row, med, t) for t in topos]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    if any(k[1] == "http" for k in med):
        lines += [
            "",
            "(6): `direct` = wrk → bench.httpdest; ours = wrk → relay (HTTP relaying, SAS token "
            "checked per request) → control channel → bridge `-H` → bench.httpdest.",
        ]
    if any(t in CEILINGS for t in topos):
        lines += [
            "",
            f"{CEILING_MARK}: the same chain as ours in C, no WebSocket framing, no auth: "
            "client → socat A → socat B → socat C → destination (3 processes, 4 TCP hops; "
            '`socat-chain-tls`: A → B and B → C TLS). `socat-chain-tls` "× ours TLS" is '
            "against `hybridrelay-tls`; `socat-chain2` (client → B → C → destination, 2 "
            'processes) against `hybridrelay-ingress`; "(7) relay" of a chain is socat B.',
        ]
    skipped = meta.get("skipped") or {}
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    lines += [
        "",
        "Who was the limit (CPU % of each process during the window, 100 = one core):",
        "",
    ]
    lines += ["| path | mode | " + "loadgen | dest | path processes |", "|---|---|---|---|---|"]
    for topo in topos:
        for mode in ("down", "up", "rr", "connrate", "http"):
            m = med.get((topo, mode))
            if not m:
                continue
            roles = ", ".join(
                f"{k[4:]} {v:.0f}"
                for k, v in sorted(m.items())
                if k[4:] in PATH_ROLES and k.startswith("cpu_")
            )
            # (6): the load generator is wrk (not sampled), the destination bench.httpdest.
            dest = m.get("cpu_httpdest" if mode == "http" else "cpu_dest", math.nan)
            load = "wrk" if mode == "http" else f"{m.get('loadgen_cpu', math.nan):.0f}"
            lines.append(f"| {topo} | {mode} | {load} | {dest:.0f} | {roles or '–'} |")
    lines += ["", *render_targets(med)]
    return "\n".join(lines) + "\n"


def render_targets(med: Medians) -> list[str]:
    out = ["| target | measured | met? |", "|---|---|---|"]

    def get(topo: str, mode: str, key: str) -> float | None:
        return med.get((topo, mode), {}).get(key)

    def line(label: str, value: str, ok: bool | None) -> None:
        out.append(f"| {label} | {value} | {'n/a' if ok is None else 'yes' if ok else '**no**'} |")

    d, t = get("direct", "down", "MBps"), get("hybridrelay-tls", "down", "MBps")
    if d and t:
        line("TLS full pattern ≥ 0.5× direct (dest→client)", f"{t / d:.2f}×", t / d >= 0.5)
    d, t = get("direct", "up", "MBps"), get("hybridrelay-tls", "up", "MBps")
    if d and t:
        line("TLS full pattern ≥ 0.5× direct (client→dest)", f"{t / d:.2f}×", t / d >= 0.5)
    p = get("hybridrelay", "lat", "p50_ms")
    if p is not None:
        line("connect-to-first-byte p50 ≤ 3 ms (plaintext)", f"{p:.2f} ms", p <= 3.0)
    p = get("hybridrelay-tls", "lat", "p50_ms")
    if p is not None:
        line("connect-to-first-byte p50 ≤ 3 ms (TLS)", f"{p:.2f} ms", p <= 3.0)
    n = get("hybridrelay", "idle", "open")
    r = get("hybridrelay", "idle", "rss_kib_per_conn_relay")
    if n is not None and r is not None:
        line("≥ 10,000 tunnels on one relay", f"{n:,.0f} open", n >= 10000)
        line("≤ 30 KiB relay RSS per tunnel", f"{r:.1f} KiB", r <= 30.0)
    c = get("hybridrelay", "connrate", "conns_per_s")
    if c is not None:
        line("≥ 1,000 new tunneled conns/s", f"{c:,.0f}/s", c >= 1000)
    for ours, peer in [(o, p) for o in (OURS, OURS_INGRESS) for p in ("websockify", "wstunnel")]:
        behind = []
        compared = 0
        for row in ROWS:
            o, v = row.value(med, ours), row.value(med, peer)
            if o is None or v is None or row.mode in ("idle",):
                continue
            if row.label.startswith("(7)") or "held open" in row.label:
                continue
            compared += 1
            if (v > o) if row.higher_better else (v < o):
                behind.append(row.label)
        if compared:
            line(
                f"`{ours}` ahead of {peer} on every scenario it can run",
                f"behind on {len(behind)}/{compared}: " + "; ".join(behind)
                if behind
                else f"ahead on {compared}/{compared}",
                not behind,
            )
    return out if len(out) > 2 else []


def render_plot(records: list[dict[str, Any]], path: Path) -> str:
    """Write a bar chart per scenario; returns what happened (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    med = medians(records)
    rows = [
        r
        for r in ROWS
        if r.label.split(" ")[0] in {"(1)", "(2)", "(3)", "(4)", "(5)", "(6)", "(7)"}
        and "CPU-ms" not in r.label
    ]
    rows = [r for r in rows if any(r.value(med, t) is not None for t in ORDER)]
    rows = [r for r in rows if "p99" not in r.label and "held" not in r.label]
    if not rows:
        return "plot skipped: nothing to plot"
    cols = 3
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    colors = {
        "direct": "#999999",
        "hybridrelay": "#1f77b4",
        "hybridrelay-tls": "#0b3d6b",
        "hybridrelay-ingress": "#6baed6",
        "hybridrelay-ingress-tls": "#3182bd",
        "socat": "#2ca02c",
        "socat-chain": "#74c476",
        "socat-chain-tls": "#006d2c",
        "socat-chain2": "#a1d99b",
        "websockify": "#ff7f0e",
        "wstunnel": "#d62728",
    }
    for ax, row in zip(axes.flat, rows, strict=False):
        names = [t for t in ORDER if row.value(med, t) is not None]
        vals = [row.value(med, t) or 0.0 for t in names]
        ax.bar(range(len(names)), vals, color=[colors.get(n, "#555555") for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(row.label + ("" if row.higher_better else " (lower is better)"), fontsize=9)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot written to {path}"
