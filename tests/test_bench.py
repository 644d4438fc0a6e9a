"""`make bench` runs end to end at toy shapes (its numbers are only meaningful at the real ones)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_every_step_section_and_writes_its_numbers(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--d-in", "16", "--d-sae", "64", "--k", "4",
           "--batches", "64", "--rounds", "2", "--sections", "saelens", "family", "mp", "dense",
           "--data", "random", "--no-rss", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("floor", "floor, torch.topk", "SAELens TopK, aux idle", "kit TopK, aux idle",
                 "SAELens TopK, 10% dead, aux on", "kit TopK, 10% dead, aux on"):
        assert res[f"b64 {name}"]["ms"] > 0, name
    for name in ("kit_mc", "kit_fc", "kit_fc_zipf", "kit_gsae", "kit_mp"):
        assert res[f"b64 family {name}"]["vs_topk"] > 0, name
    assert res["mp textbook/kit"] > 0 and res["b64 dense dense_topk"]["vs_kit_topk"] > 0
    assert "| kit TopK, aux idle" in run.stdout
