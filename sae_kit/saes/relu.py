"""The "vanilla" SAE: ReLU encoder and an L1 sparsity penalty (Bricken et al. 2023; Cunningham et al. 2023).

Every latent with a positive pre-activation is kept; sparsity comes only from the penalty
``l1_coef · mean_t Σ_i z_ti / rms_t‖x_t − x̄‖``. Dividing by the data's scale makes ``l1_coef``
unitless (the main loss, FVU, already is), so one value works for toy data and for a language
model. The decoder is unit-norm, as for every kit dictionary, so the penalty cannot be dodged by
shrinking z and growing atoms. Used as the flat baseline on small synthetic data (notebook 03);
its code is dense in practice, so it is not meant for wide dictionaries on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validate import real
from .base import SAE, SAEConfig, Selection, mask_pairs


@dataclass
class ReluConfig(SAEConfig):
    l1_coef: float = 0.1  # weight of the unitless L1 penalty (sets the sparsity; there is no k)
    aux_coef: float = 0.0  # no auxiliary loss: the penalty, not a budget, decides what fires

    def __post_init__(self):
        super().__post_init__()
        self.l1_coef = real("l1_coef", self.l1_coef, min=0)


class ReluSAE(SAE):
    """ReLU + L1: every latent with a positive pre-activation is kept; no sparsity budget."""

    architecture = "relu"
    config_class = ReluConfig
    modes = ("relu",)
    saelens_architecture = "standard"

    def select(self, pre, g=None, k=None):
        self._budget(k)  # a clear error if a budget is asked for
        rows, cols = mask_pairs(pre > 0)  # row-major, so rows come sorted
        return Selection(rows, cols)

    def penalty(self, x: torch.Tensor, code) -> torch.Tensor:
        scale = (x - x.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(1e-8)
        return self.cfg.l1_coef * code.vals.sum() / x.shape[0] / scale


def relu_sae(d_in: int, d_sae: int, l1_coef: float = 0.1, seed: int = 0, device=None, **cfg) -> ReluSAE:
    """Shorthand: ``relu_sae(20, 20, l1_coef=0.1)``."""
    return ReluSAE(ReluConfig(d_in=d_in, d_sae=d_sae, l1_coef=l1_coef, **cfg), seed=seed, device=device)
