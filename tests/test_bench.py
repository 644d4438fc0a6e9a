"""`make bench` runs end to end at toy shapes (its numbers are only meaningful at the real ones)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.bench_train_step import least_grads

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_every_step_section_and_writes_its_numbers(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--d-in", "16", "--d-sae", "64", "--k", "4",
           "--batches", "64", "--rounds", "2", "--sections", "saelens", "family", "mp", "dense",
           "--data", "random", "--no-rss", "--json", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("floor", "floor, torch.topk", "least exact step", "SAELens TopK, aux idle", "kit TopK, aux idle",
                 "SAELens TopK, 10% dead, aux on", "kit TopK, 10% dead, aux on"):
        assert res[f"b64 {name}"]["ms"] > 0, name
    for name in ("kit_mc", "kit_fc", "kit_fc_zipf", "kit_gsae", "gsae_gemm", "kit_mp"):
        assert res[f"b64 family {name}"]["vs_topk"] > 0, name
    assert res["mp textbook/kit"] > 0 and res["b64 dense dense_topk"]["vs_kit_topk"] > 0
    assert "| kit TopK, aux idle" in run.stdout


def test_least_step_computes_the_real_gradients():
    """The bound row does the whole of the sparse work, not less: its gradients are those autograd
    finds for ½‖x̂ − x‖² through the dense TopK formulation (z scattered into B × d_sae)."""
    torch.manual_seed(0)
    d_in, n, k, B = 24, 96, 5, 80
    x = torch.randn(B, d_in) * 2
    W_dec = torch.randn(n, d_in) / d_in ** 0.5
    # b_enc shifted down: some tokens keep latents at or below zero, which the ReLU must stop
    params = [W_dec.clone() + 0.1 * torch.randn(n, d_in), W_dec, 0.1 * torch.randn(n) - 2, 0.1 * torch.randn(d_in)]
    got = least_grads(x, *params, k)
    W_enc_t, W_dec, b_enc, b_dec = (p.clone().requires_grad_() for p in params)
    pre = (x - b_dec) @ W_enc_t.t() + b_enc
    v, i = pre.topk(k, dim=1)
    assert 0 < int((v <= 0).sum()) < v.numel() // 2
    z = torch.zeros_like(pre).scatter(1, i, v.relu())
    (0.5 * ((z @ W_dec + b_dec - x) ** 2).sum()).backward()
    for name, g, p in zip(("W_enc_t", "W_dec", "b_enc", "b_dec"), got, (W_enc_t, W_dec, b_enc, b_dec)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4, msg=name)
