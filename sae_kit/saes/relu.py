"""The "vanilla" SAE: ReLU encoder and an L1 sparsity penalty (Bricken et al. 2023; Cunningham et al. 2023).

Every latent with a positive pre-activation is kept; sparsity comes only from the penalty
``l1_coef · mean_t Σ_i z_ti / rms_t‖x_t − x̄‖``. Dividing by the data's scale makes ``l1_coef``
unitless (the main loss, FVU, already is), so one value works for toy data and for a language
model. The decoder is unit-norm, as for every kit dictionary, so the penalty cannot be dodged by
shrinking z and growing atoms. Used as the flat baseline on small synthetic data (notebook 03);
its code is dense in practice, so it is not meant for wide dictionaries on CPU.
"""

from __future__ import annotations

import torch

from .base import SAE, SAEConfig


class ReluSAE(SAE):
    """ReLU + L1. ``cfg.k`` is unused by the encoder (kept for the interface); ``extra={"l1_coef": 0.1}``."""

    saelens_architecture = "standard"

    def __init__(self, cfg: SAEConfig, seed: int = 0, device=None, dtype=torch.float32):
        cfg.extra = {"l1_coef": 0.1, **cfg.extra}
        if cfg.extra["l1_coef"] < 0:
            raise ValueError(f"l1_coef must be ≥ 0, got {cfg.extra['l1_coef']}")
        super().__init__(cfg, seed=seed, device=device, dtype=dtype)

    def select(self, pre, g=None):
        rows, cols = (pre > 0).nonzero(as_tuple=True)  # row-major, so rows come sorted
        return rows, cols

    def penalty(self, x: torch.Tensor, code) -> torch.Tensor:
        scale = (x - x.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-8)
        return self.cfg.extra["l1_coef"] * code.vals.sum() / x.shape[0] / scale


def relu_sae(d_in: int, d_sae: int, l1_coef: float = 0.1, seed: int = 0, device=None, **cfg) -> ReluSAE:
    """Shorthand: ``relu_sae(20, 20, l1_coef=0.1)`` (AuxK off: the penalty, not k, sets sparsity)."""
    extra = {"l1_coef": l1_coef, **cfg.pop("extra", {})}
    cfg.setdefault("k", 1)
    return ReluSAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", aux_coef=0.0, extra=extra, **cfg),
                   seed=seed, device=device)
