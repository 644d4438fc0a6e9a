"""Analysis for notebook 03 (Matching-Pursuit SAEs, Costa et al. 2025): recovery of a known feature
hierarchy, the pursuit step by step, and residual norms. The MP-SAE itself is `saes.matching_pursuit`;
budgets other than the trained one come from ``sae.reconstruct(x, k=...)`` (`metrics.fvu_by_budget`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import bars_off
from .metrics import reconstruction_metrics
from .synthetic import Hierarchy, absorption, match
from .train import train


@torch.no_grad()
def residual_norms(sae, x: torch.Tensor, steps: int) -> torch.Tensor:
    """‖r_t‖ for t = 0..steps, per token, [B, steps + 1], replaying the chosen atoms exactly."""
    code = sae.pursue(x.to(sae.device), steps, threshold=0.0)
    B = x.shape[0]
    idx, vals = code.cols.view(B, steps), code.vals.view(B, steps)
    r = x.to(sae.device) - sae.b_dec
    out = [r.norm(dim=1)]
    for t in range(steps):
        r = r - vals[:, t:t + 1] * sae.W_dec[idx[:, t]]
        out.append(r.norm(dim=1))
    return torch.stack(out, 1).cpu()


@torch.no_grad()
def pursuit_trace(sae, x: torch.Tensor, steps: int) -> dict:
    """Matching pursuit on one input, step by step, for `plots.pursuit_small_multiples`.

    Returns the input ``x`` [d], ``b_dec``, and per step (``steps + 1`` panels, the first is the start
    at b_dec): the atom picked ``atoms`` [steps, d] with its index ``idx`` and value ``vals``, the
    reconstruction so far ``recon`` [steps + 1, d] and the residual norms ``norms`` [steps + 1]."""
    x = x.reshape(1, -1).to(sae.device)
    code = sae.pursue(x, steps, threshold=0.0)
    idx, vals = code.cols.cpu(), code.vals.detach().cpu()
    W, b = sae.W_dec.detach().cpu(), sae.b_dec.detach().cpu()
    recon = [b.clone()]
    for t in range(steps):
        recon.append(recon[-1] + vals[t] * W[idx[t]])
    return {"x": x.cpu()[0], "b_dec": b, "idx": idx, "vals": vals, "atoms": W[idx],
            "recon": torch.stack(recon), "norms": residual_norms(sae, x, steps)[0]}


def recovery_benchmark(builders: dict, h: Hierarchy, seeds=(0, 1, 2), n_steps: int = 4000,
                       batch_size: int = 256, lr: float = 1e-2, progress: bool = True) -> list[dict]:
    """Train each dictionary ``builders[name](seed)`` on fresh samples of `h` and match it to the truth.

    Returns one row per (method, seed): matched cosine overall and per group, the children's
    parent absorption (`absorption`), FVU and L0 on held-out samples, and the trained SAE."""
    x, _ = h.sample(n_steps * batch_size)
    x_test, _ = h.sample(8192, seed=h.seed + 2)
    rows = []
    jobs = [(name, s) for name in builders for s in seeds]
    for name, s in tqdm(jobs, desc="synthetic hierarchy", disable=bars_off(progress)):
        sae = builders[name](s)
        train(sae, x, batch_size=batch_size, lr=lr, seed=s, progress=False)
        m = match(sae.W_dec, h.features, h.groups)
        r = reconstruction_metrics(sae, x_test)
        rows.append({"method": name, "seed": s, "matched": m["mean"], **{g: m[g] for g in h.groups},
                     "absorption": absorption(sae.W_dec, h, m["assignment"]), "fvu": r["fvu"], "l0": r["l0"],
                     "match": m, "sae": sae})
    return rows
