"""Analysis for notebook 01 (TopK vs Feature / Mutual Choice): the variants, their evaluation in
threshold and batch mode, under-used features, and per-token adaptive computation. Sweeps and
matched-L0 comparisons are the generic ones in `sweeps`.
"""

from __future__ import annotations

import torch

from .metrics import feature_density, forward_batched, reconstruction_metrics
from .saes import choice_sae, fit_zipf, topk_sae, zipf_probs
from .splice import Splicer
from .sweeps import Variant, each_mode


def paper_variants(zipf: dict, d_in: int, d_sae: int, dead_tokens: int, device=None) -> list[Variant]:
    """The six dictionaries of Ayonrinde 2024's comparison; `zipf` is a `fit_zipf` result."""
    z = {"zipf_alpha": zipf["alpha"], "zipf_b": zipf["b"]}
    common = dict(dead_tokens=dead_tokens, device=device)

    def topk(aux):
        return lambda k, seed: topk_sae(d_in, d_sae, k, seed=seed, aux_coef=(1 / 32) if aux else 0.0, **common)

    def choice(rule, **knobs):
        return lambda k, seed: choice_sae(rule, d_in, d_sae, k, seed=seed, **knobs, **common)

    return [
        Variant("TopK", topk(False)),
        Variant("TopK+AuxK", topk(True)),
        Variant("MC", choice("mc", aux="none")),
        Variant("MC+aux_zipf", choice("mc", aux="zipf", **z)),
        Variant("FC-uniform", choice("fc", aux="none", capacity="uniform")),
        Variant("FC-Zipf", choice("fc", aux="none", capacity="zipf", **z)),
    ]


def under_used_fraction(density: torch.Tensor, k: int, zipf: dict, tau: float = 0.1) -> float:
    """Share of features whose density is below tau × the Zipf-predicted density k·p(rank)."""
    n = len(density)
    d = torch.sort(density.float(), descending=True).values
    expected = (k * zipf_probs(n, zipf["alpha"], zipf["b"])).clamp(max=1.0)
    return float((d < tau * expected).float().mean())


def evaluate_variant(sae, x_eval: torch.Tensor, k: int, zipf: dict, batch_size: int,
                     splicer: Splicer | None = None) -> list[dict]:
    """One row per inference mode of `sae` (choice rules: ``threshold``, what a user has at
    inference, and ``batch``, the training rule; TopK: its one mode): FVU, nMSE, L0, dead %, dense %
    and under-used %, plus splice metrics (ΔCE, KL...) in the default mode."""

    def metrics(mode: str) -> dict:
        m = reconstruction_metrics(sae, x_eval, batch_size=batch_size)
        out = {key: v for key, v in m.items() if key != "density"}
        out["under_used"] = under_used_fraction(m["density"], k, zipf)
        if splicer is not None and mode == sae.modes[0]:
            out.update(splicer(sae))
        return out

    return each_mode(sae, metrics)


@torch.no_grad()
def per_token_difficulty(sae_choice, sae_topk, x: torch.Tensor) -> dict:
    """Per-token L0 of a choice SAE (threshold mode) against the TopK SAE's per-token error norm.

    Returns:
        dict with l0 [N], err [N] and the Spearman correlation rho with its p-value.
    """
    from scipy.stats import spearmanr

    x_hat_t, _ = forward_batched(sae_topk, x)
    err = (x - x_hat_t).norm(dim=1)
    _, z = forward_batched(sae_choice, x)
    l0 = (z > 0).sum(1).float()
    rho, p = spearmanr(l0.numpy(), err.numpy())
    return {"l0": l0, "err": err, "rho": float(rho), "p": float(p)}


def reference_zipf(sae, x_eval: torch.Tensor) -> dict:
    """Fit Zipf to a trained SAE's feature densities on held-out tokens."""
    _, z = forward_batched(sae, x_eval)
    dens = feature_density(z)
    return {**fit_zipf(dens), "density": dens}


def allocation_masks(pre: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What TopK, Mutual Choice and Feature Choice (uniform) keep of one B×n affinity matrix, as
    boolean masks, with the titles the allocation figure uses."""
    B, n = pre.shape
    topk = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(k, 1).indices, True)
    mc, _ = choice_sae("mc", 2, n, k).batch_keep(pre)
    fc, _ = choice_sae("fc", 2, n, k).batch_keep(pre)
    return {f"TopK: {k} per token": topk, f"Mutual Choice: top {k * B} overall": mc,
            f"Feature Choice: {k * B // n}-{-(-k * B // n)} per feature": fc}
