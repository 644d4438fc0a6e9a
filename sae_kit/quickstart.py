"""Notebook 00's claims (TopK SAE + AuxK; Gao et al. 2024, arXiv 2406.04093): the quickstart's
measurements in, its claims table out. The training and metrics are the kit's shared ones."""

from __future__ import annotations

from .claims import Claims, Verdict, monotone
from .config import scale_name

DEAD_SHARE = 0.07  # Gao et al.: 7% dead latents in their 16M-latent SAE


def claims(metrics: dict, splice: dict, fvus, k: int, ks, dead_train: float, n_eval: int, dead_tokens: int,
           scale: str | None = None) -> Claims:
    """Notebook 00's claims table.

    Args:
        metrics: `reconstruction_metrics` of the trained SAE (``l0``, ``dead``).
        splice: `splice_metrics` of it (``delta_ce``, ``ce_recovered``, ``kl``, and ``ce_recovered_mean`` if given).
        fvus: held-out FVU of one SAE per k in `ks`.
        k, ks: the trained SAE's k and the k sweep.
        dead_train: share of its latents dead on the training clock (`SAE.dead_mask`).
        n_eval: held-out tokens; dead_tokens: the training clock's window.
        scale: the scale name (None: ``SAE_KIT_SCALE``); `ci` decides no dead-latent claim.
    """
    scale = scale_name(scale)
    out = Claims("00_quickstart", scale)
    l0 = metrics["l0"]
    out.add("k directly sets L0 (no L1 penalty, no tuning)", "L0 = k", f"L0 = {l0:.2f} at k = {k}",
            Verdict(abs(l0 - k) < 0.5, f"|L0 − k| = {abs(l0 - k):.2f}; L0 falls below k only where fewer than k "
                                       f"pre-activations are positive"),
            rule="held: |L0 − k| < 0.5 on the held-out tokens", source="Gao et al. §2.3", figure="section 5")
    out.add("reconstruction error falls as k grows", "FVU decreases smoothly with k",
            "FVU " + ", ".join(f"{f:.3f}" for f in fvus) + f" at k = {', '.join(map(str, ks))}",
            monotone(fvus, increasing=False, what="the FVUs"),
            rule="held: the FVU falls at every step of the k sweep", source="Gao et al. §3 (scaling laws)",
            figure="00_k_sweep")
    if scale == "ci":
        dead = Verdict(None, "ci trains on too few tokens for latents to die or revive; decided at lab scale")
    else:
        dead = Verdict(dead_train < DEAD_SHARE, f"{100 * dead_train:.1f}% {'<' if dead_train < DEAD_SHARE else '≥'} "
                                                f"{100 * DEAD_SHARE:.0f}% (dead window {dead_tokens:,} training tokens)")
    out.add("few dead latents with tied init + AuxK", f"{100 * DEAD_SHARE:.0f}% dead at 16M latents",
            f"{100 * dead_train:.1f}% dead on the training clock; {100 * metrics['dead']:.1f}% never active on "
            f"{n_eval:,} held-out tokens", dead,
            rule=f"held: under {100 * DEAD_SHARE:.0f}% of latents dead on the training clock (silent for "
                 f"dead_tokens training tokens; lab and paper only)", source="Gao et al. §2.4", figure="00_density")
    out.add("the spliced model stays close to the clean one", "(no number for this model)",
            f"ΔCE = {splice['delta_ce']:.3f} nats, CE recovered = {100 * splice['ce_recovered']:.1f}% against "
            f"zero-ablation" + (f" and {100 * splice['ce_recovered_mean']:.1f}% against mean-ablation (the stricter "
                                f"yardstick)" if "ce_recovered_mean" in splice else "")
            + f", KL = {splice['kl']:.3f}; scored on the stored positions of each window (the attention-sink first "
              f"position and the target-less last one are left out), so not comparable to an all-positions number",
            Verdict(None, "reported, not judged: the paper's numbers are for GPT-2/GPT-4"),
            rule="not judged", source="Gao et al. §4.1 (downstream loss)", figure="section 7")
    return out
