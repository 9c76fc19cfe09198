"""bench's web-app scenario (``python -m bench.webapp``) at its smallest: it starts the three
ways of serving the app, measures each and prints ratios against direct."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_webapp_scenario_runs(tmp_path: Path) -> None:
    out = tmp_path / "webapp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.webapp", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads(out.read_text())["records"]
    assert [r["path"] for r in records] == ["direct", "serve-app", "bridge -H"]
    for record in records:
        assert record["rps"] > 0 and record["p99_ms"] >= record["p50_ms"] > 0
        assert record["sse_p50_ms"] > 0
    assert "| serve-app |" in proc.stdout and "x |" in proc.stdout
