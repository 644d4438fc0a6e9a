"""Analysis for notebook 01 (TopK vs Feature / Mutual Choice): the variants, their evaluation in
threshold and batch mode, under-used features, and per-token adaptive computation. Sweeps and
matched-L0 comparisons are the generic ones in `sweeps`.
"""

from __future__ import annotations

import torch

from .metrics import Splicer, encode_batched, feature_density, reconstruction_metrics
from .saes import choice_sae, fit_zipf, topk_sae, zipf_probs
from .sweeps import Variant


def paper_variants(zipf: dict, d_in: int, d_sae: int, dead_tokens: int, device=None) -> list[Variant]:
    """The six dictionaries of Ayonrinde 2024's comparison; `zipf` is a `fit_zipf` result."""
    z = {"zipf_alpha": zipf["alpha"], "zipf_b": zipf["b"]}
    common = dict(dead_tokens=dead_tokens, device=device)

    def topk(aux):
        return lambda k, seed: topk_sae(d_in, d_sae, k, seed=seed, aux_coef=(1 / 32) if aux else 0.0, **common)

    def choice(rule, **extra):
        return lambda k, seed: choice_sae(rule, d_in, d_sae, k, seed=seed, extra=dict(extra), **common)

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
                     splicer: Splicer | None = None) -> dict:
    """Threshold-mode metrics (what a user has at inference), batch-mode metrics for choice rules,
    under-used %, and splice metrics in threshold mode."""
    out = {"k": k}
    modes = ["threshold", "batch"] if hasattr(sae, "inference") else ["threshold"]
    for mode in modes:
        if hasattr(sae, "inference"):
            sae.inference = mode
        m = reconstruction_metrics(sae, x_eval, batch_size=batch_size)
        dens = m.pop("density")
        suffix = "" if mode == "threshold" else "_batch"
        out.update({f"{key}{suffix}": v for key, v in m.items()})
        out[f"under_used{suffix}"] = under_used_fraction(dens, k, zipf)
        if mode == "threshold":
            out["density"] = dens
    if hasattr(sae, "inference"):
        sae.inference = "threshold"
    if "fvu_batch" not in out:  # TopK: batch and threshold mode are the same thing
        out.update({f"{key}_batch": out[key] for key in ("fvu", "nmse", "l0", "dead", "dense", "under_used")})
    if splicer is not None:
        out.update(splicer(sae))
    return out


@torch.no_grad()
def per_token_difficulty(sae_choice, sae_topk, x: torch.Tensor) -> dict:
    """Per-token L0 of a choice SAE (threshold mode) against the TopK SAE's per-token error norm.

    Returns:
        dict with l0 [N], err [N] and the Spearman correlation rho with its p-value.
    """
    from scipy.stats import spearmanr

    x_hat_t, _ = encode_batched(sae_topk, x)
    err = (x - x_hat_t).norm(dim=1)
    _, z = encode_batched(sae_choice, x)
    l0 = (z > 0).sum(1).float()
    rho, p = spearmanr(l0.numpy(), err.numpy())
    return {"l0": l0, "err": err, "rho": float(rho), "p": float(p)}


def reference_zipf(sae, x_eval: torch.Tensor) -> dict:
    """Fit Zipf to a trained SAE's feature densities on held-out tokens."""
    _, z = encode_batched(sae, x_eval)
    dens = feature_density(z)
    return {**fit_zipf(dens), "density": dens}
