"""Side-by-side cost of one SAE training step, as ratios measured in one run (make bench).

Compares the kit's sparse step (embedding_bag decode, encoder backward over the kept latents
only) against plain dense autograd for the same TopK math, and the Mutual / Feature Choice steps
against TopK; then the matching-pursuit step with the Gram-matrix trick against the textbook
pursuit that recomputes every correlation with autograd (on a quarter of the batch: the textbook
one is slow). Shapes follow DESIGN.md: d_in 576, d_sae 4608, k 32, batch 4096 (override by flags).
Timings interleave the contenders round by round, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_kit.saes import choice_sae, fvu_loss, mp_sae, topk_sae


def dense_step(sae, x, opt):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(sae.cfg.k, -1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    loss = fvu_loss(x, z @ sae.W_dec + sae.b_dec)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def textbook_mp_step(sae, x, opt):
    """Matching pursuit as usually written: correlations recomputed (and differentiated) each step."""
    r = x - sae.b_dec
    for _ in range(sae.cfg.k):
        c = r @ sae.W_dec.t()
        j = c.argmax(1, keepdim=True)
        r = r - torch.relu(c.gather(1, j)) * sae.W_dec[j[:, 0]]
    loss = fvu_loss(x, x - r)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def kit_step(sae, x, opt):
    out = sae.loss(x)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    sae.project_decoder_grad()
    opt.step()
    sae.normalize_decoder()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in) * 3
    contenders = {
        "dense autograd TopK": (topk_sae(a.d_in, a.d_sae, a.k, aux_coef=0.0), dense_step),
        "kit TopK (sparse)": (topk_sae(a.d_in, a.d_sae, a.k, aux_coef=0.0), kit_step),
        "kit Mutual Choice": (choice_sae("mc", a.d_in, a.d_sae, a.k, aux="none"), kit_step),
        "kit Feature Choice": (choice_sae("fc", a.d_in, a.d_sae, a.k, aux="none"), kit_step),
    }
    report(contenders, x, a.rounds, "kit TopK (sparse)")
    mp = {"kit MP (Gram trick)": (mp_sae(a.d_in, a.d_sae, a.k), kit_step),
          "textbook MP (autograd)": (mp_sae(a.d_in, a.d_sae, a.k), textbook_mp_step)}
    report(mp, x[:a.batch // 4], a.rounds, "kit MP (Gram trick)")


def report(contenders, x, rounds, base_name):
    """Time each contender's step, interleaved round by round, and print ratios to `base_name`."""
    opts = {name: torch.optim.Adam(sae.parameters(), lr=1e-4) for name, (sae, _) in contenders.items()}
    times = {name: [] for name in contenders}
    for name, (sae, step) in contenders.items():  # warm-up
        sae.train()
        step(sae, x, opts[name])
    for _ in range(rounds):
        for name, (sae, step) in contenders.items():
            t = time.perf_counter()
            step(sae, x, opts[name])
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times[base_name])
    sae0 = next(iter(contenders.values()))[0]
    print(f"\nd_in={sae0.cfg.d_in} d_sae={sae0.cfg.d_sae} k={sae0.cfg.k} batch={len(x)} threads={torch.get_num_threads()}")
    print(f"{'step':24s} {'median ms':>10s} {'tokens/s':>10s} {'vs ' + base_name:>22s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:24s} {1000 * med:10.0f} {len(x) / med:10.0f} {med / base:21.2f}x")

if __name__ == "__main__":
    main()
