"""Analysis for notebook 01 (TopK vs Feature / Mutual Choice): sweeps, matched-L0 gaps, under-use.

Everything here works on the one SAE interface and the metrics of `metrics`; the notebook only
calls these and plots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .metrics import Splicer, encode_batched, feature_density, reconstruction_metrics
from .saes import choice_sae, fit_zipf, topk_sae, zipf_probs
from .train import train


@dataclass
class Variant:
    """One row of the comparison: a label and how to build the SAE for a given k."""

    label: str
    rule: str  # "topk" | "mc" | "fc"
    extra: dict
    aux: bool = True  # TopK only: AuxK on or off

    def build(self, d_in: int, d_sae: int, k: int, seed: int, dead_tokens: int, device=None):
        if self.rule == "topk":
            return topk_sae(d_in, d_sae, k, seed=seed, dead_tokens=dead_tokens, device=device,
                            aux_coef=(1 / 32) if self.aux else 0.0)
        return choice_sae(self.rule, d_in, d_sae, k, seed=seed, dead_tokens=dead_tokens, device=device,
                          extra=dict(self.extra))


def paper_variants(zipf: dict) -> list[Variant]:
    """The six dictionaries of Ayonrinde 2024's comparison; `zipf` is a `fit_zipf` result."""
    z = {"zipf_alpha": zipf["alpha"], "zipf_b": zipf["b"]}
    return [
        Variant("TopK", "topk", {}, aux=False),
        Variant("TopK+AuxK", "topk", {}),
        Variant("MC", "mc", {"aux": "none"}),
        Variant("MC+aux_zipf", "mc", {"aux": "zipf", **z}),
        Variant("FC-uniform", "fc", {"aux": "none", "capacity": "uniform"}),
        Variant("FC-Zipf", "fc", {"aux": "none", "capacity": "zipf", **z}),
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


def run_sweep(variants: list[Variant], store, scale, ks, seeds=(0,), splicer=None, device=None,
              zipf: dict | None = None, extra_seed_k: int | None = None) -> list[dict]:
    """Train and evaluate every variant at every k (seed 0), plus extra seeds at `extra_seed_k`.

    Returns one dict per trained SAE: label, k, seed, metrics, history.
    """
    x_eval = store.get("eval")
    d_in, d_sae = store.d_in, scale.expansion * store.d_in
    rows = []
    for v in variants:
        for k in ks:
            for seed in (seeds if k == extra_seed_k else seeds[:1]):
                sae = v.build(d_in, d_sae, k, seed, scale.dead_tokens, device)
                hist = train(sae, store, batch_size=scale.batch_size, epochs=scale.epochs, seed=seed,
                             desc=f"{v.label} k={k} seed={seed}")
                m = evaluate_variant(sae, x_eval, k, zipf, scale.batch_size, splicer)
                rows.append({"label": v.label, "seed": seed, "history": hist, "sae": sae, **m})
    return rows


def matched_l0_gap(rows: list[dict], label: str, reference: str = "TopK+AuxK", key: str = "fvu") -> list[float]:
    """log(FVU_variant / FVU_reference interpolated at the variant's L0), seed 0, per k.

    The reference frontier is interpolated in log-log space; negative means the variant is better.
    """
    ref = sorted((r for r in rows if r["label"] == reference and r["seed"] == 0), key=lambda r: r["l0"])
    lx = np.log([r["l0"] for r in ref])
    ly = np.log([r[key] for r in ref])
    gaps = []
    for r in rows:
        if r["label"] != label or r["seed"] != 0:
            continue
        l = np.log(max(r["l0"], 1e-9))
        if not lx[0] <= l <= lx[-1]:  # outside the reference's range: extrapolate linearly
            i = 0 if l < lx[0] else len(lx) - 2
            y = ly[i] + (ly[i + 1] - ly[i]) * (l - lx[i]) / (lx[i + 1] - lx[i])
        else:
            y = np.interp(l, lx, ly)
        gaps.append(float(np.log(r[key]) - y))
    return gaps


def seed_spread(rows: list[dict], label: str, k: int, key: str = "fvu") -> tuple[float, float, int]:
    """(mean, standard deviation, count) of a metric over seeds at one k."""
    vals = [r[key] for r in rows if r["label"] == label and r["k"] == k]
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"), len(vals)


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
