"""Smoke test of the benchmark harness (bench/): the smallest scenario, a few seconds.

It proves the harness still starts the real relay and bridge processes, measures through them
and writes its table; the numbers themselves are not checked (see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_bench(
    tmp_path: Path,
    scenario: str,
    topologies: tuple[str, ...] = ("direct", "hybridrelay"),
    *extra: str,
    timeout: float = 50,
) -> list[dict[str, Any]]:
    """The smallest run of one scenario on ``topologies``; its records."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            scenario,
            *(arg for name in topologies for arg in ("--topology", name)),
            "--no-plot",
            "--out",
            str(tmp_path),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records: list[dict[str, Any]] = json.loads((tmp_path / "results.json").read_text())["records"]
    return records


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("hybridrelay") is None, reason="hybridrelay is not installed")
def test_bench_latency_scenario_runs(tmp_path: Path) -> None:
    paths = ("direct", "hybridrelay", "hybridrelay-ingress")
    records = run_bench(tmp_path, "latency", paths)
    by_topology = {r["topology"]: r for r in records if r.get("mode") == "lat"}
    assert set(by_topology) == set(paths)
    for record in by_topology.values():
        assert "error" not in record
        assert record["n"] > 0
        assert record["p50_ms"] > 0
    assert "connect-to-first-byte p50" in (tmp_path / "table.md").read_text()


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("hybridrelay") is None, reason="hybridrelay is not installed")
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_bench_http_scenario_runs(tmp_path: Path) -> None:
    """Scenario (6): wrk against the upstream directly and through relay + bridge -H."""
    records = run_bench(tmp_path, "http")
    by_topology = {r["topology"]: r for r in records if r.get("mode") == "http"}
    assert set(by_topology) == {"direct", "hybridrelay"}
    for record in by_topology.values():
        assert "error" not in record, record
        assert record["req_per_s"] > 0
        assert record["non_2xx"] == 0
    assert "HTTP GET p50" in (tmp_path / "table.md").read_text()


@pytest.mark.timeout(150)
@pytest.mark.skipif(shutil.which("hybridrelay") is None, reason="hybridrelay is not installed")
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_bench_cluster_scenario_runs(tmp_path: Path) -> None:
    """Scenario (8) at its smallest (``--cluster-profile smoke``): every part measures."""
    records = run_bench(tmp_path, "cluster", ("direct",), "--cluster-profile", "smoke", timeout=140)
    workers = {r["variant"]: r for r in records if r.get("part") == "workers"}
    assert set(workers) == {"1", "2"}  # and "2 local-first" outside the smoke profile
    for record in workers.values():
        assert record["tunnels_per_s"] > 0 and record["http_req_per_s"] > 0, record
        assert record["tunnel_errors"] == 0 and record["http_errors"] == 0, record
    latency = {r["where"]: r for r in records if r.get("part") == "latency"}
    assert set(latency) == {"same", "cross"}
    assert all(r["n"] > 0 and r["errors"] == 0 for r in latency.values()), latency
    # A cross-node tunnel is an offer and its answer through Redis; a same-node one is none.
    assert latency["cross"]["redis_ops"] - latency["same"]["redis_ops"] > 1.0, latency
    assert latency["cross"]["redis_out_bytes"] > 100, latency
    (idle,) = (r for r in records if r.get("part") == "idle")
    assert idle["ops_without"] > 0, idle  # the nodes' lease renewals were counted
    table = (tmp_path / "table.md").read_text()
    assert "### Cluster" in table and "cross-node adds" in table
