"""The bench runs end to end on its tiny plan (no number here is a benchmark: bench/ measures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_plan_runs_every_scenario_and_writes_its_record(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "bench", "--plan", "tiny", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "latest-tiny.json").read_text())
    assert record["commit"] and record["machine"]["cores"] and record["command"]
    results = record["results"]
    assert set(results) == {
        "capacity", "fanout", "transports", "idle", "publish", "cluster", "slow", "topics",
        "latency"}
    for kind in ("topics", "patterns"):
        first = results["topics"][kind]["steps"][0]
        assert first["lost"] == 0 and first["received"] == first["published"], first
    assert results["capacity"]["sse_msgs_per_second"] > 0
    # every server and transport delivered everything of its first step (whether a step met
    # the latency budget is a measurement, not something a test may assert)
    firsts = [by_n["10"]["steps"][0] for transports in results["fanout"].values()
              for by_n in transports.values()]
    assert len(firsts) == 4 + 1 + 1  # broker sse/ndjson/ws/grpc, starlette, nats-server
    for first in firsts:
        assert first["lost"] == 0 and first["received"] == first["published"] * 10, first
        assert first["latency"]["count"] > 0
    # the transports at equal load: one round each at a rate SSE held in the ramp (a ramp
    # whose every rate failed, even halved three times, would leave nothing to compare)
    equal = results["transports"]["10"]
    assert set(equal["transports"]) == {"sse", "ndjson", "ws", "grpc"}
    for transport, r in equal["transports"].items():
        assert r["lost"] == 0 and len(r["us_per_delivery_each"]) == 1, (transport, r)
        assert r["us_per_delivery"] > 0 and r["relative_capacity"] > 0, (transport, r)
    assert equal["transports"]["sse"]["relative_capacity"] == 1.0
    assert {"sse", "ws"} == set(results["idle"])
    assert all(r["rate"] > 0 for r in results["publish"].values())
    assert results["publish"]["nats"]["stored_rate"] > 0
    assert all(r["steps"][0]["lost"] == 0 for r in results["cluster"].values())
    slow = results["slow"]
    assert slow["all_received"] and slow["others_lost"] == 0 and slow["paused"] == 2, slow
    assert slow["alone_all_received"] and slow["alone_paused"] == 1, slow
    for path, subscribers in (("embedded http-batch", 100), ("embedded http", 100), ("nats", 100),
                              ("embedded http-batch x1", 1), ("embedded http-batch x10", 10)):
        r = results["latency"][path]
        assert r["lost"] == 0 and r["received"] == r["published"] * subscribers > 0, (path, r)
    summary = (tmp_path / "latest-tiny.md").read_text()
    assert "## Latency at a light load" in summary
    assert "## The broker's transports at equal load" in summary
    assert "| broker | sse | 10 |" in summary and "| broker | grpc | 10 |" in summary
    for plot in ("fanout", "latency", "idle"):
        assert (tmp_path / f"latest-tiny-{plot}.png").stat().st_size > 5000
    assert "== fanout" in done.stderr  # progress is shown while it runs
