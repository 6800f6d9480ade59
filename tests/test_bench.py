"""scripts/bench.py end to end on a synthetic model: two configurations side by side, one table."""
from __future__ import annotations

import json

from scripts import bench


def test_side_by_side_on_a_synthetic_model(tmp_path, capsys):
    out = tmp_path / "runs.json"
    small = ["scheduler.max_batch_tokens=64", "scheduler.max_running=4", "model.max_model_len=128", "cache.num_pages=64"]
    rc = bench.main(["--workload", "random", "--synthetic-model", "32,1,4,2,8", "--num-requests", "6", "--system-len", "20",
                     "--question-len", "4", "--output-len", "5", "--max-concurrency", "3", "--repeats", "2",
                     "--set", *small, "--set-a", "scheduler.overlap=false", "--set-b", "scheduler.overlap=true",
                     "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "request_throughput" in table and "B/A" in table
    runs = json.loads(out.read_text())["runs"]
    for name in ("A", "B"):
        assert len(runs[name]) == 2
        assert all(r["requests"] == 6 and r["errors"] == 0 for r in runs[name])
